"""Constructors follow their trainers: a trainer declares its host, the leader moves its
constructor to a daemon there, and delivery stays exact through the move.

Marker ``cluster``; bounded (~20 s), runs in CI.
"""

from __future__ import annotations

import threading
import time

import pytest

from fabric_client import Loader
from fabricd.localnode import LocalCluster

from ..conftest import write_job
from ..integration.test_data_path import assert_exact, expected
from .test_failover import logs_prefix_consistent, submit_to_leader

pytestmark = [pytest.mark.cluster]


def placement(status: dict) -> dict[str, str]:
    return {r["id"]: r["node"] for r in status["jobs"]["t"]["roles"]}


@pytest.mark.timeout(240)
def test_constructors_move_to_the_hosts_their_trainers_declare(tmp_path, tiny_corpus):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, samples_per_step=12)
    with LocalCluster(tmp_path / "cluster", nodes=3, loader_workers=1) as cluster:
        leader = submit_to_leader(cluster, job_file)
        before = placement(cluster.status(leader))
        # each trainer claims the host (node id) where its constructor's standby runs, so both
        # primaries must move, and each standby must leave the daemon its primary moves to
        hosts = {d: before[f"t/constructor/{d}/standby"] for d in range(2)}
        assert all(before[f"t/constructor/{d}"] != hosts[d] for d in range(2))
        out, endpoints, errors, stop = {0: [], 1: []}, {}, [], threading.Event()

        def trainer(d):
            try:
                with Loader(cluster.addresses, job="t", dp_rank=d, dp_size=2, max_steps=2000, deadline_s=90,
                            stall_s=1.0, host=hosts[d], primary_check_s=0.5) as loader:
                    for b in loader:
                        out[d].append(((b.step, b.dp_rank, b.micro_batch), b.checksum))
                        endpoints[d] = loader.stats["endpoint"]
                        if stop.is_set():
                            return
                        time.sleep(0.05)
            except Exception as e:  # surfaced below
                errors.append((d, e))

        threads = [threading.Thread(target=trainer, args=(d,)) for d in range(2)]
        for t in threads:
            t.start()
        # until both constructors run on their trainers' hosts and both trainers are served by them
        deadline = time.monotonic() + 60
        while True:
            assert not errors, errors
            st = cluster.status(cluster.leader())
            after = placement(st)
            primaries = {r["id"]: r["endpoint"] for r in st["jobs"]["t"]["roles"] if r["kind"] == "constructor"}
            if all(after.get(f"t/constructor/{d}") == hosts[d] and endpoints.get(d) is not None
                   and endpoints[d] == primaries.get(f"t/constructor/{d}") for d in range(2)):
                break
            assert time.monotonic() < deadline, (f"constructors {after} (want {hosts}); trainers on {endpoints}, "
                                                 f"primaries at {primaries}")
            time.sleep(0.2)
        time.sleep(1.5)  # delivery goes on from the constructors on the trainers' hosts
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        last = min(max(k[0] for k, _ in out[d]) for d in range(2))
        assert last >= 3
        want = expected(job_file, range(last))
        for d in range(2):
            assert_exact([r for r in out[d] if r[0][0] < last], want, d)
        for d in range(2):
            assert after[f"t/constructor/{d}/standby"] != hosts[d], "a standby shares its primary's daemon"
            assert st["jobs"]["t"]["trainer_hosts"][f"{d}/0"][0] == hosts[d]
        loaders = {r: n for r, n in before.items() if "/loader/" in r}
        assert {r: after[r] for r in loaders} == loaders, "source loaders moved without cause"
    assert cluster.leftovers == [], "role processes outlived their daemon"
    logs_prefix_consistent(cluster)
