"""A daemon out of touch with its leader answers neither plans nor Locate from its stale copy.

Found by the 1000-fault chaos run: a shadow just healed from a partition, not yet caught up,
told a trainer its (moved) constructor was the primary, and that constructor, planning from the
stale state, delivered a unit whose skip record the leader had meanwhile committed. Two daemons
(a majority needs both): SIGSTOP the leader, and the other can neither lead nor trust its copy.
"""

from __future__ import annotations

import signal
import time

import pytest

from fabric_client import protocol
from fabric_client.errors import RemoteError
from fabricd.ctl import ControlClient
from fabricd.localnode import LocalCluster

from ..conftest import keyed_dealer, write_job
from .test_failover import submit_to_leader

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def _locate(cluster: LocalCluster, node: str) -> protocol.Message | str:
    with ControlClient(cluster.daemons[node].address, timeout_s=3.0, retries=0, keys=cluster.trainer_keys) as c:
        try:
            return c.request(protocol.Locate(job="t", dp_rank=0, dp_size=1))[0]
        except RemoteError as e:
            return f"{e.code}: {e}"


def _plan(cluster: LocalCluster, node: str) -> protocol.Message:
    sock = keyed_dealer("node", node)  # as that node's own role process
    sock.connect(cluster.daemons[node].address)
    try:
        sock.send_multipart(protocol.encode(protocol.PlanRequest(job="t", step=3, ranks=[0])))
        assert sock.poll(5000), "no answer to a plan request"
        return protocol.decode(sock.recv_multipart())[0]
    finally:
        sock.close(linger=0)


def test_a_follower_cut_off_from_its_leader_refuses_plans_and_locate(tmp_path, tiny_corpus):
    cluster = LocalCluster(tmp_path / "c", nodes=2, lease_duration_s=1.0, renew_deadline_s=0.65,
                           retry_period_s=0.15, heartbeat_s=0.3)
    cluster.start()
    try:
        leader = submit_to_leader(cluster, write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1))
        follower = next(n for n in cluster.daemons if n != leader)
        deadline = time.monotonic() + 30
        while not isinstance(_locate(cluster, follower), protocol.Located) and time.monotonic() < deadline:
            time.sleep(0.2)  # in touch: it answers like the leader
        assert isinstance(_locate(cluster, follower), protocol.Located)
        deadline = time.monotonic() + 30
        while not isinstance(_plan(cluster, follower), protocol.PlanReply) and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.kill(leader, signal.SIGSTOP)
        try:
            time.sleep(1.0 + 0.5 + 1.0)  # lease + one replication heartbeat, and then some
            located = _locate(cluster, follower)
            assert isinstance(located, str) and "not_ready" in located and "not in touch" in located, located
            plan = _plan(cluster, follower)
            assert isinstance(plan, protocol.ErrorReply) and plan.code == "not_ready" \
                and plan.reason.startswith("step 3: ") and "not in touch" in plan.reason, plan
            st = cluster.status(follower)
            assert st["cluster"]["in_touch"] is False and st["counters"]["stale_refused"] >= 2
        finally:
            cluster.kill(leader, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while not isinstance(_locate(cluster, follower), protocol.Located) and time.monotonic() < deadline:
            time.sleep(0.2)  # back in touch: answering again
        assert isinstance(_locate(cluster, follower), protocol.Located)
    finally:
        cluster.stop()
    assert not cluster.leftovers
