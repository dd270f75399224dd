"""Trainer progress as one compact ``job_progress`` record per job: monotone, equal on replay,
readable next to the old per-rank ``trainer_progress`` records, and small at 1,024 ranks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fabricd.cluster.log import CheckpointLog
from fabricd.cluster.log_files import encode_record
from fabricd.cluster.progress import progress_record
from fabricd.cluster.state import MAX_PROGRESS_AHEAD, FabricState, Record, StateError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


class Writer:
    def __init__(self, state: FabricState | None = None) -> None:
        self.state = state or FabricState()
        self.records: list[Record] = []

    def __call__(self, kind: str, /, **data) -> Record:
        rec = Record(1, self.state.last_seq + 1, kind, data)
        self.state.apply(rec)
        self.records.append(rec)
        return rec


def submitted(dp_size: int = 4, fingerprint: str = "f") -> Writer:
    w = Writer()
    w("job_submitted", job="j", spec_toml="t", spec_origin="o", fingerprint=fingerprint, dp_size=dp_size)
    return w


def test_floor_and_ranks_ahead_give_next_step_and_never_go_back() -> None:
    w = submitted()
    w("job_progress", job="j", floor=5, ahead=[[1, 0, 9], [2, 3, 7]])
    st = w.state
    assert [st.next_step("j", dp, mp) for dp, mp in [(0, 0), (1, 0), (2, 3), (3, 1)]] == [5, 9, 7, 5]
    w("job_progress", job="j", floor=3, ahead=[[1, 0, 4]])  # lower: ignored, not an error
    assert (st.next_step("j", 0), st.next_step("j", 1)) == (5, 9)
    w("job_progress", job="j", floor=8, ahead=[])
    assert (st.next_step("j", 0), st.next_step("j", 1), st.next_step("j", 2, 3)) == (8, 9, 8)
    assert st.progress["j"] == {"1/0": 9}  # the floor caught up with 2/3: its entry is gone
    assert st.floor_step("j") == 8


def test_old_per_rank_records_still_apply_alongside_the_new_kind() -> None:
    w = submitted()
    w("trainer_progress", job="j", dp_rank=1, mp_rank=0, next_step=4)
    w("trainer_progress", job="j", dp_rank=2, mp_rank=0, next_step=12)
    w("job_progress", job="j", floor=6, ahead=[])
    w("trainer_progress", job="j", dp_rank=3, mp_rank=0, next_step=5)  # below the floor: no effect
    st = w.state
    assert [st.next_step("j", r) for r in range(4)] == [6, 6, 12, 6]
    assert st.progress["j"] == {"2/0": 12}


def test_replay_from_the_log_and_from_a_snapshot_is_equal(tmp_path: Path) -> None:
    w = submitted(dp_size=16)
    rng = random.Random(3)
    for step in range(1, 60):
        if rng.random() < 0.3:
            w("trainer_progress", job="j", dp_rank=rng.randrange(16), mp_rank=0, next_step=step + 3)
        w("job_progress", job="j", floor=step // 2,
          ahead=[[rng.randrange(16), rng.randrange(2), step + rng.randrange(5)] for _ in range(rng.randrange(4))])
    log = CheckpointLog(tmp_path / "log", fsync=False)
    log.open()
    log.append(w.records)
    log.close()
    assert log.open() == w.state
    log.compact(w.state)
    log.close()
    assert log.open() == w.state
    assert FabricState.from_snapshot(w.state.to_snapshot()) == w.state
    # snapshots written before the floor existed still load
    old = w.state.to_snapshot()
    del old["progress_floor"]
    assert FabricState.from_snapshot(old).floor_step("j") == 0


def test_resubmitting_with_a_new_fingerprint_forgets_the_floor() -> None:
    w = submitted()
    w("job_progress", job="j", floor=5, ahead=[])
    w("job_cancelled", job="j", reason="")
    w("job_submitted", job="j", spec_toml="t", spec_origin="o", fingerprint="f", dp_size=4)
    assert w.state.next_step("j", 0) == 5  # same fingerprint: progress kept
    w("job_cancelled", job="j", reason="")
    w("job_submitted", job="j", spec_toml="t", spec_origin="o", fingerprint="g", dp_size=4)
    assert w.state.next_step("j", 0) == 0


@pytest.mark.parametrize("data, why", [
    ({"job": "j", "floor": 1, "ahead": [[4, 0, 3]]}, "dp_size"),
    ({"job": "j", "floor": 1, "ahead": [[0, 0]]}, "ahead"),
    ({"job": "j", "floor": 1, "ahead": [[0, -1, 3]]}, "ahead"),
    ({"job": "j", "floor": 1, "ahead": [[0, True, 3]]}, "ahead"),
    ({"job": "j", "floor": 1, "ahead": [[0, 0, 3]] * (MAX_PROGRESS_AHEAD + 1)}, f"length <= {MAX_PROGRESS_AHEAD}"),
    ({"job": "j", "floor": 1 << 41, "ahead": []}, f"floor = {1 << 41}: expected `int` <= {(1 << 40) + 1}"),
    ({"job": "j", "floor": -1, "ahead": []}, "floor"),
    ({"job": "j", "floor": 1, "ahead": "x"}, "ahead"),
    ({"job": "k", "floor": 1, "ahead": []}, "not an active job"),
])
def test_malformed_progress_records_are_refused_and_change_nothing(data, why) -> None:
    w = submitted()
    w("job_progress", job="j", floor=1, ahead=[[1, 0, 4]])
    before = w.state.to_snapshot()
    with pytest.raises(StateError, match=why):
        w.state.apply(Record(1, w.state.last_seq + 1, "job_progress", data))
    assert w.state.to_snapshot() == before


def test_the_floor_rises_only_when_every_rank_is_known() -> None:
    w = submitted(dp_size=2)
    st = w.state
    # 1/1 unknown: the floor stays; the others are one step past what is recorded: not news enough
    assert progress_record(st, "j", {(0, 0): 1, (0, 1): 1, (1, 0): 1}, mp_size=2) is None
    assert progress_record(st, "j", {(0, 0): 3, (0, 1): 1, (1, 0): 1}, mp_size=2) == \
        {"job": "j", "floor": 0, "ahead": [[0, 0, 3]]}
    assert progress_record(st, "j", {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 4}, mp_size=2) == \
        {"job": "j", "floor": 3, "ahead": []}  # 1/1 is only one step ahead of the floor
    assert progress_record(st, "j", {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 4}, mp_size=None) == \
        {"job": "j", "floor": 0, "ahead": [[1, 1, 4], [0, 0, 3], [0, 1, 3], [1, 0, 3]]}
    w("job_progress", job="j", floor=0, ahead=[[1, 1, 9]])
    # a rank recorded earlier but silent now counts with what the state holds for it
    assert progress_record(st, "j", {(0, 0): 5, (0, 1): 6, (1, 0): 7}, mp_size=2) == \
        {"job": "j", "floor": 5, "ahead": [[1, 0, 7]]}
    # ranks outside the job are ignored
    assert progress_record(st, "j", {(2, 0): 50, (0, 2): 50}, mp_size=2) is None


def test_the_list_of_ranks_ahead_is_bounded_and_takes_the_furthest_first() -> None:
    w = submitted(dp_size=128)
    reported = {(dp, 0): 10 + dp for dp in range(127)}  # rank 127 never reported: the floor stays
    data = progress_record(w.state, "j", reported, mp_size=1)
    assert len(data["ahead"]) == MAX_PROGRESS_AHEAD and data["floor"] == 0
    assert data["ahead"][0] == [126, 0, 136] and data["ahead"][-1] == [95, 0, 105]
    w("job_progress", **data)
    again = progress_record(w.state, "j", reported, mp_size=1)
    assert again["ahead"][0] == [94, 0, 104]  # the next ones, not the same again


@pytest.mark.parametrize("skew", [0, 1])
def test_steady_state_costs_under_1_kib_of_log_per_step_at_1024_ranks(skew: int) -> None:
    """128 DP × 8 MP ranks advance one step per tick; with ``skew`` some reports lag a step."""
    dp_size, mp_size = 128, 8
    w = submitted(dp_size=dp_size)
    rng = random.Random(skew)
    written = []
    for step in range(1, 201):
        reported = {(dp, mp): step - (rng.randrange(skew + 1)) for dp in range(dp_size) for mp in range(mp_size)}
        data = progress_record(w.state, "j", reported, mp_size=mp_size)
        if data is not None:
            written.append(len(encode_record(w("job_progress", **data))))
        assert all(w.state.next_step("j", dp, mp) <= s for (dp, mp), s in reported.items())
    steady = written[20:]
    assert steady and max(steady) <= 1024 and sum(steady) / len(steady) <= 200
    assert w.state.floor_step("j") >= 200 - skew - 1  # the floor kept up
    assert len(w.state.progress["j"]) <= MAX_PROGRESS_AHEAD


def test_the_leader_records_one_compact_record_per_job_whatever_the_ranks(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fabricd.cluster.telemetry import NodeTelemetry, RoleView
    from fabricd.leadership import Leadership

    from .test_cluster_controller import ClusterController, _cfg

    c = ClusterController(_cfg(tmp_path), now=0.0)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    c.propose([("job_submitted", {"job": "j", "spec_toml": "x", "spec_origin": "/x.toml", "fingerprint": "",
                                  "dp_size": 64})], 0.01)
    proposed: list[list] = []

    def propose(entries, now):
        proposed.append(entries)
        c.propose(entries, now)
        return True

    runtime = SimpleNamespace(spec=SimpleNamespace(topology=SimpleNamespace(mp_size=4)), state="indexing")
    lead = Leadership(c.cfg, c, {"j": runtime}, propose)
    me = c.members.members["a"]
    for step in range(1, 6):
        me.roles = {f"j/constructor/{g}": RoleView(trainers=[(dp, mp, step) for dp in range(8 * g, 8 * g + 8)
                                                             for mp in range(4)]) for g in range(8)}
        lead._record_progress(0.02 + step / 100)
    assert [[kind for kind, _ in entries] for entries in proposed] == [["job_progress"]] * 5
    assert proposed[-1][0][1] == {"job": "j", "floor": 5, "ahead": []}
    assert c.state.next_step("j", 63, 3) == 5 and c.state.progress["j"] == {}
    c.log.close()
