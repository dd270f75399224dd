"""Plan changes at scale (online mixing logs one every few steps, thousands per run): the segment
planners are reused, built lazily and kept few (``fabricd.job.SegmentPlans``), the segment specs
memoized and summarised (``fabricd.plan_changes.plan_segments``), and the plans are exactly those
of the eager build that rebuilt every segment from the full specs."""

from __future__ import annotations

import bisect
import hashlib
import time

import msgspec
import numpy as np
import pytest

import fabricd.plan_changes as plan_changes_mod
from fabricd.cluster.records import MixturePoint, PlanChange
from fabricd.job import NoRoles, SegmentPlans, _planner, _segment_schedule, build_planner, source_units
from fabricd.plan_changes import apply_change, make_change, plan_segments
from fabricd.planner.segments import SegmentedPlanner, carry_draws


pytestmark = pytest.mark.unit

SOURCES = ("captions", "interleaved", "longdocs", "code", "ocr")




def eager_segments(spec, indexes, changes):
    """The eager build (before segments were reused): every change applied to the full spec in
    effect before it, every segment's planner built in order, each carrying its draws from the
    built planner before it. The reference the reusing build must equal."""
    segs = [(0, spec)]
    for c in sorted(changes, key=lambda c: c.at_step):
        effective = apply_change(segs[-1][1], c)
        if c.at_step == segs[-1][0]:
            segs[-1] = (c.at_step, effective)
        else:
            segs.append((c.at_step, effective))
    built, planners = {}, []
    for i, (start, sp) in enumerate(segs):
        units = []
        for s in sp.sources:
            b = sp.bucket(s.bucket)
            key = (s.name, b.max_seq_len, b.long_samples)
            if key not in built:
                built[key] = source_units(s.name, indexes[s.name], spec.images, max_seq_len=b.max_seq_len,
                                          long_samples=b.long_samples)
            units.append(built[key])
        end = segs[i + 1][0] if i + 1 < len(segs) else None
        draws, keys = carry_draws(planners[-1], start, units) if planners else ((), ())
        schedule, per_step = _segment_schedule(sp, units, start)
        planners.append(_planner(sp, units, schedule, per_step, (), start=start, end=end, start_draws=draws,
                                 source_keys=keys))
    return planners


def plan_hash(plan) -> str:
    h = hashlib.sha256()
    for a in (plan.rank, plan.micro, plan.source, plan.sample_id, plan.piece, plan.tokens, plan.cost, plan.num_micro):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def eager_hashes(planners, steps, dps=(2, 3)):
    starts = [p.start_step for p in planners]
    return {(s, dp): plan_hash(planners[bisect.bisect_right(starts, s) - 1].plan(s, dp)) for s in steps for dp in dps}


def many_changes(name, count, start=40, every=3):
    """Online-mixing-like changes: a mixture point at each change's step, weights varying."""
    return [make_change(name, start + every * i,
                        points=[f"step={start + every * i},weights={{captions={1 + i % 3},code={1 + i % 5},"
                                f"ocr=1,longdocs={1 + i % 2},interleaved=1}}"]) for i in range(count)]


def mixed_changes(name):
    """A weight share, a bucket context change (new units, a fresh key), points ahead, a kind
    change between two points, then online-like points."""
    return [make_change(name, 7, ["mixture.weights.code=0.5"]),
            make_change(name, 13, ["buckets.long.max_seq_len=512"]),
            make_change(name, 21, points=["step=21,weights={captions=1,ocr=2}", "step=30,weights={code=1,longdocs=1}"]),
            make_change(name, 26, ["mixture.kind=linear"]),
            *many_changes(name, 20)]


STEPS = [0, 3, 6, 7, 8, 12, 13, 14, 20, 21, 25, 26, 27, 29, 30, 31, 39, 40, 41, 43, 60, 97, 98, 99, 100, 130]


@pytest.mark.parametrize("kind", ["plain", "composed"])
def test_plans_are_those_of_the_eager_build(specs, kind):
    spec, indexes = specs[kind], specs["indexes"]
    changes = mixed_changes(spec.name)
    want = eager_hashes(eager_segments(spec, indexes, changes), STEPS)

    # a fresh build, planned in step order and backwards, keeping one planner (every other rebuilt)
    plans = SegmentPlans(spec, indexes, keep=1)
    planner = plans.planner(changes)
    assert isinstance(planner, SegmentedPlanner) and planner.starts == tuple(
        sorted({0, *(c.at_step for c in changes)}))
    assert plans.counters["planners_built"] == 0  # nothing built before a step is planned
    for order in (STEPS, STEPS[::-1]):
        got = {(s, dp): plan_hash(planner.plan(s, dp)) for s in order for dp in (2, 3)}
        assert got == want
    assert len(plans._planners) == 1

    # grown one change at a time (each appended), as a runtime sees the log, and out of order
    plans = SegmentPlans(spec, indexes)
    for n in range(1, len(changes) + 1):
        planner = plans.planner(changes[:n], check=True)
        planner.plan(changes[n - 1].at_step, 2)
    assert {k: plan_hash(planner.plan(*k)) for k in want} == want
    late_first = [changes[2], changes[0], *changes[4:], changes[1], changes[3]]  # two inserted before others
    for n in range(1, len(late_first) + 1):
        plans.planner(late_first[:n], check=True)
    assert {k: plan_hash(plans.planner(late_first).plan(*k)) for k in want} == want

    # the one-shot build_planner (expect, plan show) is the same too
    assert {k: plan_hash(build_planner(spec, indexes, plan_changes=changes).plan(*k)) for k in want} == want


