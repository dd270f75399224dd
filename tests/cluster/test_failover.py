"""Several real daemons on loopback, killed on purpose; delivery stays exact.

Marker ``cluster``. The first test is bounded (one leader kill, ~20 s) and runs in CI; the
longer ones are also ``slow``.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from fabric_client import Loader, protocol
from fabricd.localnode import LocalCluster

from ..conftest import write_job
from ..integration.test_data_path import assert_exact, expected

pytestmark = [pytest.mark.cluster]


def submit_to_leader(cluster: LocalCluster, job_file: Path, timeout: float = 90.0) -> str:
    leader = cluster.leader()
    with cluster.daemons[leader].client() as client:
        client.request(protocol.SubmitJob(spec_toml=job_file.read_text(), spec_path=str(job_file)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = cluster.status(leader)
        if st and st["jobs"].get("t", {}).get("serving"):
            return leader
        time.sleep(0.1)
    raise AssertionError("job not serving")


def consume_all(cluster, dp_size, steps, out, errors, pace_s=0.03, hosts=None, on_batch=None):
    """One trainer thread per rank of job "t": ``out[rank]`` gets ((step, rank, micro), checksum,
    time) per batch; ``on_batch(loader, batch)``, if given, runs after each (a training step)."""
    def run(d):
        try:
            records = []
            with Loader(cluster.addresses, job="t", dp_rank=d, dp_size=dp_size, max_steps=steps,
                        deadline_s=90, stall_s=1.0, host=(hosts or {}).get(d)) as loader:
                for b in loader:
                    records.append(((b.step, b.dp_rank, b.micro_batch), b.checksum, time.monotonic()))
                    if on_batch is not None:
                        on_batch(loader, b)
                    time.sleep(pace_s)
            out[d] = records
        except Exception as e:  # surfaced by the test
            errors.append((d, e))

    threads = [threading.Thread(target=run, args=(d,)) for d in range(dp_size)]
    for t in threads:
        t.start()
    return threads


def logs_prefix_consistent(cluster: LocalCluster) -> None:
    from fabricd.cluster.log import CheckpointLog

    logs = []
    for d in cluster.daemons.values():
        lg = CheckpointLog(d.workdir / "state" / "log")
        lg.open()
        logs.append([(r.term, r.seq, r.kind, r.data) for r in lg.read(lg.first_seq, limit=100000)])
        lg.close()
    for a in logs:
        for b in logs:
            n = min(len(a), len(b))
            assert a[:n] == b[:n], "replica logs diverge"


@pytest.mark.timeout(240)
def test_leader_killed_mid_delivery_loses_and_repeats_nothing(tmp_path, tiny_corpus, lease_backend):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, samples_per_step=12)
    steps = 24
    with LocalCluster(tmp_path / "cluster", nodes=3, loader_workers=2, cluster_extra=lease_backend) as cluster:
        leader = submit_to_leader(cluster, job_file)
        term = cluster.status(leader)["term"]
        out, errors = {}, []
        threads = consume_all(cluster, 2, steps, out, errors)
        time.sleep(1.0)
        cluster.kill(leader, signal.SIGKILL)
        for t in threads:
            t.join(200)
        assert not errors, errors
        new_leader = cluster.leader()
        assert new_leader != leader and cluster.status(new_leader)["term"] > term
        backend = cluster.status(new_leader)["cluster"]["lease"].get("backend", "builtin")
        assert backend == ("etcd" if lease_backend else "builtin")
        want = expected(job_file, range(steps))
        for d in range(2):
            assert_exact([(k, c) for k, c, _ in out[d]], want, d)
        cluster.restart(leader)  # the old leader comes back as a follower and catches up
        deadline = time.monotonic() + 30
        while True:
            st = cluster.status(leader)
            if st and st["cluster"]["log"]["last"] == cluster.status(new_leader)["cluster"]["log"]["last"]:
                break
            assert time.monotonic() < deadline, "restarted daemon did not catch up"
            time.sleep(0.2)
        assert not cluster.status(leader)["is_leader"]
    assert cluster.leftovers == [], "role processes outlived their daemon"
    logs_prefix_consistent(cluster)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_paused_leader_loses_its_lease_and_is_fenced(tmp_path, tiny_corpus, lease_backend):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, samples_per_step=12)
    steps = 20
    with LocalCluster(tmp_path / "cluster", nodes=3, loader_workers=2, cluster_extra=lease_backend) as cluster:
        leader = submit_to_leader(cluster, job_file)
        out, errors = {}, []
        threads = consume_all(cluster, 2, steps, out, errors)
        time.sleep(0.5)
        cluster.kill(leader, signal.SIGSTOP)
        time.sleep(4.0)  # twice the lease
        new_leader = cluster.leader()
        assert new_leader != leader
        cluster.kill(leader, signal.SIGCONT)
        for t in threads:
            t.join(250)
        assert not errors, errors
        deadline = time.monotonic() + 15
        while (st := cluster.status(leader)) is None or st["is_leader"] or st["term"] < cluster.status(new_leader)["term"]:
            assert time.monotonic() < deadline, "the paused leader did not step down"
            time.sleep(0.2)
        want = expected(job_file, range(steps))
        for d in range(2):
            assert_exact([(k, c) for k, c, _ in out[d]], want, d)
    assert cluster.leftovers == [], "role processes outlived their daemon"
    logs_prefix_consistent(cluster)
