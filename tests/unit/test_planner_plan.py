"""The planner end to end: world-size independence, resume at another DP size, plan shape."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from fabricd.errors import PlanError
from fabricd.planner import CostModel, MixtureSchedule, Planner, StepPlan, build_units

NAMES = ["captions", "longdocs", "code"]


def _sources(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        build_units("captions", rng.integers(8, 200, 300), rng.integers(0, 3, 300), max_seq_len=256, long_samples="truncate", image_tokens=16),
        build_units("longdocs", np.minimum(5000, (64 * (1 + rng.pareto(1.1, 40))).astype(int)), np.zeros(40, int), max_seq_len=1024, long_samples="split", image_tokens=16),
        build_units("code", rng.integers(20, 900, 150), np.zeros(150, int), max_seq_len=256, long_samples="truncate", image_tokens=16),
    ]


def _planner(method: str = "lpt", B: int = 64, micro_tokens: int = 2048, **kw) -> Planner:
    sched = kw.pop("schedule", None) or MixtureSchedule(
        "linear", [(0, {"captions": 0.6, "longdocs": 0.1, "code": 0.3}), (20, {"captions": 0.2, "longdocs": 0.5, "code": 0.3})], NAMES
    )
    return Planner(
        seed=kw.pop("seed", 3), samples_per_step=B, micro_batch_tokens=micro_tokens, schedule=sched,
        cost=CostModel(attention=1.0, linear=256.0, per_image=100.0), method=method, sources=kw.pop("sources", None) or _sources(),
    )


def _units(p: StepPlan) -> collections.Counter:
    return collections.Counter(zip(p.source.tolist(), p.sample_id.tolist(), p.piece.tolist()))


@pytest.mark.unit
@pytest.mark.parametrize("method", ["lpt", "kk"])
def test_step_units_do_not_depend_on_dp_size(method: str) -> None:
    planner = _planner(method)
    for step in (0, 7, 25):
        ref = _units(planner.plan(step, 1))
        assert sum(ref.values()) == 64
        for dp in (3, 8, 64):
            assert _units(planner.plan(step, dp)) == ref, (step, dp)


@pytest.mark.unit
def test_resume_with_other_dp_size_loses_and_repeats_nothing() -> None:
    k, n = 6, 14
    a = _planner()
    b = _planner()
    all8: collections.Counter = collections.Counter()
    mixed: collections.Counter = collections.Counter()
    for s in range(n):
        all8 += _units(a.plan(s, 8))
        mixed += _units(b.plan(s, 8 if s < k else 5))
    assert mixed == all8
    assert sum(all8.values()) == 64 * n


@pytest.mark.unit
def test_plan_shape_sorting_and_micro_batches() -> None:
    planner = _planner(micro_tokens=1024)
    p = planner.plan(11, 8)
    assert len(p) == 64 and p.dp_size == 8 and p.step == 11
    assert p.rank.dtype == np.int32 and p.sample_id.dtype == np.int64 and p.cost.dtype == np.float64
    keys = np.stack([p.rank, p.micro]).T.tolist()
    assert keys == sorted(keys)
    assert p.num_micro.shape == (8,) and (p.num_micro >= 1).all()
    for r in range(8):
        mbs = p.micro_batches(r)
        assert len(mbs) == p.num_micro[r]
        assert all(len(m) > 0 and p.tokens[m].sum() <= 1024 for m in mbs)
        assert np.array_equal(np.concatenate(mbs), np.flatnonzero(p.rank == r))
    np.testing.assert_allclose(p.rank_costs().sum(), p.cost.sum())
    sub = p.for_ranks([2, 5])
    assert set(sub.rank.tolist()) == {2, 5} and len(sub) == int(((p.rank == 2) | (p.rank == 5)).sum())
    assert np.array_equal(sub.num_micro, p.num_micro)
    # the rows carry the units' true metadata
    srcs = _sources()
    for i in range(len(p)):
        su = srcs[p.source[i]]
        hit = np.flatnonzero((su.sample_id == p.sample_id[i]) & (su.piece == p.piece[i]))
        assert hit.size == 1 and su.tokens[hit[0]] == p.tokens[i]


FIELDS = ("rank", "micro", "source", "sample_id", "piece", "tokens", "cost")


def _masked(p: StepPlan, ranks) -> dict[str, np.ndarray]:
    """The rows of ``ranks`` by a mask over every row, in row order: what for_ranks must return."""
    keep = np.isin(p.rank, np.asarray(list(ranks), dtype=np.int64))
    return {f: getattr(p, f)[keep] for f in FIELDS}


@pytest.mark.unit
def test_for_ranks_returns_exactly_the_rows_of_those_ranks() -> None:
    """Any subset of ranks, given in any order, with repeats, with ranks that hold no rows, or
    none: the same rows as a mask over the whole plan, in row order. A plan whose rows are not in
    rank order (only a hand-made one) gets the same answer."""
    p = _planner().plan(3, 16)
    held = ~np.isin(p.rank, [4, 9])  # a plan where ranks 4 and 9 hold no rows (a composed step can)
    holey = StepPlan(step=p.step, dp_size=p.dp_size, num_micro=p.num_micro, **{f: getattr(p, f)[held] for f in FIELDS})
    rng = np.random.default_rng(5)
    shuffled = rng.permutation(len(p))
    unsorted = StepPlan(step=p.step, dp_size=p.dp_size, num_micro=p.num_micro,
                        **{f: getattr(p, f)[shuffled] for f in FIELDS})
    asks = [[], [0], [15], [4], [9, 4, 9], [5, 5, 2], list(range(16)), list(range(8, 12)),
            *(rng.integers(0, 16, k).tolist() for k in (1, 3, 7, 20))]
    for plan in (p, holey, unsorted):
        for ranks in asks:
            sub = plan.for_ranks(iter(ranks))  # any iterable, consumed once
            want = _masked(plan, ranks)
            for f in FIELDS:
                assert np.array_equal(getattr(sub, f), want[f]) and getattr(sub, f).dtype == want[f].dtype, (ranks, f)
            assert np.array_equal(sub.num_micro, plan.num_micro) and sub.step == plan.step
    with pytest.raises(ValueError, match="ranks must lie in"):
        p.for_ranks([3, 16])
    with pytest.raises(ValueError, match="ranks must lie in"):
        p.for_ranks([-1])


@pytest.mark.unit
def test_plan_is_deterministic_and_balanced() -> None:
    a = _planner().plan(9, 4)
    b = _planner().plan(9, 4)
    for f in ("rank", "micro", "source", "sample_id", "piece", "tokens", "cost", "num_micro"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    rc = a.rank_costs()
    assert rc.max() <= 1.05 * max(rc.mean(), a.cost.max())


@pytest.mark.unit
def test_planner_refuses_impossible_plans() -> None:
    with pytest.raises(PlanError, match="dp_size 65"):
        _planner().plan(0, 65)
    with pytest.raises(PlanError, match="'longdocs'"):
        _planner(micro_tokens=512)
    sources = _sources()
    sources[2] = build_units("code", np.zeros(0, int), np.zeros(0, int), max_seq_len=256, long_samples="truncate", image_tokens=16)
    with pytest.raises(PlanError, match="'code'"):
        _planner(sources=sources)
    with pytest.raises(ValueError, match="'nope'"):
        _planner(method="nope")


@pytest.mark.unit
def test_plan_at_max_step_works_and_past_it_is_refused_naming_the_bound() -> None:
    from fabric_client.limits import MAX_STEP

    p = _planner()
    far = p.plan(MAX_STEP, 8)
    assert len(far) == 64 and far.step == MAX_STEP
    assert _units(far) == _units(p.plan(MAX_STEP, 3))  # still independent of the world size
    with pytest.raises(PlanError, match="MAX_STEP"):
        p.plan(MAX_STEP + 1, 8)
