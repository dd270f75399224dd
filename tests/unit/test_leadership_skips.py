"""The leader's pending skip reports: each checked on its own, kept until recorded, bounded."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fabric_client.limits import MAX_STEP
from fabricd import leadership
from fabricd.leadership import Leadership
from fabricd.planner import build_units

from .test_cluster_controller import ClusterController, _cfg, _job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def _runtime(state: str = "ready") -> SimpleNamespace:
    # source "web": 4 samples, sample 2 is long enough to be split into 3 pieces
    units = build_units("web", np.array([10, 10, 250, 10]), np.zeros(4, np.int64), max_seq_len=100,
                        long_samples="split", image_tokens=0)
    return SimpleNamespace(state=state, planner=SimpleNamespace(sources=[units], sources_at=lambda _step: [units]),
                           indexes={"web": SimpleNamespace(num_samples=4)})


def _skip(**kw) -> dict:
    return {"job": "j", "source": "web", "sample_id": 1, "piece": 0, "step": 3, "reason": "503", **kw}


@pytest.fixture
def leader(tmp_path):
    cfg = _cfg(tmp_path)
    c = ClusterController(cfg, now=0.0)
    c.tick(0.0, telemetry=dict, roles=dict)
    c.propose([_job()], 0.01)
    outcome = {"accept": True, "calls": 0}

    def propose(entries, now):
        outcome["calls"] += 1
        if not outcome["accept"]:
            return False
        c.propose(entries, now)
        return True

    jobs = {"j": _runtime()}
    yield Leadership(cfg, c, jobs, propose), c, outcome, jobs
    c.log.close()


def test_bad_reports_are_dropped_and_counted_the_good_ones_recorded(leader):
    lead, c, _, _ = leader
    bad = [_skip(step=-1), _skip(step=MAX_STEP + 1), _skip(source="nope"), _skip(sample_id=4), _skip(piece=1),
           _skip(job="other"), _skip(sample_id=2, piece=3), _skip(step="3")]
    good = [_skip(), _skip(sample_id=2, piece=2, step=MAX_STEP)]
    for r in bad[:4] + good[:1] + bad[4:] + good[1:]:
        assert lead.add_skip(r)
    lead._record_skips(1.0)
    assert c.state.skipped["j"] == {("web", 1, 0, 3), ("web", 2, 2, MAX_STEP)}
    assert lead.counters["skips_invalid"] == len(bad) and lead.counters["skips_recorded"] == 2
    assert lead.pending_skips == []


def test_a_refused_proposal_keeps_the_reports_pending(leader):
    lead, c, outcome, _ = leader
    outcome["accept"] = False
    lead.add_skip(_skip())
    lead.add_skip(_skip())  # a re-sent report is not queued twice
    assert lead.pending_units("j", 3) == {("web", 1, 0)}  # plan replies name it pending
    lead._record_skips(1.0)
    lead._record_skips(1.1)
    assert outcome["calls"] == 2 and len(lead.pending_skips) == 1 and c.state.skipped["j"] == set()
    assert lead.pending_units("j", 3) == {("web", 1, 0)} and lead.pending_units("j", 4) == set()
    outcome["accept"] = True
    lead._record_skips(1.2)
    assert c.state.skipped["j"] == {("web", 1, 0, 3)} and lead.pending_skips == []
    assert lead.pending_units("j", 3) == set()  # in the log now (the log's uncommitted tail says the rest)
    lead.add_skip(_skip(reason="again"))  # already recorded: nothing proposed
    calls = outcome["calls"]
    lead._record_skips(1.3)
    assert outcome["calls"] == calls and lead.pending_skips == []


def test_reports_wait_while_the_job_indexes(leader):
    lead, c, _, jobs = leader
    jobs["j"] = _runtime(state="indexing")
    lead.add_skip(_skip())
    lead._record_skips(1.0)
    assert len(lead.pending_skips) == 1 and c.state.skipped["j"] == set()
    jobs["j"] = _runtime()
    lead._record_skips(1.1)
    assert c.state.skipped["j"] == {("web", 1, 0, 3)}


def test_pending_reports_are_bounded_and_the_overflow_counted(leader, monkeypatch):
    lead, c, _, _ = leader
    monkeypatch.setattr(leadership, "MAX_PENDING_SKIPS", 3)
    taken = [lead.add_skip(_skip(step=s)) for s in range(5)]
    assert taken == [True, True, True, False, False] and lead.counters["skips_overflowed"] == 2
    lead._record_skips(1.0)
    assert len(c.state.skipped["j"]) == 3
    assert lead.add_skip(_skip(step=4))  # room again: the re-sent report is taken


def test_the_daemon_tells_committed_skip_records_from_the_uncommitted_tail(leader):
    from fabricd.daemon import Daemon

    _, c, _, _ = leader
    rec = {"job": "j", "source": "web", "piece": 0, "step": 3, "reason": "503"}
    c.propose([("sample_skipped", {**rec, "sample_id": 1})], 1.0)
    committed_at = c.commit_seq
    c.propose([("sample_skipped", {**rec, "sample_id": 2})], 1.1)
    daemon = SimpleNamespace(cluster=c, _skip_tails={})
    key, committed, uncommitted = Daemon.skip_records(daemon, "j")
    assert committed == {("web", 1, 0, 3), ("web", 2, 0, 3)} and uncommitted == ()
    c.commit_seq = committed_at  # as a leader that has not heard the acknowledgements yet
    key2, committed, uncommitted = Daemon.skip_records(daemon, "j")
    assert key2 != key and committed == {("web", 1, 0, 3)} and uncommitted == {("web", 2, 0, 3)}
    c.log.read = None  # the tail is read from the log once per change, not per plan request
    assert Daemon.skip_records(daemon, "j") == (key2, committed, uncommitted)


def test_a_report_for_a_step_a_trainer_of_its_rank_is_past_is_refused(leader):
    """Another constructor delivered the batch with the unit (the report comes late, from behind a
    partition, or re-sent): recording it now would make the log contradict the trainer's batch."""
    from fabricd.cluster.telemetry import RoleView

    lead, c, _, _ = leader
    member = next(iter(c.members.members.values()))
    member.roles = {"j/constructor/0": RoleView(endpoint="tcp://x:1", kind="constructor", alive=True,
                                                trainers=[(0, 0, 5), (0, 1, 4), (1, 0, 3)])}
    for r in (_skip(step=3, dp_rank=0), _skip(step=4, dp_rank=0, sample_id=0), _skip(step=3, dp_rank=1, sample_id=3),
              _skip(step=5, dp_rank=0, sample_id=2, piece=1)):
        lead.add_skip(r)
    lead._record_skips(1.0)
    # dp 0 is at step 5 (mp 0): steps 3 and 4 were delivered; dp 1 is at step 3, mid-step or not begun
    assert c.state.skipped["j"] == {("web", 3, 0, 3), ("web", 2, 1, 5)}
    assert lead.counters["skips_refused_delivered"] == 2 and lead.pending_skips == []
