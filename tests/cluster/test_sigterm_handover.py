"""SIGTERM drains a leader: it releases the lease, so a shadow leads without waiting out the
lease, and it exits cleanly. Three real daemons with a long lease (8 s) make the difference
plain: without the release no shadow could be elected for about a lease duration after the
leader's last renewal; with it, the next term is won well within half of one."""

from __future__ import annotations

import signal
import time

import pytest

from fabricd.localnode import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

LEASE_S = 8.0


def test_sigterm_leader_hands_over_before_its_lease_runs_out(tmp_path, lease_backend):
    cluster = LocalCluster(tmp_path, nodes=3, lease_duration_s=LEASE_S, renew_deadline_s=5.0, retry_period_s=0.3,
                           cluster_extra=lease_backend)
    try:
        cluster.start()
        old = cluster.leader(timeout=60)
        term = cluster.status(old)["term"]
        others = [n for n in cluster.daemons if n != old]
        for n in others:  # both shadows follow it (their grants to it are fresh)
            deadline = time.monotonic() + 10
            while (st := cluster.status(n)) is None or st["leader"] != old:
                assert time.monotonic() < deadline, st
                time.sleep(0.1)
        stopped_at = time.monotonic()
        cluster.kill(old, signal.SIGTERM)
        new = cluster.leader(timeout=3 * LEASE_S, exclude=(old,))
        took = time.monotonic() - stopped_at
        assert took < LEASE_S / 2, f"{new} led {took:.1f}s after the SIGTERM: the lease was waited out"
        st = cluster.status(new)
        assert new in others
        if lease_backend:  # etcd: the term is the new leader key's create revision
            assert st["term"] > term
        else:
            assert st["term"] == term + 1  # one election, won by a shadow
        proc = cluster.daemons[old].proc
        assert proc is not None and proc.wait(30) == 0
        log = cluster.daemons[old].log_path.read_text()
        assert "lease released" in log
    finally:
        cluster.stop()
    assert cluster.leftovers == []
