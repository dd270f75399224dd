"""The replicated fabric state: records applied in order, snapshots, validation."""

from __future__ import annotations

import json

import pytest

from fabricd.cluster.state import RECORD_KINDS, RECORD_SCHEMAS, FabricState, MemberEntry, Record, StateError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def job(name: str = "j", fingerprint: str = "fp1", dp_size: int = 4) -> dict:
    return {"job": name, "spec_toml": "[job]\nname='j'\n", "spec_origin": "/etc/j.toml",
            "fingerprint": fingerprint, "dp_size": dp_size}


class Writer:
    """Numbers records the way the leader does."""

    def __init__(self, state: FabricState, term: int = 1) -> None:
        self.state, self.term = state, term

    def __call__(self, record_kind: str, /, **data) -> Record:
        rec = Record(self.term, self.state.last_seq + 1, record_kind, data)
        self.state.apply(rec)
        return rec


def populated() -> tuple[FabricState, list[Record]]:
    st = FabricState()
    w = Writer(st)
    recs = [
        w("member_seen", node="a", endpoint="tcp://a:7700"),
        w("job_submitted", **job()),
        w("role_assigned", role_id="j/sl/0", job="j", kind="source_loader", node="a", extra={"source": "web"}),
        w("sample_skipped", job="j", source="web", sample_id=17, piece=0, step=3, reason="bad utf-8"),
        w("trainer_progress", job="j", dp_rank=1, mp_rank=0, next_step=5),
        w("job_submitted", **job("k", dp_size=2), extra={"owner": "me"}),
        w("role_assigned", role_id="k/c/0", job="k", kind="constructor", node="b", extra={"ranks": [0, 1]}),
        w("role_released", role_id="k/c/0", reason=""),
        w("job_cancelled", job="k", reason="operator"),
    ]
    return st, recs


def test_every_kind_has_a_schema() -> None:
    assert set(RECORD_KINDS) == set(RECORD_SCHEMAS)


def test_apply_builds_the_expected_state() -> None:
    st, _ = populated()
    assert st.last_seq == 9 and st.last_term == 1
    assert st.jobs["j"].dp_size == 4 and not st.jobs["j"].cancelled
    assert st.jobs["k"].cancelled and st.jobs["k"].cancel_reason == "operator"
    assert st.jobs["k"].extra == {"owner": "me"}
    assert st.skipped["j"] == {("web", 17, 0, 3)}
    assert st.next_step("j", 1) == 5 and st.next_step("j", 0) == 0
    assert set(st.roles) == {"j/sl/0"} and st.roles["j/sl/0"].node == "a"
    assert st.members == {"a": MemberEntry(endpoint="tcp://a:7700", term=1)}


def test_snapshot_round_trip_through_json() -> None:
    st, recs = populated()
    snap = st.to_snapshot()
    back = FabricState.from_snapshot(json.loads(json.dumps(snap)))
    assert back == st
    assert back.to_snapshot() == snap
    # Replaying the same records from scratch gives the same snapshot (determinism).
    again = FabricState()
    for rec in recs:
        again.apply(Record.from_dict(json.loads(json.dumps(rec.to_dict()))))
    assert again.to_snapshot() == snap


def test_progress_is_monotone() -> None:
    st, _ = populated()
    w = Writer(st)
    w("trainer_progress", job="j", dp_rank=1, mp_rank=0, next_step=9)
    w("trainer_progress", job="j", dp_rank=1, mp_rank=0, next_step=4)  # late report: ignored
    assert st.next_step("j", 1) == 9
    assert st.last_seq == 11  # the record still counts


