"""Step composition (``compose = "outliers"``): determinism, exactly once per epoch, the delay
bound, the mixture over a window, resume at another DP size, and the balance it buys."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from fabricd.planner import CostModel, MixtureSchedule, Planner, StepPlan, build_units
from fabricd.planner.compose import compose_window, composition_dp, extend_dp_history
from fabricd.planner.plan import draws_for_tokens

NAMES = ["short", "longdocs", "code"]
WEIGHTS = {"short": 0.5, "longdocs": 0.2, "code": 0.3}
COST = CostModel(attention=1.0, linear=2048.0, per_image=0.0)


def _sources(seed: int = 0, n_short: int = 3000, n_long: int = 600):
    rng = np.random.default_rng(seed)
    return [
        build_units("short", rng.integers(8, 200, n_short), np.zeros(n_short, int), max_seq_len=4096,
                    long_samples="truncate", image_tokens=16),
        # Pareto lengths up to 8k tokens: a few documents cost more than a rank's share of a step
        build_units("longdocs", np.minimum(8192, (100 * (1 + rng.pareto(1.1, n_long)))).astype(int),
                    np.zeros(n_long, int), max_seq_len=8192, long_samples="split", image_tokens=16),
        build_units("code", rng.integers(20, 900, 1500), np.zeros(1500, int), max_seq_len=4096,
                    long_samples="truncate", image_tokens=16),
    ]


def _planner(compose: str = "outliers", *, B: int = 256, delay: int = 7, dp_history=(), sources=None,
             schedule=None, size_by_tokens: bool = False, seed: int = 5) -> Planner:
    return Planner(seed=seed, samples_per_step=B, micro_batch_tokens=16384,
                   schedule=schedule or MixtureSchedule("constant", [(0, WEIGHTS)], NAMES),
                   cost=COST, method="lpt", sources=sources or _sources(), compose=compose,
                   max_delay_steps=delay if compose != "none" else 0, size_by_tokens=size_by_tokens,
                   dp_history=dp_history)


def _units(p: StepPlan) -> collections.Counter:
    return collections.Counter(zip(p.source.tolist(), p.sample_id.tolist(), p.piece.tolist()))


def _max_over_mean(p: StepPlan) -> float:
    rc = p.rank_costs()
    return float(rc.max() / rc.mean())


@pytest.mark.unit
def test_composition_is_deterministic_and_independent_of_call_order() -> None:
    a, b = _planner(), _planner()
    steps = [0, 3, 17, 8, 9, 40, 2]
    plans_a = {s: a.plan(s, 8) for s in steps}
    plans_b = {s: b.plan(s, 8) for s in reversed(steps)}
    for s in steps:
        pa, pb = plans_a[s], plans_b[s]
        for f in ("rank", "micro", "source", "sample_id", "piece", "tokens", "num_micro"):
            assert np.array_equal(getattr(pa, f), getattr(pb, f)), (s, f)


@pytest.mark.unit
def test_window_holds_exactly_the_drawn_units_and_no_unit_waits_past_the_bound() -> None:
    delay = 7
    W = delay + 1
    plain, comp = _planner("none"), _planner(delay=delay)
    moved = 0
    for k in range(4):
        drawn: dict[tuple, list[int]] = collections.defaultdict(list)
        got: dict[tuple, list[int]] = collections.defaultdict(list)
        for s in range(k * W, (k + 1) * W):
            for u in _units(plain.plan(s, 8)).elements():
                drawn[u].append(s)
            for u in _units(comp.plan(s, 8)).elements():
                got[u].append(s)
        # the same multiset in every window: the mixture is exact over the window and nothing is lost
        assert {u: len(v) for u, v in drawn.items()} == {u: len(v) for u, v in got.items()}
        for u, steps in got.items():
            for d, g in zip(sorted(drawn[u]), sorted(steps)):
                assert k * W <= g < (k + 1) * W
                assert g - d <= delay
                moved += g != d
    assert moved > 0  # composition did move units


@pytest.mark.unit
def test_every_unit_exactly_once_per_epoch_under_composition() -> None:
    srcs = _sources(n_short=400, n_long=120)
    plain, comp = _planner("none", sources=srcs), _planner(sources=srcs)
    W = comp.window
    steps = 12 * W  # whole windows, several epochs of the small sources
    a, b = collections.Counter(), collections.Counter()
    for s in range(steps):
        a += _units(plain.plan(s, 8))
        b += _units(comp.plan(s, 8))
    assert a == b
    # every unit of source j appeared floor(d/N_j) or ceil(d/N_j) times after d draws of it
    cur = comp.sequence.cursor(steps)
    for seq_j, j in enumerate(comp._seq_to_planner.tolist()):
        d, n = int(cur[seq_j]), len(srcs[j])
        per_unit = collections.Counter()
        for (src, sid, piece), c in b.items():
            if src == j:
                per_unit[(sid, piece)] += c
        assert sum(per_unit.values()) == d
        assert d >= n  # at least one whole epoch of every source
        assert set(per_unit.values()) <= {d // n, -(-d // n)}
        assert len(per_unit) == n  # every unit delivered


@pytest.mark.unit
def test_composition_lowers_the_balance_bound() -> None:
    plain, comp = _planner("none", B=512), _planner(B=512)
    for dp, bound in ((8, 1.05), (32, 1.1)):  # 64 and 16 units per rank
        before = np.mean([_max_over_mean(plain.plan(s, dp)) for s in range(32)])
        after = np.mean([_max_over_mean(comp.plan(s, dp)) for s in range(32)])
        assert before > 1.2, before  # the workload has outliers to begin with
        assert after <= bound, (dp, before, after)


@pytest.mark.unit
def test_resume_at_another_dp_size_with_composition_loses_and_repeats_nothing() -> None:
    W = 8
    reached = 13  # trainers reached step 13 at dp 8, then the job came back at dp 16
    history = extend_dp_history(((0, 8),), new_dp=16, frontier=reached, window=W)
    assert history == ((0, 8), (24, 16))  # a window boundary past the frontier, plus one window
    first, second, plain = _planner(dp_history=((0, 8),)), _planner(dp_history=history), _planner("none")
    end = 6 * W
    want = collections.Counter()
    for s in range(end):
        want += _units(plain.plan(s, 8))
    got = collections.Counter()
    for s in range(reached):
        got += _units(first.plan(s, 8))
    for s in range(reached, end):
        got += _units(second.plan(s, 16))
    assert got == want
    # without the recorded history the resumed job composes its windows for 16 ranks from step
    # 0, and the window the trainers were in is split differently: units repeat or go missing
    naive = collections.Counter()
    fresh = _planner(dp_history=((0, 16),))
    for s in range(reached):
        naive += _units(first.plan(s, 8))
    for s in range(reached, end):
        naive += _units(fresh.plan(s, 16))
    assert naive != want
    # the steps after the change are composed for 16 ranks
    assert second.composition_dp(23, 16) == 8 and second.composition_dp(24, 16) == 16


@pytest.mark.unit
def test_dp_history_rules() -> None:
    assert composition_dp(((0, 4), (16, 8)), 8) == 4
    assert composition_dp(((0, 4), (16, 8)), 16) == 8
    assert extend_dp_history(((0, 4),), new_dp=4, frontier=50, window=16) == ((0, 4),)
    assert extend_dp_history(((0, 4), (64, 8)), new_dp=2, frontier=10, window=16) == ((0, 4), (32, 2))
    with pytest.raises(ValueError):
        _planner(dp_history=((3, 8),))
    with pytest.raises(ValueError):
        _planner(dp_history=((0, 8), (0, 4)))


@pytest.mark.unit
def test_tokens_per_step_draws_and_even_steps() -> None:
    srcs = _sources()
    sched = MixtureSchedule("constant", [(0, WEIGHTS)], NAMES)
    budget = 64 * 1024
    B = draws_for_tokens(budget, sched, srcs)
    mean = sum(WEIGHTS[s.name] * float(s.tokens.mean()) for s in srcs)
    assert B == round(budget / mean)
    comp = _planner(B=B, sources=srcs, size_by_tokens=True)
    W = comp.window
    longest = max(int(s.tokens.max()) for s in srcs)
    for k in range(3):
        toks = [int(comp.plan(s, 8).tokens.sum()) for s in range(k * W, (k + 1) * W)]
        # every step of a window within a unit of the window's mean
        assert max(toks) - min(toks) <= 2 * longest, toks
        assert abs(np.mean(toks) - budget) < 0.25 * budget


@pytest.mark.unit
def test_compose_window_groups_outliers_one_per_rank() -> None:
    rng = np.random.default_rng(1)
    dp, W = 4, 4
    cost = rng.uniform(1, 2, 400)
    cost[[5, 50, 90, 130, 170, 210, 250, 290]] = 200.0  # eight outliers: two groups of four
    where = compose_window(cost, np.ones(cost.size, dtype=np.int64), steps=W, dp=dp)
    assert where.min() >= 0 and where.max() < W
    out_steps = collections.Counter(where[cost > 100].tolist())
    assert sorted(out_steps.values()) == [4, 4]
    # steps stay equal in size
    assert max(np.bincount(where, minlength=W)) - min(np.bincount(where, minlength=W)) <= 2
    assert np.array_equal(where, compose_window(cost.copy(), np.ones(cost.size, dtype=np.int64), steps=W, dp=dp))


@pytest.mark.unit
@pytest.mark.parametrize("B,dp", [(64, 4), (256, 8), (512, 32)])
def test_composition_never_raises_a_windows_bound(B: int, dp: int) -> None:
    """Rule 6: whatever the scale, a window's mean step bound under composition is at most the
    bound of the steps as drawn (small per-rank budgets are where grouping can misfire)."""
    plain, comp = _planner("none", B=B), _planner(B=B)
    W = comp.window

    def bound(p: StepPlan) -> float:
        share = float(p.cost.sum()) / dp
        return max(float(p.cost.max()), share) / share

    for k in range(6):
        before = np.mean([bound(plain.plan(s, dp)) for s in range(k * W, (k + 1) * W)])
        after = np.mean([bound(comp.plan(s, dp)) for s in range(k * W, (k + 1) * W)])
        assert after <= before + 1e-9, (k, before, after)


@pytest.mark.unit
def test_a_group_completed_with_small_units_is_not_kept_when_it_raises_the_bound() -> None:
    # one outlier (12) among 4s and 1s at dp 4: grouping it with three 4s and filling by count
    # leaves its step short of small units (bound 1.6); the steps as drawn are balanced
    cost = np.array([12.0] + [4.0] * 11 + [1.0] * 8)
    drawn = np.array([0] * 12 + [1] * 8)
    where = compose_window(cost, np.ones(cost.size, dtype=np.int64), steps=2, dp=4, drawn=drawn)
    for s in range(2):
        share = cost[where == s].sum() / 4
        assert cost[where == s].max() <= share + 1e-9, (s, where.tolist())


@pytest.mark.unit
def test_compose_window_does_not_depend_on_its_slice_size(monkeypatch) -> None:
    """A window's work runs in slices of CHUNK units; carried sums and per-slice searches give
    the steps one pass over the whole window gives."""
    import fabricd.planner.compose as compose

    rng = np.random.default_rng(31)
    W, dp = 8, 16
    tokens = np.minimum(32768, (125 * (1 + rng.pareto(1.1, 3000)))).astype(np.int64)
    cost = tokens * tokens + 8192.0 * tokens
    drawn = np.repeat(np.arange(W), 3000 // W)
    whole = compose_window(cost, tokens, steps=W, dp=dp, drawn=drawn)
    assert whole.dtype == np.uint8 and int(whole.max()) < W
    assert len(set(np.flatnonzero(cost > cost.sum() / (W * dp)).tolist())) > dp  # outlier groups formed
    monkeypatch.setattr(compose, "CHUNK", 97)
    assert np.array_equal(whole, compose_window(cost, tokens, steps=W, dp=dp, drawn=drawn))
    parts = compose.split_by_step(whole, W)
    assert [p.tolist() for p in parts] == [np.flatnonzero(whole == s).tolist() for s in range(W)]
