"""The planner's C loops (``fabricd/planner/_native.c``) against their numpy definitions: the same
results bit for bit, or daemons with and without the module would plan different steps.

Each test runs the public function twice, with ``native.module`` as built and with it set to
None (the numpy definitions), on random inputs chosen for ties (equal costs, equal loads, equal
token counts), many and few groups, and each branch of the numpy code.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from fabricd.planner import native
from fabricd.planner.balance import (_lpt_rounds, balance, pack_micro_batches_grouped, rows_by_rank_and_micro,
                                     stable_order)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _built() -> None:
    if native.module is None:
        if os.environ.get(native.ENV, "").strip() == "0":
            pytest.skip(f"{native.ENV}=0: the C loops are off")
        pytest.fail(f"the planner's C module is not built ({native.describe()}): `pip install -e .` with a C "
                    "compiler builds it; CI has one")


def _both(monkeypatch: pytest.MonkeyPatch, fn, *args, **kwargs):
    """(fn with the C loops, fn with numpy) on the same arguments."""
    fast = fn(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(native, "module", None)
        ref = fn(*args, **kwargs)
    return fast, ref


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


def test_describe_says_c() -> None:
    assert native.describe() == "c"


@pytest.mark.parametrize("n", [0, 1, 2, 3000, 70_000])  # 70k items: 16-bit digits
def test_stable_order_equals_lexsort(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    rng = np.random.default_rng(n)
    for top in (1, 2, 200, 70_000, 2**40, 2**62):
        for dtype in (np.int64, np.uint64):
            keys = [rng.integers(0, top, n).astype(dtype), rng.integers(0, 5, n).astype(np.int32)]
            fast, ref = _both(monkeypatch, stable_order, *keys)
            assert _equal(fast, ref) and np.array_equal(fast, np.lexsort(keys))
    for small in (np.int8, np.uint16, bool):
        key = rng.integers(0, 2 if small is bool else 100, n).astype(small)
        fast, ref = _both(monkeypatch, stable_order, key)
        assert _equal(fast, ref)
    with pytest.raises(ValueError):
        stable_order(np.array([3, -1]))


@pytest.mark.parametrize("n,ranks,micros", [(0, 1, 1), (1, 1, 1), (50, 3, 1), (5000, 64, 4), (70_000, 4096, 3),
                                             (3000, 7, 200)])
def test_rows_by_rank_and_micro_equal_lexsort(monkeypatch: pytest.MonkeyPatch, n: int, ranks: int, micros: int) -> None:
    """The plan's final order and columns: C's counting sort, the radix passes past its bucket
    cap, and numpy's lexsort all agree (ties, i.e. rows of one micro-batch, stay in row order)."""
    rng = np.random.default_rng(n + ranks)
    rank = rng.integers(0, ranks, n).astype(np.int32)
    micro = rng.integers(0, micros, n).astype(np.int32)
    want = np.lexsort((micro, rank))
    fast, ref = _both(monkeypatch, rows_by_rank_and_micro, rank, micro, ranks)
    with monkeypatch.context() as m:
        m.setattr(sys.modules["fabricd.planner.balance"], "_GROUP_ORDER_MAX_BUCKETS", 1)  # the C module present, the buckets too many
        capped = rows_by_rank_and_micro(rank, micro, ranks)
    for got in (fast, ref, capped):
        order, r, mi = got
        assert order.dtype == np.int64 and r.dtype == mi.dtype == np.int32
        assert np.array_equal(order, want) and np.array_equal(r, rank[want]) and np.array_equal(mi, micro[want])
    with pytest.raises(ValueError, match="ranks must lie"):
        rows_by_rank_and_micro(np.array([0, 3], np.int32), np.zeros(2, np.int32), 3)
    with pytest.raises(ValueError, match="ranks must lie"):
        rows_by_rank_and_micro(np.array([0, 1], np.int32), np.array([0, -1], np.int32), 3)


def test_stable_order_of_a_2d_key_is_numpys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's keys are flat; numpy sorts a 2-D key row by row, and so does stable_order."""
    key = np.random.default_rng(1).integers(0, 7, (30, 4))
    fast, ref = _both(monkeypatch, stable_order, key)
    assert _equal(fast, ref)