def test_trainer_host_latest_declaration_wins_and_survives_snapshots() -> None:
    st, _ = populated()
    w = Writer(st)
    w("trainer_host", job="j", dp_rank=2, mp_rank=0, host="gpu-7", declared_ms=2000)
    w("trainer_host", job="j", dp_rank=2, mp_rank=0, host="gpu-3", declared_ms=1000)  # older: ignored
    assert st.trainer_host("j", 2) == ("gpu-7", 2000)
    w("trainer_host", job="j", dp_rank=2, mp_rank=0, host="gpu-9", declared_ms=3000)  # the trainer moved
    assert st.trainer_host("j", 2) == ("gpu-9", 3000) and st.trainer_host("j", 1) is None
    back = FabricState.from_snapshot(json.loads(json.dumps(st.to_snapshot())))
    assert back == st and back.trainer_host("j", 2) == ("gpu-9", 3000)
    with pytest.raises(StateError, match="dp_rank = 4 >= dp_size 4"):
        w("trainer_host", job="j", dp_rank=4, mp_rank=0, host="gpu-1", declared_ms=1)
    with pytest.raises(StateError, match="host = ''"):
        w("trainer_host", job="j", dp_rank=0, mp_rank=0, host="", declared_ms=1)


def test_snapshot_from_before_trainer_hosts_and_pools_still_loads() -> None:
    snap = populated()[0].to_snapshot()
    del snap["hosts"], snap["pools"]
    back = FabricState.from_snapshot(snap)
    assert back.hosts == {} and back.pools == {}


def test_pool_sizes_are_recorded_and_reset_by_a_new_submission() -> None:
    st, _ = populated()
    w = Writer(st)
    w("pool_resized", job="j", source="web", workers=3)
    w("pool_resized", job="j", source="web", workers=2)
    assert st.pools == {"j": {"web": 2}}
    assert FabricState.from_snapshot(json.loads(json.dumps(st.to_snapshot()))) == st
    with pytest.raises(StateError, match="workers = 0"):
        w("pool_resized", job="j", source="web", workers=0)
    with pytest.raises(StateError, match="not an active job"):
        w("pool_resized", job="k", source="web", workers=2)
    w("job_cancelled", job="j", reason="")
    w("job_submitted", **job())
    assert "j" not in st.pools


def test_seq_gap_and_term_regression_are_refused_without_change() -> None:
    st, _ = populated()
    before = st.to_snapshot()
    with pytest.raises(StateError, match="does not follow"):
        st.apply(Record(1, 11, "member_seen", {"node": "b", "endpoint": "e"}))
    with pytest.raises(StateError, match="does not follow"):
        st.apply(Record(1, 9, "member_seen", {"node": "b", "endpoint": "e"}))
    st.apply(Record(3, 10, "member_seen", {"node": "b", "endpoint": "e"}))
    with pytest.raises(StateError, match="term 2 < last term 3"):
        st.apply(Record(2, 11, "member_seen", {"node": "c", "endpoint": "e"}))
    assert st.last_seq == 10 and st.last_term == 3
    assert set(st.members) == {"a", "b"}
    assert before["jobs"] == st.to_snapshot()["jobs"]


@pytest.mark.parametrize("kind, data, match", [
    ("job_exploded", {"job": "j"}, "unknown kind"),
    ("member_seen", {"node": "b"}, "missing required field `endpoint`"),
    ("member_seen", {"node": "b", "endpoint": "e", "color": 1}, "unknown field `color`"),
    ("member_seen", {"node": "", "endpoint": "e"}, "node = ''"),
    ("trainer_progress", {"job": "j", "dp_rank": True, "mp_rank": 0, "next_step": 1}, "dp_rank = True"),
    ("trainer_progress", {"job": "j", "dp_rank": 0, "mp_rank": 0, "next_step": -1}, "next_step = -1"),
    ("trainer_progress", {"job": "j", "dp_rank": 0, "mp_rank": 0, "next_step": 2**70}, "next_step = 1180591620717411303424"),
    ("sample_skipped", {"job": "j", "source": "s", "sample_id": 1, "piece": 0, "step": -1, "reason": ""}, "step = -1"),
    ("pool_resized", {"job": "j", "source": "s", "workers": 10**6}, "workers = 1000000"),
    ("trainer_progress", {"job": "j", "dp_rank": 4, "mp_rank": 0, "next_step": 1}, "dp_rank = 4 >= dp_size 4"),
    ("trainer_progress", {"job": "k", "dp_rank": 0, "mp_rank": 0, "next_step": 1}, "not an active job"),
    ("sample_skipped", {"job": "nope", "source": "s", "sample_id": 1, "piece": 0, "step": 0, "reason": ""},
     "not an active job"),
    ("role_released", {"role_id": "nope", "reason": ""}, "not assigned"),
    ("role_assigned", {"role_id": "r", "job": "j", "kind": "constructor", "node": "a", "extra": []}, "extra"),
    ("job_submitted", job(), "already active"),
    ("job_submitted", job("z", dp_size=0), "dp_size"),
])
def test_invalid_records_are_refused(kind: str, data: dict, match: str) -> None:
    st, _ = populated()
    before = st.to_snapshot()
    with pytest.raises(StateError, match=match):
        st.apply(Record(1, st.last_seq + 1, kind, data))
    assert st.to_snapshot() == before


