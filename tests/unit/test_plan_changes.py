"""Plan changes at runtime: parsing, validation against the spec, and segment planning that loses
and repeats nothing (per-source sampling without replacement continues across a change, with and
without composition)."""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import numpy as np
import pytest

from fabricd.cluster.controller import SYNC_SLACK_S
from fabricd.cluster.records import PlanChange, check_data
from fabricd.errors import ConfigError
from fabricd.job import JobRuntime, NoRoles, build_planner
from fabricd.leadership import PLAN_CHANGE_SLACK_S
from fabricd.plan_changes import apply_change, make_change, parse_point, parse_set, plan_segments
from fabricd.planner.segments import SegmentedPlanner, first_changeable, window_bounds
from fabricd.planner.sequence import feistel_permute

pytestmark = pytest.mark.unit


def units_by_source(planner, steps, dp=2):
    got = collections.defaultdict(list)
    names = [s.name for s in planner.sources]
    for s in steps:
        p = planner.plan(s, dp)
        for src, sid, piece in zip(p.source.tolist(), p.sample_id.tolist(), p.piece.tolist()):
            got[names[src]].append((sid, piece))
    return got


def first_draws(planner, name, count):
    """The units of the first ``count`` draws of source ``name`` in the unchanged job's sequence."""
    seq = planner.sequence
    j = list(seq.schedule.sources).index(name)
    units = next(u for u in planner.sources if u.name == name)
    n = len(units)
    k = np.arange(count, dtype=np.int64)
    idx = feistel_permute(k % n, n, seed=seq.seed, source=j, epoch=k // n)
    return sorted(zip(units.sample_id[idx].tolist(), units.piece[idx].tolist()))


def ready_runtime(spec, tmp_path, **kw):
    """A JobRuntime of ``spec`` with no roles, past its indexing (at most 30 s)."""
    runtime = JobRuntime(spec, index_dir=tmp_path / "idx", directory=NoRoles(), **kw)
    deadline = time.monotonic() + 30
    while runtime.state == "indexing" and time.monotonic() < deadline:
        time.sleep(0.05)
    return runtime


def ask_plan(runtime, step, timeout_s: float = 30.0):
    """``runtime``'s answer for ``step`` (ranks 0 and 1), asked again while it is being planned."""
    from fabric_client import protocol

    deadline = time.monotonic() + timeout_s
    req = protocol.PlanRequest(job=runtime.spec.name, step=step, ranks=[0, 1])
    reply, _ = runtime.plan(req)
    while isinstance(reply, protocol.ErrorReply) and "is being planned" in reply.reason \
            and time.monotonic() < deadline:
        time.sleep(0.02)
        reply, _ = runtime.plan(req)
    return reply


# -- parsing and validation -------------------------------------------------------------------


def test_parse_set_and_point_read_toml_values_or_bare_strings():
    assert parse_set("mixture.weights.code=0.3").value == 0.3
    assert parse_set("mixture.kind=piecewise").value == "piecewise"
    assert parse_set("buckets.long.max_seq_len = 16384").value == 16384
    p = parse_point("step=500,weights={code=0.5,ocr=1}")
    assert p.step == 500 and p.weights == {"code": 0.5, "ocr": 1.0}
    with pytest.raises(ConfigError, match="at_step"):
        make_change("j", -1, ["mixture.kind=linear"])
    for bad in ("mixture.weights.code", "=3", "x="):
        with pytest.raises(ConfigError, match="PATH=VALUE"):
            parse_set(bad)
    for bad in ("step=5", "step=5,weights={a='x'}", "weights={a=1}", "step=-1,weights={a=1}"):
        with pytest.raises(ConfigError, match="--add-point"):
            parse_point(bad)


def test_plan_change_is_a_typed_record():
    change = make_change("plain", 12, ["mixture.weights.code=0.5"], ["step=20,weights={ocr=1}"],
                         origin="online:odm", term=3)
    data = {"job": "plain", "at_step": 12, "sets": [{"path": "mixture.weights.code", "value": 0.5}],
            "points": [{"step": 20, "weights": {"ocr": 1.0}}], "origin": "online:odm", "term": 3}
    assert check_data("plan_changed", data) == change
    with pytest.raises(ValueError, match="at_step"):
        check_data("plan_changed", {**data, "at_step": -1})


def test_weight_share_is_a_fraction_of_the_mix_and_others_keep_their_proportions(specs):
    spec = specs["plain"]
    new = apply_change(spec, make_change("plain", 10, ["mixture.weights.code=0.5"]))
    assert new.mixture.kind == "linear"
    step, weights = new.mixture.points[-1]
    w = dict(weights)
    assert step == 10 and w["code"] == 0.5
    # after step 4 the spec holds captions 0.2, interleaved 0.2, longdocs 0.3, code 0.2, ocr 0.1
    assert w["longdocs"] == pytest.approx(0.3 * 0.5 / 0.8) and w["ocr"] == pytest.approx(0.1 * 0.5 / 0.8)
    assert new.mixture.points[:2] == spec.mixture.points  # the points before stay


def test_changes_are_validated_like_a_submitted_spec(specs):
    spec = specs["plain"]
    cases = [
        (["batch.samples_per_step=3"], "cannot be changed at runtime; changeable: mixture.weights.SOURCE"),
        (["mixture.weights.nope=0.5"], "not a source of this job"),
        (["mixture.weights.code=2"], r"share of the mix in \[0, 1\]"),
        (["mixture.weights.code=0.7", "mixture.weights.ocr=0.6"], "sum to 1.3 > 1"),
        (["mixture.kind=cubic"], "expected one of constant, piecewise, linear"),
        (["buckets.long.max_seq_len=65536"], "exceeds batch.micro_batch_tokens"),
        (["buckets.long.max_seq_len=1"], "must be >= 2"),
        (["buckets.nope.max_seq_len=128"], "no bucket named 'nope'"),
        ([], "nothing to change"),
    ]
    for sets, reason in cases:
        with pytest.raises(ConfigError, match=reason) as e:
            apply_change(spec, make_change("plain", 10, sets))
        assert str(e.value).startswith("plan change at step 10: ")
    with pytest.raises(ConfigError, match="at or after the change's step 10"):
        apply_change(spec, make_change("plain", 10, points=["step=5,weights={code=1}"]))


def test_constant_from_a_step_holds_the_weights_there(specs):
    spec = specs["plain"]
    new = apply_change(spec, make_change("plain", 2, ["mixture.kind=constant"]))
    assert new.mixture.kind == "piecewise" and [s for s, _ in new.mixture.points] == [0, 2]
    w = dict(new.mixture.points[-1][1])
    assert w["captions"] == pytest.approx(0.25) and w["longdocs"] == pytest.approx(0.2)  # halfway along the ramp


def test_segments_apply_changes_in_step_order(specs):
    spec = specs["plain"]
    late = make_change("plain", 20, ["mixture.weights.ocr=0.5"])
    early = make_change("plain", 10, ["buckets.long.max_seq_len=4096"])
    segs = plan_segments(spec, [late, early])
    assert [s.start for s in segs] == [0, 10, 20]
    assert segs[1].spec.bucket("long").max_seq_len == 4096 and segs[2].spec.bucket("long").max_seq_len == 4096
    assert dict(segs[2].spec.mixture.points[-1][1])["ocr"] == 0.5


# -- segment planning -------------------------------------------------------------------------


def test_first_changeable_step_rounds_the_frontier_up_to_a_window_boundary():
    assert first_changeable((0,), 1, 7) == 7
    assert first_changeable((0,), 4, 8) == 8 and first_changeable((0,), 4, 9) == 12
    # a segment at 10 restarts the windows: [8, 10) is its predecessor's last (short) window
    assert window_bounds((0, 10), 4, 9) == (8, 10) and first_changeable((0, 10), 4, 9) == 10
    assert first_changeable((0, 10), 4, 11) == 14


@pytest.mark.parametrize("kind", ["plain", "composed"])
def test_a_weights_change_loses_and_repeats_nothing(specs, kind):
    spec, indexes = specs[kind], specs["indexes"]
    base = build_planner(spec, indexes)
    at, end = 9, 30
    change = make_change(spec.name, at, ["mixture.weights.code=0.6"])
    planner = build_planner(spec, indexes, plan_changes=[change])
    assert isinstance(planner, SegmentedPlanner) and planner.starts == (0, at)
    for s in range(at):  # the steps before the change are exactly the unchanged plan's
        a, b = base.plan(s, 2), planner.plan(s, 2)
        assert np.array_equal(a.sample_id, b.sample_id) and np.array_equal(a.rank, b.rank), s
    got = units_by_source(planner, range(end))
    counts = {n: len(v) for n, v in got.items()}
    assert sum(counts.values()) == end * 16
    for name, units in got.items():
        # the units are the source's first draws of the one sequence: nothing lost, nothing repeated
        assert sorted(units) == first_draws(base, name, len(units)), name
        size = len(next(u for u in base.sources if u.name == name))
        if len(units) <= size:
            assert len(set(units)) == len(units), name
    after = units_by_source(planner, range(at, end))
    share = len(after["code"]) / ((end - at) * 16)
    assert share == pytest.approx(0.6, abs=0.02)  # composition keeps the mix exact over a window
    before = units_by_source(base, range(at, end))
    assert len(before["code"]) / ((end - at) * 16) < 0.3


@pytest.mark.parametrize("kind", ["plain", "composed"])
@pytest.mark.parametrize("schedule", ["piecewise", "linear"])
def test_a_token_budget_holds_across_mixture_points(specs, kind, schedule):
    """Under ``tokens_per_step`` every piece of the mixture draws its own units per step: after a
    point that moves the weight from long documents to short captions, steps still hold the
    budget (one draw count for the whole schedule gave steps far short of it), and the cut at
    the point loses and repeats nothing."""
    spec, indexes = specs[kind], specs["indexes"]
    budget, at, end = 24_000, 8, 24
    # piecewise: the mix jumps at ``at``; linear: it moves over [0, at), then holds
    points = ((0, (("longdocs", 0.8), ("captions", 0.2))), (at, (("longdocs", 0.05), ("captions", 0.95))))
    spec = dataclasses.replace(spec, batch=dataclasses.replace(spec.batch, samples_per_step=0, tokens_per_step=budget),
                               mixture=dataclasses.replace(spec.mixture, kind=schedule, points=points))
    planner = build_planner(spec, indexes)
    assert isinstance(planner, SegmentedPlanner) and planner.starts == (0, at)
    first, second = planner.planners
    assert second.samples_per_step > 2 * first.samples_per_step  # captions are far shorter than long documents
    window = planner.window
    for lo, hi in ((0, at), (at, end)):
        tokens = [int(planner.plan(s, 2).tokens.sum()) for s in range(lo, hi)]
        # over whole windows a piece's steps hold the budget (a linear piece: on average)
        assert abs(np.mean(tokens) - budget) < 0.2 * budget, (lo, tokens)
        assert (hi - lo) % window == 0
    got = units_by_source(planner, range(end))
    for name, units in got.items():
        assert sorted(units) == first_draws(first, name, len(units)), name
    assert set(got) == {"longdocs", "captions"}
    # every reader of the segments cuts the plan at the same steps
    assert [seg.start for seg in plan_segments(spec, ())] == [0, at]


def test_composed_windows_restart_at_a_change_and_stay_within_their_segment(specs):
    spec, indexes = specs["composed"], specs["indexes"]
    at = 10  # not a window boundary of the unchanged grid (windows of 4: [8, 12))
    planner = build_planner(spec, indexes, plan_changes=[make_change(spec.name, at, ["mixture.weights.ocr=0.5"])])
    first, second = planner.planners
    assert (first.start_step, first.end_step, second.start_step) == (0, at, at)
    # the units of [8, 10) are the draws of steps 8 and 9, recomposed over a window of two steps
    drawn = collections.Counter()
    for s in (8, 9):
        src, unit = first.sequence.step_units(s)
        drawn.update(zip((first._offsets[src] + unit).tolist()))
    composed = collections.Counter()
    for s in (8, 9):
        composed.update(zip(first.composed_rows(s, 2).tolist()))
    assert drawn == composed
    with pytest.raises(Exception, match="outside this plan segment"):
        first.plan(at, 2)


def test_a_bucket_change_gives_its_sources_new_units_and_a_fresh_shuffle(specs):
    spec, indexes = specs["plain"], specs["indexes"]
    at = 6
    planner = build_planner(spec, indexes, plan_changes=[make_change(spec.name, at, ["buckets.long.max_seq_len=512",
                                                                                      "buckets.long.long_samples=split"])])
    after = planner.segment(at)
    longdocs = next(u for u in after.sources if u.name == "longdocs")
    assert int(longdocs.tokens.max()) <= 512 and len(longdocs) > len(next(u for u in planner.sources
                                                                              if u.name == "longdocs"))
    j = list(after.sequence.schedule.sources).index("longdocs")
    assert int(after.sequence.start_draws[j]) == 0 and after.sequence.source_keys[j] != j
    code = list(after.sequence.schedule.sources).index("code")
    assert after.sequence.source_keys[code] == code and int(after.sequence.start_draws[code]) > 0
    plan = planner.plan(at + 1, 2)
    assert int(plan.tokens[plan.source == j].max(initial=0)) <= 512


def test_plan_changes_through_the_log_state_survive_a_snapshot():
    from fabricd.cluster.state import FabricState, Record

    st = FabricState()
    st.apply(Record(1, 1, "job_submitted", {"job": "j", "spec_toml": "x", "spec_origin": "/x", "fingerprint": "",
                                            "dp_size": 1}))
    change = make_change("j", 5, ["mixture.kind=piecewise"], origin="operator:alice", term=1)
    from msgspec import to_builtins
    st.apply(Record(1, 2, "plan_changed", to_builtins(change)))
    assert st.committed_plan_changes("j", 1) == () and st.committed_plan_changes("j", 2) == (change,)
    again = FabricState.from_snapshot(st.to_snapshot())
    assert again.committed_plan_changes("j", 2) == (change,) and again.to_snapshot() == st.to_snapshot()
    with pytest.raises(Exception, match="term = 1 is not the record's term 2"):
        st.copy().apply(Record(2, 3, "plan_changed", to_builtins(change)))
    # resubmitting the job drops its changes unless the submission keeps them
    kept = st.copy()
    kept.apply(Record(1, 3, "job_cancelled", {"job": "j", "reason": ""}))
    kept.apply(Record(1, 4, "job_submitted", {"job": "j", "spec_toml": "x", "spec_origin": "/x", "fingerprint": "",
                                              "dp_size": 2, "extra": {"keep_plan_changes": True}}))
    assert kept.committed_plan_changes("j", 4) == (change,)
    st.apply(Record(1, 3, "job_cancelled", {"job": "j", "reason": ""}))
    st.apply(Record(1, 4, "job_submitted", {"job": "j", "spec_toml": "x", "spec_origin": "/x", "fingerprint": "",
                                            "dp_size": 1}))
    assert st.committed_plan_changes("j", 4) == ()
    assert isinstance(change, PlanChange)


def test_a_change_appended_and_not_yet_committed_holds_its_steps_on_every_daemon_that_has_it(specs, tmp_path):
    """A daemon whose log holds a plan change not yet committed (the leader died before telling
    it the commit, say: a new leader commits what a majority holds) must not answer a plan of
    that change's steps from the plan without it: they wait, earlier steps do not."""
    from msgspec import to_builtins

    from fabric_client import protocol
    from fabricd.cluster.state import FabricState, Record

    st = FabricState()
    st.apply(Record(1, 1, "job_submitted", {"job": "j", "spec_toml": "x", "spec_origin": "/x", "fingerprint": "",
                                            "dp_size": 1}))
    st.apply(Record(1, 2, "plan_changed", to_builtins(make_change("j", 9, ["mixture.kind=piecewise"], term=1))))
    st.apply(Record(1, 3, "plan_changed", to_builtins(make_change("j", 14, ["mixture.kind=linear"], term=1))))
    assert st.uncommitted_change_from("j", 1) == 9
    assert st.uncommitted_change_from("j", 2) == 14
    assert st.uncommitted_change_from("j", 3) is None and st.uncommitted_change_from("other", 0) is None

    runtime = ready_runtime(specs["plain"], tmp_path)
    ask = lambda step: ask_plan(runtime, step)  # noqa: E731

    runtime.hold_from = 9
    assert isinstance(ask(8), protocol.PlanReply)
    held = ask(9)
    assert isinstance(held, protocol.ErrorReply) and held.code == protocol.ErrorCode.NOT_READY
    assert "waits for the plan change at step 9 to be committed" in held.reason
    # a reason the constructor asks again for soon (PLAN_RETRY_S), not after its PLAN_TIMEOUT_S
    from fabricd.roles.constructor import _PLANNING
    assert _PLANNING.match(held.reason).group(1) == "9"
    assert isinstance(ask(30), protocol.ErrorReply)
    runtime.hold_from = None  # committed (and applied) or dropped by a new leader: served again
    assert isinstance(ask(9), protocol.PlanReply)
    runtime.close()


# -- the leader's entry point -------------------------------------------------------------------


def test_propose_plan_change_records_a_typed_change_or_refuses_with_a_reason(specs, tmp_path):
    from fabricd.cluster.telemetry import NodeTelemetry, RoleView
    from fabricd.leadership import Leadership
    from fabricd.plan_control import PlanChangeRefused

    from .test_cluster_controller import ClusterController, _cfg

    spec = specs["composed"]  # dp 2, prefetch 2, windows of 4
    cfg = _cfg(tmp_path)
    c = ClusterController(cfg, now=0.0)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    c.propose([("job_submitted", {"job": spec.name, "spec_toml": spec.text, "spec_origin": spec.file,
                                  "fingerprint": "", "dp_size": 2})], 0.01)
    runtime = ready_runtime(spec, tmp_path)
    assert runtime.state == "ready", runtime.error

    def propose(entries, now):
        c.propose(entries, now)
        return True

    lead = Leadership(cfg, c, {spec.name: runtime}, propose)
    want = make_change(spec.name, 0, ["mixture.weights.code=0.5"])
    refused = lead.propose_plan_change(spec.name, want, origin="online:odm", now=0.1)
    # nothing consumed yet: steps [0, 3) may be built (prefetch 2); windows of 4 round it up to 4
    assert isinstance(refused, PlanChangeRefused) and refused.code == "too_late" and refused.frontier == 4
    assert "the first step still changeable is 4" in refused.reason

    c.members.members["a"].roles = {f"{spec.name}/constructor/0": RoleView(trainers=[(0, 0, 6), (1, 0, 5)])}
    late = lead.propose_plan_change(spec.name, msgspec_replace(want, at_step=8), origin="online:odm", now=0.1)
    assert late.code == "too_late" and late.frontier == 12  # a trainer at step 6 (reported, not recorded yet)
    bad = lead.propose_plan_change(spec.name, make_change(spec.name, 12, ["mixture.weights.code=3"]),
                                   origin="online:odm", now=0.1)
    assert bad.code == "invalid" and "mixture.weights.code = 3" in bad.reason
    huge = lead.propose_plan_change(spec.name, msgspec_replace(want, at_step=1 << 50), origin="online:odm", now=0.1)
    assert huge.code == "invalid" and "at_step" in huge.reason
    unknown = lead.propose_plan_change("nope", want, origin="online:odm", now=0.1)
    assert unknown.code == "unknown_job"

    got = lead.propose_plan_change(spec.name, msgspec_replace(want, at_step=13), origin="online:odm", now=0.1)
    assert isinstance(got, PlanChange)
    assert (got.job, got.at_step, got.origin, got.term) == (spec.name, 13, "online:odm", c.term)
    assert c.state.plan_changes[spec.name][-1].change == got and c.commit_seq == c.state.last_seq
    # the runtime plans with it once it is handed the committed changes
    runtime.update_plan(c.state.committed_plan_changes(spec.name, c.commit_seq))
    deadline = time.monotonic() + 30
    while runtime._replanned is None and time.monotonic() < deadline:
        time.sleep(0.05)
    runtime._swap_planner()
    assert runtime.planner.starts == (0, 13)
    # trainers moving at 5 steps/s: the frontier keeps clear of what they reach before the change
    # is in effect everywhere or nowhere: two heartbeats of stale positions, then the lease and a
    # replication beat a daemon that never got the change may go on answering, and the slack
    cfg = lead.cfg
    horizon = 2 * cfg.heartbeat_s + cfg.cluster.lease_duration_s + SYNC_SLACK_S + PLAN_CHANGE_SLACK_S
    assert lead.change_horizon_s() == pytest.approx(horizon)
    lead._note_positions(0.0, {spec.name: {(0, 0): 6}})
    lead._note_positions(2.0, {spec.name: {(0, 0): 16}})
    margin = math.ceil(5 * horizon)
    assert lead.advance_margin(spec.name, runtime, 2.0) == margin
    moving = lead.propose_plan_change(spec.name, msgspec_replace(want, at_step=20), origin="x", now=0.2)
    assert moving.code == "too_late" and moving.frontier >= 6 + 2 + 1 + margin
    assert lead.propose_plan_change(spec.name, want, origin="x", now=1e9).code == "not_leader"  # lease long gone
    assert lead.counters["plan_changes_recorded"] == 1 and lead.counters["plan_changes_refused"] == 7
    runtime.close()
    c.log.close()


def msgspec_replace(change, **kw):
    import msgspec

    return msgspec.structs.replace(change, **kw)


def test_a_runtime_holds_steps_from_a_committed_change_until_it_replans(specs, tmp_path):
    from fabric_client import protocol

    spec = specs["plain"]
    change = make_change(spec.name, 7, ["mixture.weights.ocr=0.5"], origin="operator:alice", term=1)
    # committed before the runtime exists: it plans with it from the start
    early = ready_runtime(spec, tmp_path, plan_changes=[change])
    runtime = ready_runtime(spec, tmp_path)

    assert early.planner.starts == (0, 7)
    frames = lambda rt: rt.plan(protocol.PlanRequest(job=spec.name, step=8, ranks=[0, 1]))[1]  # noqa: E731
    before, six = ask_plan(runtime, 8), ask_plan(runtime, 6)  # planned the old way, and cached
    old = frames(runtime)
    runtime.update_plan([change])
    assert runtime._replanning_from == 7 and runtime._planned_with == ()  # swapped only by plan()
    held, _ = runtime.plan(protocol.PlanRequest(job=spec.name, step=8, ranks=[0, 1]))
    # held until the new planner is in, then planned afresh: never the cached old plan of step 8
    assert isinstance(held, protocol.ErrorReply) and held.reason == "step 8 is being planned"
    assert ask_plan(runtime, 6).num_micro == six.num_micro == ask_plan(early, 6).num_micro  # before the change: as it was
    after = ask_plan(runtime, 8)
    assert isinstance(after, protocol.PlanReply) and runtime.planner.starts == (0, 7)
    assert runtime.status()["plan_changes"][0]["at_step"] == 7
    want = ask_plan(early, 8)
    assert after.rows == want.rows and after.num_micro == want.num_micro and before.rows == 16 == after.rows
    assert all(np.array_equal(a, b) for a, b in zip(frames(runtime), frames(early)))
    assert not all(np.array_equal(a, b) for a, b in zip(frames(runtime), old))
    runtime.close()
    early.close()
