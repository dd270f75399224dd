"""ClusterController on one node (a cluster of one), with its real log and term store on disk."""

from __future__ import annotations

import errno
import os

import pytest

from fabricd.cluster.controller import ClusterController, NotLeader
from fabricd.cluster.log import LogFull
from fabricd.cluster.telemetry import NodeTelemetry
from fabricd.config import load_node_config

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def _cfg(tmp_path, extra=""):
    p = tmp_path / "n.toml"
    p.write_text(f'[node]\nid = "a"\ncontrol = "tcp://127.0.0.1:0"\nstate_dir = "{tmp_path / "st"}"\n{extra}')
    return load_node_config(p)


def _job(name="j"):
    return ("job_submitted", {"job": name, "spec_toml": "x", "spec_origin": "/x.toml", "fingerprint": "", "dp_size": 2})


def test_one_node_elects_itself_and_commits_at_once(tmp_path):
    c = ClusterController(_cfg(tmp_path), now=0.0)
    assert not c.is_leader(0.0)
    assert c.tick(0.0, telemetry=NodeTelemetry, roles=dict) == []  # no peers: nothing to send
    assert c.is_leader(0.01) and c.leader == "a" and c.term == 1
    c.propose([_job()], 0.02)
    assert "j" in c.state.jobs and c.commit_seq == c.state.last_seq == 2  # member_seen + job
    c.log.close()
    again = ClusterController(_cfg(tmp_path), now=100.0)
    assert "j" in again.state.jobs, "decisions survive a restart"
    again.tick(100.0, telemetry=NodeTelemetry, roles=dict)
    assert again.term == 2, "a restarted node leads in a new term"
    again.log.close()


def test_a_follower_cannot_decide(tmp_path):
    cfg = _cfg(tmp_path, '\n[cluster]\n[[cluster.peers]]\nid = "a"\ncontrol = "tcp://127.0.0.1:1"\n'
                         '[[cluster.peers]]\nid = "b"\ncontrol = "tcp://127.0.0.1:2"\n'
                         '[[cluster.peers]]\nid = "c"\ncontrol = "tcp://127.0.0.1:3"\n')
    c = ClusterController(cfg, now=0.0)
    out = c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    assert {p for p, _ in out} == {"b", "c"}, "heartbeats go to every peer"
    with pytest.raises(NotLeader):
        c.propose([_job()], 0.1)
    c.log.close()


def test_full_log_disk_makes_the_leader_step_down(tmp_path, monkeypatch):
    c = ClusterController(_cfg(tmp_path), now=0.0)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    assert c.is_leader(0.1)
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(LogFull):
        c.propose([_job()], 0.2)
    assert not c.is_leader(0.3) and "j" not in c.state.jobs
    assert c.counters["log_full"] == 1
    monkeypatch.setattr(os, "write", real_write)
    c.log.close()


def test_replication_from_an_older_term_than_the_lease_has_seen_is_fenced(tmp_path):
    from fabricd.cluster.replication import LogAppend
    from fabricd.cluster.term_store import FileTermStore

    cfg = _cfg(tmp_path, '\n[cluster]\n[[cluster.peers]]\nid = "a"\ncontrol = "tcp://127.0.0.1:1"\n'
                         '[[cluster.peers]]\nid = "b"\ncontrol = "tcp://127.0.0.1:2"\n'
                         '[[cluster.peers]]\nid = "c"\ncontrol = "tcp://127.0.0.1:3"\n')
    (tmp_path / "st").mkdir()
    FileTermStore(tmp_path / "st" / "term.json").save(5, None)  # this node has seen term 5 (its log has nothing)
    c = ClusterController(cfg, now=0.0)
    stale = LogAppend(term=3, leader="b", prev_seq=0, records=[
        {"term": 3, "seq": 1, "kind": "member_seen", "data": {"node": "b", "endpoint": "tcp://x:1"}}],
        commit_seq=1, prev_term=0)
    assert c.on_peer(stale, 0.1) == []
    assert c.state.last_seq == 0 and c.log.last_position == (0, 0), "a stale leader rewrote the log"
    assert c.counters["stale_term_rejected"] == 1
    c.log.close()