def test_segment_specs_stay_small_and_keep_the_weights_from_their_start(specs):
    spec = specs["plain"]
    changes = mixed_changes(spec.name) + many_changes(spec.name, 40, start=200, every=5)
    segments = plan_segments(spec, changes)
    full = [spec]
    for c in sorted(changes, key=lambda c: c.at_step):
        full.append(apply_change(full[-1], c))
    assert len(full[-1].mixture.points) > 60  # every change pins a point: the full spec keeps them all
    assert max(len(seg.spec.mixture.points) for seg in segments) <= 4
    for seg, whole in zip(segments[1:], full[1:]):
        assert seg.spec.mixture.kind == whole.mixture.kind and seg.spec.buckets == whole.buckets
        for step in (seg.start, seg.start + 1, seg.start + 7, seg.start + 100):
            assert plan_changes_mod.weights_at(seg.spec, step) == plan_changes_mod.weights_at(whole, step)
    again = plan_segments(spec, changes + many_changes(spec.name, 1, start=1000))
    assert all(a.spec is b.spec for a, b in zip(segments, again))  # the prefix's specs: the same objects


def _online(name: str, i: int, term: int = 1) -> PlanChange:
    at = 20 * (i + 1)
    return PlanChange(job=name, at_step=at, points=[MixturePoint(step=at, weights={
        s: 1.0 + ((i * 7 + k * 3) % 11) / 10 for k, s in enumerate(SOURCES)})], origin="online:odm", term=term)


def test_the_1001st_change_costs_one_segment(specs, tmp_path, monkeypatch):
    """A runtime with 1000 logged changes (every 20 steps): checking and committing one more
    applies that change alone, computes one segment head and builds one segment planner (plus
    the truncated previous segment's, when its steps are planned again)."""
    from fabricd.cluster.state import FabricState, Record
    from fabricd.job import JobRuntime
    from fabricd.plan_control import check_plan_change

    spec = specs["plain"]
    changes = [_online(spec.name, i) for i in range(1000)]
    runtime = JobRuntime(spec, index_dir=tmp_path / "idx", directory=NoRoles(), plan_changes=changes)
    deadline = time.monotonic() + 60
    while runtime.state == "indexing" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert runtime.state == "ready", runtime.error
    plans = runtime.plans
    assert plans.counters == {"heads_built": 1001, "planners_built": 0}  # lazy: nothing planned yet
    last = 20 * 1000 + 3
    runtime.planner.plan(last, 2)
    assert plans.counters["planners_built"] == 1

    applied = []

    def counting(spec_, change):
        applied.append(change.at_step)
        return apply_change(spec_, change)

    monkeypatch.setattr(plan_changes_mod, "apply_change", counting)
    state = FabricState()
    state.apply(Record(1, 1, "job_submitted", {"job": spec.name, "spec_toml": spec.text, "spec_origin": spec.file,
                                                "fingerprint": "", "dp_size": 2}))
    for seq, c in enumerate(changes, start=2):
        state.apply(Record(1, seq, "plan_changed", msgspec.to_builtins(c)))
    new = _online(spec.name, 1000)
    first, refused = check_plan_change(state, runtime, new, {}, 0)
    assert refused is None and first <= new.at_step
    assert applied == [new.at_step]
    assert plans.counters == {"heads_built": 1002, "planners_built": 2}  # the new segment's, to check it

    runtime.update_plan([*changes, new])
    while runtime._replanned is None and runtime.state == "ready" and time.monotonic() < deadline:
        time.sleep(0.01)
    runtime._swap_planner()
    assert runtime.planner.starts[-2:] == (20 * 1000, new.at_step)
    runtime.planner.plan(new.at_step + 1, 2)  # the planner the check built
    assert plans.counters == {"heads_built": 1002, "planners_built": 2} and applied == [new.at_step]
    runtime.planner.plan(last, 2)  # the previous last segment, now ending at the new change
    assert plans.counters["planners_built"] == 3 and len(plans._planners) <= plans.keep
    # and what it plans is what a build from scratch plans
    fresh = build_planner(spec, runtime.indexes, runtime.dp_history, [*changes, new])
    for s in (5, 20 * 500 + 7, last, new.at_step, new.at_step + 40):
        assert plan_hash(fresh.plan(s, 2)) == plan_hash(runtime.planner.plan(s, 2))
    runtime.close()