def _costs(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "pareto":  # heavy tail: many small chunks, the cap on chunks is reached
        L = np.minimum(32768, 64.0 * (1.0 + rng.pareto(1.1, n)))
        return L * L + 8192.0 * L
    if kind == "ties":  # few distinct values: equal loads everywhere
        return rng.integers(1, 4, n).astype(np.float64)
    if kind == "equal":
        return np.full(n, 2.5)
    return rng.random(n)


@pytest.mark.parametrize("kind", ["pareto", "ties", "equal", "uniform"])
@pytest.mark.parametrize("k,n", [(9, 20), (9, 6000), (16, 15), (100, 3000), (1000, 1500), (4096, 40_000)])
def test_lpt_rounds_are_the_same(monkeypatch: pytest.MonkeyPatch, kind: str, k: int, n: int) -> None:
    costs = _costs(np.random.default_rng(k * 7 + n), n, kind)
    fast, ref = _both(monkeypatch, _lpt_rounds, costs, k)
    assert _equal(fast, ref)
    fast, ref = _both(monkeypatch, balance, costs, k, "lpt")  # with the refinement and the empty-bin fill
    assert _equal(fast, ref)


def _pack_case(rng: np.random.Generator, n: int, groups: int, cap: int, lo: int, hi: int, costs: str):
    g = rng.integers(0, groups, n)
    tokens = rng.integers(lo, hi, n)
    c = {"random": rng.random(n), "ties": rng.integers(0, 3, n).astype(np.float64),
         "quadratic": tokens.astype(np.float64) ** 2}[costs]
    return g, tokens, c


@pytest.mark.parametrize("costs", ["random", "ties", "quadratic"])
@pytest.mark.parametrize("n,groups,cap,lo,hi", [
    (400, 13, 512, 1, 300),        # a few micro-batches a group
    (400, 12, 90, 31, 46),         # just over a third of a micro-batch: first fit's second, wider try
    (3000, 64, 100, 0, 101),       # zero-token units, units of exactly the capacity
    (5000, 1000, 4000, 1, 900),    # many groups, some within one micro-batch (not packed)
    (50, 3, 10, 3, 6),             # tiny bins: the cost spread often finds no room and keeps first fit
])
def test_packing_is_the_same(monkeypatch: pytest.MonkeyPatch, costs: str, n: int, groups: int, cap: int, lo: int,
                             hi: int) -> None:
    rng = np.random.default_rng(n + groups + cap)
    for _ in range(3):
        g, tokens, c = _pack_case(rng, n, groups, cap, lo, hi, costs)
        fast, ref = _both(monkeypatch, pack_micro_batches_grouped, g, groups, tokens, c, cap)
        assert _equal(fast, ref)
        by_cost = np.argsort(-c, kind="stable")
        fast, ref = _both(monkeypatch, pack_micro_batches_grouped, g, groups, tokens, c, cap, by_cost=by_cost)
        assert _equal(fast, ref)


def test_a_group_whose_cost_spread_finds_no_room_keeps_first_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capacity 10, tokens 5 5 4 3 3: first fit decreasing makes [5 5] [4 3 3]; spreading by cost
    (the 3s first, then the 5s, then the 4) leaves the 4 no room, so first fit's bins are kept."""
    tokens = np.array([5, 5, 4, 3, 3])
    costs = np.array([3.0, 2.0, 1.0, 5.0, 4.0])
    fast, ref = _both(monkeypatch, pack_micro_batches_grouped, np.zeros(5, np.int64), 1, tokens, costs, 10)
    assert _equal(fast, ref)
    assert fast[0].tolist() == [0, 0, 1, 1, 1] and fast[1].tolist() == [2]


def test_composed_plans_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole plans, composition on, at a DP size where LPT runs in chunks and ranks hold several
    micro-batches."""
    from fabricd.planner import CostModel, MixtureSchedule, Planner, build_units

    rng = np.random.default_rng(3)
    sources = [
        build_units("short", rng.integers(8, 400, 4000), np.zeros(4000, int), max_seq_len=4096,
                    long_samples="truncate", image_tokens=16),
        build_units("long", np.minimum(8192, (100 * (1 + rng.pareto(1.1, 800)))).astype(int), rng.integers(0, 3, 800),
                    max_seq_len=4096, long_samples="split", image_tokens=16),
    ]
    names = ["short", "long"]

    def plans():
        p = Planner(seed=9, samples_per_step=3000, micro_batch_tokens=4096,
                    schedule=MixtureSchedule("constant", [(0, {"short": 2.0, "long": 1.0})], names),
                    cost=CostModel(attention=1.0, linear=4096.0), method="lpt", sources=sources, compose="outliers",
                    max_delay_steps=3, size_by_tokens=True, dp_history=((0, 48),))
        return [p.plan(s, 48) for s in range(8)]

    fast, ref = _both(monkeypatch, plans)
    fields = ("rank", "micro", "source", "sample_id", "piece", "tokens", "cost", "num_micro")
    for a, b in zip(fast, ref, strict=True):
        assert all(_equal(getattr(a, f), getattr(b, f)) for f in fields)
    assert max(int(p.num_micro.max()) for p in fast) >= 2


@pytest.mark.parametrize("n", [1, 2, 3, 5, 1000, (1 << 20) + 3])
def test_feistel_permutation_is_the_same(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Every index of the domain (numpy tabulates the network then) and a sample of it, under one
    epoch and under several (per-index round keys)."""
    from fabricd.planner.sequence import feistel_permute

    rng = np.random.default_rng(n)
    every = np.arange(n)
    some = rng.integers(0, n, min(n, 5000))
    for index, epoch in ((every, 0), (some, 3), (some, rng.integers(0, 4, some.size)), (some[:0], 0)):
        fast, ref = _both(monkeypatch, feistel_permute, index, n, seed=11, source=2, epoch=epoch)
        assert _equal(fast, ref)
    fast = feistel_permute(every, n, seed=11, source=2, epoch=1)
    assert np.array_equal(np.sort(fast), every)  # a bijection


@pytest.mark.parametrize("chunk", [1 << 20, 997])  # the numpy sums run per slice: small slices, many of them
@pytest.mark.parametrize("W,dp", [(1, 1), (4, 3), (16, 8), (16, 64), (65, 5)])
def test_composed_windows_are_the_same(monkeypatch: pytest.MonkeyPatch, chunk: int, W: int, dp: int) -> None:
    """compose_window (outliers, groups, filling, the candidates' bounds) and split_by_step, on
    windows with heavy tails, ties, sizes in tokens and in units."""
    from fabricd.planner import compose

    monkeypatch.setattr(compose, "CHUNK", chunk)
    rng = np.random.default_rng(W * 100 + dp)
    for n in (W * dp, 5000):
        tokens = np.minimum(8192, (64 * (1 + rng.pareto(1.1, n)))).astype(np.int32)
        for cost, size in ((tokens.astype(np.float64) ** 2 + 4096.0 * tokens, tokens),
                           (np.round(rng.pareto(1.5, n) * 3), np.ones(n, dtype=np.int8)),  # ties
                           (np.full(n, 7.0), tokens)):
            drawn = np.sort(rng.integers(0, W, n)).astype(compose.step_dtype(W))
            for d in (drawn, None):
                fast, ref = _both(monkeypatch, compose.compose_window, cost, size, steps=W, dp=dp, drawn=d)
                assert _equal(fast, ref)
            values = rng.integers(0, 1 << 40, n)
            fast, ref = _both(monkeypatch, compose.split_by_step, fast, W, values)
            assert len(fast) == len(ref) == W and all(_equal(a, b) for a, b in zip(fast, ref))
            fast, ref = _both(monkeypatch, compose._seq_sum, cost)
            assert fast == ref
            where = compose.compose_window(cost, size, steps=W, dp=dp)
            fast, ref = _both(monkeypatch, compose._step_sums, where, cost, W)
            assert _equal(fast, ref)
            big = np.argsort(-cost, kind="stable")[: min(n, dp)]
            for rest_max in (float(cost[big[-1]]), float(cost.max()) * 2):  # the second looks at every unit
                fast, ref = _both(monkeypatch, compose._mean_bound, cost, where, W, dp, big, rest_max)
                assert fast == ref


def test_the_c_loops_refuse_arrays_of_the_wrong_kind_or_length() -> None:
    """They trust no caller: a float where integers are due, a short output, an order that
    indexes past the items, a step outside the window: an exception, never a wild write."""
    m = native.module
    n = 10
    with pytest.raises(TypeError, match="signed integers"):
        m.stable_refine(np.zeros(n), None, np.empty(n, np.int64))
    with pytest.raises(ValueError, match="expected 10 items"):
        m.stable_refine(np.zeros(n, np.int64), None, np.empty(n - 1, np.int64))
    with pytest.raises(ValueError, match="permutation"):
        m.stable_refine(np.zeros(n, np.int64), np.full(n, n, np.int64), np.empty(n, np.int64))
    with pytest.raises(ValueError, match="out of range"):
        m.lpt_rounds(np.ones(n), np.full(n, -1, np.int64), 3, np.empty(n, np.int32))
    with pytest.raises(ValueError, match="permutation"):
        m.pack_grouped(np.zeros(n, np.int64), np.ones(n, np.int64), np.ones(n), np.zeros(n, np.int64), 1, 4,
                       np.zeros(n, np.int32), np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="tokens"):
        m.pack_grouped(np.zeros(n, np.int64), np.full(n, 9, np.int64), np.ones(n), np.arange(n, dtype=np.int64), 1,
                       4, np.zeros(n, np.int32), np.zeros(1, np.int32))
    with pytest.raises(TypeError, match="unsigned"):
        m.feistel(np.zeros(n, np.int64), np.zeros(6, np.uint64), 4, 10)
    with pytest.raises(ValueError, match="outside"):
        m.feistel(np.full(n, 99, np.uint64), np.zeros(6, np.uint64), 4, 10)
    with pytest.raises(ValueError, match="outside the window"):
        m.step_sums(np.full(n, 3, np.uint8), np.ones(n), 4, np.zeros(3))
    with pytest.raises(ValueError, match="outside the window"):
        m.split_by_step(np.full(n, 3, np.uint8), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="contiguous"):
        m.seq_sum(np.ones((4, 4))[:, 0])
    with pytest.raises(ValueError, match="ranks must lie"):
        m.group_order(np.full(n, 2, np.int32), np.zeros(n, np.int32), 2, 1, np.empty(n, np.int64),
                      np.empty(n, np.int32), np.empty(n, np.int32))
    with pytest.raises(ValueError, match="expected 10 items"):
        m.group_order(np.zeros(n, np.int32), np.zeros(n, np.int32), 2, 1, np.empty(n, np.int64),
                      np.empty(n - 1, np.int32), np.empty(n, np.int32))
    with pytest.raises(ValueError, match="G and M"):
        m.group_order(np.zeros(n, np.int32), np.zeros(n, np.int32), 0, 1, np.empty(n, np.int64),
                      np.empty(n, np.int32), np.empty(n, np.int32))
