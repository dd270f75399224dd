"""A term store whose writes fail (a full disk): the daemon stays up as a follower, says why once,
shows it in its cluster status, and recovers when writes work again."""

from __future__ import annotations

import errno
import logging

import pytest

from fabricd.cluster.controller import ClusterController
from fabricd.cluster.lease import FOLLOWER, LeaseConfig, LeaseElection, LeaseRenew, Send, LeaseAck
from fabricd.cluster.term_store import FileTermStore, MemoryTermStore, TermStoreError
from fabricd.config import load_node_config

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

CFG = LeaseConfig()
L = CFG.lease_duration_s


class FullDiskStore(MemoryTermStore):
    """Fails every save while ``full``; counts the attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True
        self.attempts = 0

    def save(self, term: int, voted_for: str | None) -> None:
        self.attempts += 1
        if self.full:
            raise TermStoreError("/st/term.json", "No space left on device")
        super().save(term, voted_for)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "cannot persist" in r.getMessage()]


def test_single_node_stays_follower_logs_once_retries_rarely_and_recovers(caplog):
    caplog.set_level(logging.INFO, logger="fabricd.cluster.lease")
    store = FullDiskStore()
    node = LeaseElection("a", ["a"], CFG, store, lambda: (0, 0), now=0.0)
    ticks = 0
    t = 0.0
    while t < 30.0:                      # 30 s of 50 ms ticks: 600 ticks
        node.tick(t)
        assert not node.is_leader(t) and node.role == FOLLOWER
        t += 0.05
        ticks += 1
    assert node.status()["store_error"] == "No space left on device"
    assert node.term == 0
    # one attempt per lease_duration, not one per tick
    assert 1 <= store.attempts <= 30.0 / L + 1 < ticks
    assert len(_errors(caplog)) == 1, "logged once (then at most once a minute)"
    store.full = False
    for _ in range(int(2 * L / 0.05) + 2):
        node.tick(t)
        t += 0.05
    assert node.is_leader(t - 0.05) and node.term == 1
    assert node.status()["store_error"] is None
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_log_line_repeats_at_most_once_a_minute(caplog):
    caplog.set_level(logging.INFO, logger="fabricd.cluster.lease")
    node = LeaseElection("a", ["a"], CFG, FullDiskStore(), lambda: (0, 0), now=0.0)
    t = 0.0
    while t < 150.0:
        node.tick(t)
        t += 0.1
    assert len(_errors(caplog)) == 3  # at 0, ~60 and ~120 s


def test_follower_does_not_ack_a_term_it_cannot_persist_and_recovers_by_probing():
    store = FullDiskStore()
    node = LeaseElection("b", ["a", "b", "c"], CFG, store, lambda: (0, 0), now=0.0)
    acts = node.on_message(LeaseRenew(term=3, leader="a", renew_id=1), now=1.0)
    assert not [a for a in acts if isinstance(a, Send) and isinstance(a.msg, LeaseAck)]
    assert node.term == 0 and node.status()["store_error"]
    store.full = False
    node.tick(1.0 + L)                   # the probe re-saves the current term
    assert node.status()["store_error"] is None
    acts = node.on_message(LeaseRenew(term=3, leader="a", renew_id=2), now=1.0 + L + 0.1)
    assert [a.msg.ok for a in acts if isinstance(a, Send) and isinstance(a.msg, LeaseAck)] == [True]
    assert node.term == 3 and store.load() == (3, None)


def _cfg(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text(f'[node]\nid = "a"\ncontrol = "tcp://127.0.0.1:0"\nstate_dir = "{tmp_path / "st"}"\n')
    return load_node_config(p)


def test_controller_reports_degraded_and_recovers(tmp_path, monkeypatch):
    real_save = FileTermStore.save
    full = {"on": True}

    def save(self, term, voted_for):
        if full["on"]:
            raise TermStoreError(self.path, f"cannot save term {term}: {OSError(errno.ENOSPC, 'No space left on device')}")
        real_save(self, term, voted_for)

    monkeypatch.setattr(FileTermStore, "save", save)
    c = ClusterController(_cfg(tmp_path), now=0.0)
    try:
        t = 0.0
        for _ in range(100):
            c.tick(t, telemetry=dict, roles=dict)   # never raises
            t += 0.05
        assert not c.is_leader(t)
        degraded = c.status(t)["degraded"]
        assert degraded.startswith("term store: ") and "No space left on device" in degraded
        full["on"] = False
        for _ in range(100):
            c.tick(t, telemetry=dict, roles=dict)
            t += 0.05
        assert c.is_leader(t - 0.05) and c.status(t)["degraded"] is None
    finally:
        c.log.close()
