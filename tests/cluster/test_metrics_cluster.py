"""Metrics of a 3-daemon cluster: one leader by the metrics, the same term everywhere, replica lag
on the leader; after the leader is killed, the survivors count the leader change and the new
leader shows the dead shadow's lag growing. Bounded (~15 s), runs in CI."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from fabricd.localnode import LocalCluster

from ..integration.test_metrics import scrape, value

pytestmark = [pytest.mark.cluster]


def poll(check: Callable[[], object], timeout: float, what: str) -> object:
    """``check()`` until it returns something true (an AssertionError counts as not yet)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except AssertionError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {last}")


@pytest.mark.timeout(120)
def test_leader_term_and_replica_lag_by_the_metrics_across_a_failover(tmp_path):
    cluster = LocalCluster(tmp_path / "c", nodes=3)
    try:
        cluster.start()
        leader = cluster.leader()
        urls = {n: d.metrics_url() for n, d in cluster.daemons.items()}
        assert all(urls.values()) and len(set(urls.values())) == 3

        def settled() -> dict:
            m = {n: scrape(u) for n, u in urls.items()}
            assert [n for n in m if value(m[n], "fabricd_is_leader") == 1] == [leader]
            terms = {value(x, "fabricd_lease_term") for x in m.values()}
            assert len(terms) == 1 and min(terms) >= 1
            lag = m[leader]["fabricd_replica_lag_records"]
            assert {dict(k)["replica"] for k in lag} == set(urls) - {leader}
            assert all(v == 0 for v in lag.values()), lag
            commits = {value(x, "fabricd_log_commit_seq") for x in m.values()}
            assert len(commits) == 1 and min(commits) >= 1, commits
            return m

        before = poll(settled, 30, "a settled cluster")
        term = value(before[leader], "fabricd_lease_term")
        cluster.kill(leader)
        survivors = [n for n in urls if n != leader]
        new = cluster.leader(exclude=(leader,))

        def failed_over() -> dict:
            m = {n: scrape(urls[n]) for n in survivors}
            assert value(m[new], "fabricd_is_leader") == 1
            assert all(value(x, "fabricd_lease_term") > term for x in m.values())
            for n in survivors:
                assert value(m[n], "fabricd_leader_changes") > value(before[n], "fabricd_leader_changes")
            assert value(m[new], "fabricd_lease_events", event="elections_won") >= 1
            assert value(m[new], "fabricd_replica_lag_records", replica=leader) >= 1  # dead: acks nothing
            other = next(n for n in survivors if n != new)
            assert value(m[new], "fabricd_replica_lag_records", replica=other) == 0
            return m

        poll(failed_over, 30, "the failover in the metrics")
    finally:
        cluster.stop()
    assert not cluster.leftovers
