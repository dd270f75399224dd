"""The closed-form cursor of the global sequence (fabricd.planner.allot), checked against a
step-by-step reference of the same rule and against the exact mixture targets, at small steps
and at steps up to MAX_STEP."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from fabric_client.limits import MAX_STEP

from fabricd.errors import PlanError
from fabricd.planner.allot import _ONE, _TAG_RAMP, _TAG_SPLIT, _offset
from fabricd.planner.mixture import MixtureSchedule
from fabricd.planner.sequence import GlobalSequence

pytestmark = pytest.mark.unit

NAMES = ["a", "b", "c", "d", "e"]
SCHEDULES = {
    "constant": ("constant", [(0, {"a": 0.61, "b": 0.07, "c": 0.32, "e": 1e-3})]),
    "piecewise": ("piecewise", [(0, {"a": 1}), (37, {"b": 1, "c": 2, "d": 0.5}), (90, {"a": 1, "e": 3}),
                                (200, {"c": 1})]),
    "linear": ("linear", [(0, {"a": 1}), (50, {"b": 1, "d": 0.2}), (51, {"c": 2, "a": 0.3}),
                          (180, {"e": 1, "b": 1, "a": 0.01})]),
}


def _seq(kind: str, B: int = 37, seed: int = 5) -> GlobalSequence:
    k, points = SCHEDULES[kind]
    return GlobalSequence(seed=seed, samples_per_step=B, schedule=MixtureSchedule(k, points, NAMES),
                          source_sizes=[50, 13, 200, 7, 3])


# --------------------------------------------------------------------------- reference


def _ref_split(weights: np.ndarray, n: int, *, seed: int, point: int) -> list[int]:
    """The tree split written recursively with Fractions, numbering nodes in preorder."""
    w = [Fraction(float(x)) for x in weights]
    out = [0] * len(w)
    counter = iter(range(10**6))

    def node(lo: int, hi: int, c: int) -> None:
        if hi - lo == 1:
            out[lo] += c
            return
        mid = (lo + hi) // 2
        idx = next(counter)
        total = sum(w[lo:hi], Fraction(0))
        p = sum(w[lo:mid], Fraction(0)) / total if total else Fraction(0)
        left = math.floor(p * c + Fraction(_offset(seed, _TAG_SPLIT, point, idx), _ONE))
        node(lo, mid, left)
        node(mid, hi, c - left)

    node(0, len(w), n)
    return out


def _ref_prefixes(seq: GlobalSequence, steps: int) -> np.ndarray:
    """Cursor of every step in [0, steps], by summing each step's stream draws one step at a time."""
    sched = seq.schedule
    pts = list(sched.point_steps)
    K, B = len(pts), seq.samples_per_step
    linear = sched.kind == "linear" and K > 1
    streams = [0] * K
    ramp_acc = [Fraction(0)] * K  # Σ λ(t) · B so far in each linear segment
    out = np.zeros((steps + 1, seq.num_sources), dtype=np.int64)
    for t in range(steps + 1):
        row = [0] * seq.num_sources
        for k in range(K):
            for j, c in enumerate(_ref_split(sched.rows[k], streams[k], seed=seq.seed, point=k)):
                row[j] += c
        out[t] = row
        k = max(i for i in range(K) if pts[i] <= t)
        if linear and k + 1 < K:
            L = pts[k + 1] - pts[k]
            u = Fraction(_offset(seq.seed, _TAG_RAMP, k, 0), _ONE)
            before = math.floor(ramp_acc[k] + u)
            ramp_acc[k] += Fraction(B * (t - pts[k]), L)
            to_next = math.floor(ramp_acc[k] + u) - before
            streams[k + 1] += to_next
            streams[k] += B - to_next
        else:
            streams[k] += B
    return out


def _target(seq: GlobalSequence, step: int) -> list[Fraction]:
    """B × Σ_{t<step} weights(t), exactly, from the schedule's definition."""
    sched = seq.schedule
    pts = list(sched.point_steps)
    rows = [[Fraction(float(x)) for x in r] for r in sched.rows]
    J = seq.num_sources
    tot = [Fraction(0)] * J
    for k, s0 in enumerate(pts):
        if step <= s0:
            break
        end = min(step, pts[k + 1]) if k + 1 < len(pts) else step
        m = end - s0
        for j in range(J):
            tot[j] += m * rows[k][j]
            if sched.kind == "linear" and k + 1 < len(pts):
                tot[j] += (rows[k + 1][j] - rows[k][j]) * Fraction(m * (m - 1), 2 * (pts[k + 1] - s0))
    return [seq.samples_per_step * x for x in tot]