def test_resubmitting_a_cancelled_job_keeps_history_only_for_the_same_fingerprint() -> None:
    st, _ = populated()
    w = Writer(st)
    w("job_cancelled", job="j", reason="")
    w("job_submitted", **job())
    assert st.skipped["j"] == {("web", 17, 0, 3)} and st.next_step("j", 1) == 5
    w("job_cancelled", job="j", reason="")
    w("job_submitted", **job(fingerprint="fp2"))
    assert st.skipped["j"] == set() and st.next_step("j", 1) == 0


@pytest.mark.parametrize("bad", [
    None, {"term": 1, "seq": 0, "kind": "member_seen", "data": {}},
    {"term": -1, "seq": 1, "kind": "member_seen", "data": {}}, {"term": 1, "seq": 1, "kind": "x"},
])
def test_malformed_record_dicts(bad) -> None:
    with pytest.raises(StateError):
        Record.from_dict(bad)


def test_malformed_snapshot() -> None:
    snap = populated()[0].to_snapshot()
    with pytest.raises(StateError, match="version"):
        FabricState.from_snapshot({**snap, "version": 99})
    with pytest.raises(StateError, match="malformed"):
        FabricState.from_snapshot({k: v for k, v in snap.items() if k != "jobs"})
    bad_job = json.loads(json.dumps(snap))
    bad_job["jobs"]["j"]["dp_size"] = "4"
    with pytest.raises(StateError, match=r"malformed snapshot: Expected `int`, got `str` - at `\$.jobs\['j'\].dp_size`"):
        FabricState.from_snapshot(bad_job)
    bad_role = json.loads(json.dumps(snap))
    del bad_role["roles"]["j/sl/0"]["node"]
    with pytest.raises(StateError, match=r"missing required field `node` - at `\$.roles\['j/sl/0'\]`"):
        FabricState.from_snapshot(bad_role)
    for not_a_snapshot in (None, [], "x", {"version": 1}):
        with pytest.raises(StateError, match="malformed snapshot"):
            FabricState.from_snapshot(not_a_snapshot)


def test_snapshot_entries_keep_their_json_layout() -> None:
    """Snapshot files written while the entries were dicts read back the same (and vice versa)."""
    snap = populated()[0].to_snapshot()
    assert snap["jobs"]["k"] == {"spec_toml": "[job]\nname='j'\n", "spec_origin": "/etc/j.toml", "fingerprint": "fp1",
                                 "dp_size": 2, "extra": {"owner": "me"}, "cancelled": True,
                                 "cancel_reason": "operator", "term": 1, "seq": 6}
    assert snap["roles"] == {"j/sl/0": {"job": "j", "kind": "source_loader", "node": "a", "extra": {"source": "web"},
                                        "term": 1, "seq": 3}}
    assert snap["members"] == {"a": {"endpoint": "tcp://a:7700", "term": 1}}
    # roles in snapshots written before they carried their seq: seq 0 (counts as committed)
    del snap["roles"]["j/sl/0"]["seq"]
    assert FabricState.from_snapshot(snap).roles["j/sl/0"].seq == 0


def test_cancelling_replaces_the_entry_and_leaves_copies_alone() -> None:
    st, _ = populated()
    copy, entry = st.copy(), st.jobs["j"]
    Writer(st)("job_cancelled", job="j", reason="done")
    assert st.jobs["j"].cancelled and st.jobs["j"].cancel_reason == "done"
    assert not entry.cancelled and not copy.jobs["j"].cancelled and copy.is_active("j")
