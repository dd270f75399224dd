"""A plan change survives a leader failover: three daemons, a mixture change recorded at a future
step N, the leader killed while the trainers are just before N or just after it; the new leader
(and every daemon) plans from the spec plus the log's change, so what the trainers received is
exactly what ``expect`` computes from the most up-to-date log, and the change took effect at N."""

from __future__ import annotations

import re
import signal
import time

import pytest

from fabric_client import protocol
from fabric_client.errors import RemoteError
from fabricd.config import load_job_spec
from fabricd.ctl import request_any
from fabricd.expect import BatchOracle, log_plan_changes, log_skips, newest_log_state
from fabricd.localnode import LocalCluster

from ..conftest import write_job
from ..integration.test_data_path import assert_exact
from .test_failover import consume_all, logs_prefix_consistent, submit_to_leader

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 40


def floor(cluster: LocalCluster, node: str) -> int:
    st = cluster.status(node)
    return st["jobs"].get("t", {}).get("progress_floor", 0) if st else 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kill", ["before", "after"])
def test_leader_killed_around_a_plan_change(tmp_path, tiny_corpus, kill):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, samples_per_step=12)
    spec = load_job_spec(job_file)
    with LocalCluster(tmp_path / "cluster", nodes=3, loader_workers=2) as cluster:
        leader = submit_to_leader(cluster, job_file)
        out, errors = {}, []
        threads = consume_all(cluster, 2, STEPS, out, errors, pace_s=0.4)
        wait_for(lambda: floor(cluster, leader) >= 2, 60, "trainers never started")
        at, step = None, 1  # step 1 is delivered already: the refusal names the frontier
        for _ in range(5):
            try:
                reply = request_any(cluster.addresses, protocol.PlanUpdate(
                    job="t", at_step=step, sets=["mixture.weights.code=0.6"]), leader_only=True,
                    keys=cluster.daemons[leader].operator_keys)
                at = reply.at_step
                break
            except RemoteError as e:  # too late: a little past the frontier it names (trainers move)
                m = re.search(r"the first step still changeable is (\d+)", e.reason)
                assert m, e.reason
                step = int(m.group(1)) + 2
        assert at is not None and at < STEPS - 6, (at, step)
        leader = cluster.leader()
        followers = [n for n in cluster.daemons if n != leader]
        wait_for(lambda: all(len((cluster.status(n) or {}).get("jobs", {}).get("t", {}).get("plan_changes", ())) == 1
                             for n in followers), 30, "the change did not reach the followers")
        if kill == "before":
            assert floor(cluster, leader) < at, "the trainers passed the change before the kill"
        else:
            wait_for(lambda: floor(cluster, leader) > at + 1, 90, "the trainers never passed the change")
        cluster.kill(leader, signal.SIGKILL)
        for t in threads:
            t.join(250)
        assert not errors, errors
        assert cluster.leader(exclude=(leader,)) != leader
    assert cluster.leftovers == [], "role processes outlived their daemon"
    logs_prefix_consistent(cluster)
    state = newest_log_state([d.workdir / "state" / "log" for d in cluster.daemons.values()])
    changes = log_plan_changes(state, "t")
    assert [c.at_step for c in changes] == [at] and changes[0].origin.startswith("operator")
    oracle = BatchOracle(spec, skips=log_skips(state, "t"), plan_changes=changes)
    want = {b.key(): b for s in range(STEPS) for b in oracle.step(s)}
    for d in range(2):
        assert_exact([(k, c) for k, c, _ in out[d]], want, d)
    plain = BatchOracle(spec, skips=log_skips(state, "t"))
    before = {b.key(): b.checksum for s in range(at) for b in plain.step(s)}
    assert all(want[k].checksum == c for k, c in before.items()), "a step before the change changed"
    assert any(want[b.key()].checksum != b.checksum for s in range(at, at + 3) for b in plain.step(s)), \
        "the change did not take effect at its step"