def _depth(J: int) -> int:
    return max(1, math.ceil(math.log2(J)))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_fast_cursor_equals_step_by_step_reference(kind: str) -> None:
    seq = _seq(kind)
    ref = _ref_prefixes(seq, 260)
    rng = np.random.default_rng(1)
    for s in rng.permutation(261).tolist():
        assert seq.cursor(s).tolist() == ref[s].tolist(), (kind, s)
    counts = np.diff(ref, axis=0)
    assert (counts >= 0).all() and (counts.sum(axis=1) == seq.samples_per_step).all()


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_exact_batch_and_nonnegative_counts_at_random_small_and_large_steps(kind: str) -> None:
    seq = _seq(kind, B=4099)
    rng = np.random.default_rng(2)
    steps = rng.integers(0, 400, 50).tolist() + rng.integers(0, MAX_STEP, 50).tolist() + [MAX_STEP, MAX_STEP - 1]
    for s in steps:
        c = seq.counts(s)
        assert int(c.sum()) == 4099 and int(c.min()) >= 0, (s, c)
        assert np.array_equal(seq.cursor(s) + c, seq.cursor(s + 1) if s < MAX_STEP else seq.cursor(s) + c)
        src, unit = seq.step_units(s)
        assert src.size == unit.size == 4099
        assert np.array_equal(np.bincount(src, minlength=5), c)
        assert all(0 <= u < n for u, n in zip(unit.tolist(), np.array([50, 13, 200, 7, 3])[src].tolist()))


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_prefix_tracks_the_exact_mixture_target_at_any_step(kind: str) -> None:
    seq = _seq(kind, B=1021)
    K = len(seq.schedule.point_steps)
    bound = K * (_depth(5) + 1)
    rng = np.random.default_rng(3)
    for s in rng.integers(0, 300, 40).tolist() + rng.integers(0, MAX_STEP, 40).tolist() + [MAX_STEP]:
        cur = seq.cursor(s)
        target = _target(seq, s)
        assert int(cur.sum()) == 1021 * s
        for j in range(5):
            assert abs(int(cur[j]) - target[j]) < bound, (kind, s, j, int(cur[j]), float(target[j]))


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_window_counts_track_weights_within_the_stated_bound(kind: str) -> None:
    seq = _seq(kind, B=64)
    pts = list(seq.schedule.point_steps)
    bound = 2 * 2 * (_depth(5) + 1)  # at most two streams change inside a window of one segment
    rng = np.random.default_rng(4)
    for _ in range(200):
        a = int(rng.integers(0, 400))
        b = a + int(rng.integers(1, 300))
        # windows inside one segment (the bound is per stream active in the window)
        seg = [p for p in pts if p <= a][-1]
        nxt = [p for p in pts if p > seg]
        if nxt and b > nxt[0]:
            b = nxt[0]
        if b <= a:
            continue
        got = seq.cursor(b) - seq.cursor(a)
        want = [tb - ta for ta, tb in zip(_target(seq, a), _target(seq, b))]
        for j in range(5):
            assert abs(int(got[j]) - want[j]) < bound, (kind, a, b, j, int(got[j]), float(want[j]))
    big = MAX_STEP - 10**6
    got = seq.cursor(MAX_STEP) - seq.cursor(big)
    want = [tb - ta for ta, tb in zip(_target(seq, big), _target(seq, MAX_STEP))]
    assert all(abs(int(g) - w) < bound for g, w in zip(got, want))


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_seek_to_max_step_costs_bounded_work(kind: str) -> None:
    seq = _seq(kind, B=1 << 20)
    seq.cursor(0)
    seq.cursor(1000)  # the finished streams' totals are computed once
    per_query = []
    for s in [7, 10**8, 2**40 - 5, MAX_STEP]:
        before = seq.work
        seq.cursor(s)
        per_query.append(seq.work - before)
    J = 5
    # a cursor splits at most two streams (J - 1 tree nodes each) and totals them
    assert max(per_query) <= 2 * J, per_query


def test_steps_past_max_step_are_refused_naming_the_bound() -> None:
    seq = _seq("constant")
    for bad in (MAX_STEP + 1, 2**62):
        for call in (seq.cursor, seq.counts, seq.step_units, seq.epoch):
            with pytest.raises(PlanError, match="MAX_STEP"):
                call(bad)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            seq.cursor(bad)


def test_draw_counts_beyond_int64_are_refused() -> None:
    sched = MixtureSchedule("constant", [(0, {"a": 1})], ["a"])
    seq = GlobalSequence(seed=0, samples_per_step=10**7, schedule=sched, source_sizes=[10])
    assert int(seq.cursor(10**11).sum()) == 10**18
    with pytest.raises(PlanError, match="2\\*\\*63"):
        seq.cursor(10**12)


def test_zero_weight_sources_get_nothing_and_single_source_gets_everything() -> None:
    seq = _seq("piecewise", B=50)
    c = seq.cursor(37)
    assert c.tolist() == [50 * 37, 0, 0, 0, 0]
    w = seq.cursor(90) - seq.cursor(37)
    assert w[0] == 0 and w[4] == 0 and w.sum() == 50 * 53
    assert (seq.cursor(MAX_STEP) - seq.cursor(200)).tolist() == [0, 0, 50 * (MAX_STEP - 200), 0, 0]
