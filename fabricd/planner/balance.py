"""Balancing: split items (units with a cost) over bins (DP ranks), and pack a rank's units
into micro-batches under a token budget.

Algorithms are pure functions picked by name from ``BALANCERS``. Every one is deterministic:
ties are broken by index order (stable sorts), never by hashing or timing. Orders over many
items come from ``stable_order``: stable radix passes over integer keys (a float key is first
replaced by its ``descending_rank``), several times faster than ``np.lexsort`` and giving the
same order.

The hottest loops (``stable_order``'s radix passes, LPT's chunks, the micro-batch packing) run in
C when ``fabricd.planner.native`` has its module, with the same results bit for bit; the numpy
definitions here are the reference.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Callable

import numpy as np

from fabricd.planner import native

__all__ = ["BALANCERS", "balance", "lpt", "karmarkar_karp", "pack_micro_batches", "pack_micro_batches_grouped"]

log = logging.getLogger(__name__)

#: Up to this many bins LPT runs the exact per-item heap algorithm.
_EXACT_LPT_BINS = 8
#: Swap-refinement rounds and the largest (items per bin + 1)² it considers.
_REFINE_ROUNDS = 12
_REFINE_MAX_CELLS = 1 << 22
_REFINE_TOLERANCE = 1e-3


def _check(costs: np.ndarray, num_bins: int) -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64).ravel()
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or int(num_bins) < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    if c.size and (not np.isfinite(c).all() or float(c.min()) < 0):
        bad = np.flatnonzero(~np.isfinite(c) | (c < 0))[0]
        raise ValueError(f"costs must be finite and >= 0; item {int(bad)} has cost {float(c[bad])!r}")
    return c


def _lpt_exact(costs: np.ndarray, k: int) -> np.ndarray:
    """Per-item LPT with a heap: largest cost first onto the least-loaded (then lowest) bin."""
    order = np.argsort(-costs, kind="stable")
    bins = np.empty(costs.size, dtype=np.int32)
    heap = [(0.0, b) for b in range(k)]
    values = costs[order].tolist()
    for item, c in zip(order.tolist(), values):
        load, b = heap[0]
        bins[item] = b
        heapq.heapreplace(heap, (load + c, b))
    return bins


def _argsort_stable(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.argsort(v, kind="stable")`` and ``v`` in that order, by the (several times faster)
    default sort when no two values are equal: then the order is unique and any sort gives it."""
    o = np.argsort(v)
    s = v[o]
    if s.size > 1 and bool((s[1:] == s[:-1]).any()):
        o = np.argsort(v, kind="stable")
        s = v[o]
    return o, s


def _lpt_rounds(costs: np.ndarray, k: int, order: np.ndarray | None = None) -> np.ndarray:
    """LPT in vectorized chunks: the next items (largest first) go to the least-loaded bins in one
    step for as long as that is what per-item LPT would do, i.e. while the i-th lightest bin is no
    heavier than any bin that already took an item of the chunk. Typically ~n/k + 20 chunks; past
    a safety cap on chunks, whole rounds are forced (plain round-based LPT)."""
    if order is None:
        order = stable_order(descending_rank(costs))  # = np.argsort(-costs, kind="stable"), by radix
    n = costs.size
    if native.module is not None:
        bins = np.empty(n, dtype=np.int32)
        native.module.lpt_rounds(np.ascontiguousarray(costs, dtype=np.float64),
                                 np.ascontiguousarray(order, dtype=np.int64), k, bins)
        return bins
    ranked = costs[order]  # item costs, largest first
    got = np.empty(n, dtype=np.int32)  # the bin of each item, in that order
    loads = np.zeros(k, dtype=np.float64)
    pos = 0
    chunks = 0
    cap = 4 * (-(-n // k)) + 64
    while pos < n:
        m = min(k, n - pos)
        target, lo = _argsort_stable(loads)
        target, lo = target[:m], lo[:m]
        x = ranked[pos : pos + m]
        cut = m
        if chunks < cap and m > 1:
            reach = np.minimum.accumulate(lo + x)
            bad = np.flatnonzero(lo[1:] > reach[:-1])
            if bad.size:
                cut = int(bad[0]) + 1
        got[pos : pos + cut] = target[:cut]
        loads[target[:cut]] += x[:cut]
        pos += cut
        chunks += 1
    bins = np.empty(n, dtype=np.int32)
    bins[order] = got
    return bins


def _refine(costs: np.ndarray, bins: np.ndarray, k: int, rounds: int = _REFINE_ROUNDS) -> np.ndarray:
    """Pairwise improvement: pair the i-th heaviest with the i-th lightest bin and apply, per pair,
    the move or swap that brings both closest to their mean. Never raises the maximum load, never
    empties a bin. Vectorized over pairs."""
    if k < 2 or costs.size < 2:
        return bins
    bins = bins.copy()
    n = costs.size
    loads = np.bincount(bins, weights=costs, minlength=k)
    # Exactly rounded (fsum over the per-bin sums): no platform-dependent reduction order.
    mean = math.fsum(loads.tolist()) / k
    # No assignment can beat this; stop once within a hair of it.
    good_enough = max(mean, float(costs.max())) * (1.0 + _REFINE_TOLERANCE)
    for _ in range(rounds):
        if float(loads.max()) <= good_enough:
            break
        cnt = np.bincount(bins, minlength=k)
        width = int(cnt.max()) + 1  # one padding slot: swapping with it is a move
        # Only bins above the target can lower the maximum: pair each with a light bin.
        pairs = max(1, min(k // 2, int(np.count_nonzero(loads > mean * (1.0 + _REFINE_TOLERANCE)))))
        if pairs * width * width > _REFINE_MAX_CELLS:
            pairs = max(1, _REFINE_MAX_CELLS // (width * width))
            if width * width > _REFINE_MAX_CELLS:
                return bins
        asc = np.argsort(loads, kind="stable")
        light = asc[:pairs]
        heavy = asc[::-1][:pairs]
        by_bin = np.argsort(bins, kind="stable")
        start = np.cumsum(cnt) - cnt
        slot = np.empty(n, dtype=np.int64)
        slot[by_bin] = np.arange(n) - np.repeat(start, cnt)
        items = np.full((k, width), -1, dtype=np.int64)
        items[bins, slot] = np.arange(n)
        cmat = np.where(items >= 0, costs[np.maximum(items, 0)], 0.0)
        gap = loads[heavy] - loads[light]
        delta = cmat[heavy][:, :, None] - cmat[light][:, None, :]
        ok = (delta > 0) & (delta < gap[:, None, None])
        if not ok.any():
            break
        score = np.where(ok, np.abs(delta - 0.5 * gap[:, None, None]), np.inf).reshape(pairs, -1)
        best = np.argmin(score, axis=1)
        act = np.isfinite(score[np.arange(pairs), best])
        hs, ls = np.divmod(best[act], width)
        ha, la = heavy[act], light[act]
        hi = items[ha, hs]
        li = items[la, ls]
        old_max = float(loads.max())
        new = bins.copy()
        new[hi[hi >= 0]] = la[hi >= 0]
        new[li[li >= 0]] = ha[li >= 0]
        new_loads = np.bincount(new, weights=costs, minlength=k)
        new_max = float(new_loads.max())
        if new_max > old_max:
            break
        bins, loads = new, new_loads
        if new_max == old_max and not (act & (heavy == asc[-1])).any():
            break
    return bins


def lpt(costs: np.ndarray, num_bins: int, order: np.ndarray | None = None) -> np.ndarray:
    """Greedy longest-processing-time, then pairwise swap refinement.

    Up to 8 bins it runs exact per-item LPT on a heap; above, the same greedy in vectorized
    chunks (O(n log n + chunks·k log k), typically ~n/k + 20 chunks). Both finish with a vectorized refinement that
    never raises the maximum load. Deterministic: stable sorts, ties to the lower index.
    ``order``: ``np.argsort(-costs, kind="stable")`` when the caller has it (else computed).
    """
    c = _check(costs, num_bins)
    k = int(num_bins)
    if k == 1 or c.size == 0:
        return np.zeros(c.size, dtype=np.int32)
    if k <= _EXACT_LPT_BINS:
        bins = _lpt_exact(c, k)
    else:
        bins = _lpt_rounds(c, k, order)
    return _refine(c, bins, k)


def karmarkar_karp(costs: np.ndarray, num_bins: int, order: np.ndarray | None = None) -> np.ndarray:
    """Karmarkar–Karp largest differencing method for k-way partitioning.

    Keeps a heap of partial partitions (sorted k-tuples of bin sums); repeatedly merges the two
    with the largest max−min difference, pairing the largest sums of one with the smallest of
    the other. Time O(n log n + n·k log k), memory O(n·k): fine for DP sizes up to a few hundred,
    slow for thousands of bins (use "lpt" there). Deterministic: ties by creation order.
    ``order`` is accepted for the balancers' common signature and not used.
    """
    c = _check(costs, num_bins)
    k = int(num_bins)
    n = c.size
    if k == 1 or n == 0:
        return np.zeros(n, dtype=np.int32)
    sums: list[np.ndarray | None] = [None] * n  # leaves materialise lazily
    children: list[tuple[int, int, np.ndarray] | None] = [None] * n
    heap = [(-float(c[i]), i) for i in range(n)]
    heapq.heapify(heap)

    def leaf_sums(i: int) -> np.ndarray:
        s = np.zeros(k, dtype=np.float64)
        s[0] = c[i]
        return s

    while len(heap) > 1:
        _, a = heapq.heappop(heap)
        _, b = heapq.heappop(heap)
        sa = sums[a] if sums[a] is not None else leaf_sums(a)
        sb = sums[b] if sums[b] is not None else leaf_sums(b)
        combined = sa + sb[::-1]
        order = np.argsort(-combined, kind="stable")
        merged = combined[order]
        sums[a] = sums[b] = None
        sums.append(merged)
        children.append((a, b, order))
        heapq.heappush(heap, (-(float(merged[0]) - float(merged[-1])), len(sums) - 1))
    root = heap[0][1]
    bins = np.empty(n, dtype=np.int32)
    stack: list[tuple[int, np.ndarray]] = [(root, np.arange(k, dtype=np.int32))]
    while stack:
        node, mapping = stack.pop()
        if node < n:
            bins[node] = mapping[0]
            continue
        a, b, order = children[node]  # type: ignore[misc]
        map_a = np.empty(k, dtype=np.int32)
        map_b = np.empty(k, dtype=np.int32)
        map_a[order] = mapping
        map_b[k - 1 - order] = mapping
        stack.append((b, map_b))
        stack.append((a, map_a))
    return bins


def _fill_empty_bins(costs: np.ndarray, bins: np.ndarray, k: int) -> np.ndarray:
    """Give every empty bin one item (the cheapest of the fullest bin) when there are enough items."""
    if costs.size < k:
        return bins
    cnt = np.bincount(bins, minlength=k)
    empty = np.flatnonzero(cnt == 0)
    if empty.size == 0:
        return bins
    bins = bins.copy()
    for e in empty.tolist():
        donor = int(np.argmax(cnt))
        members = np.flatnonzero(bins == donor)
        item = members[np.argmin(costs[members])]
        bins[item] = e
        cnt[donor] -= 1
        cnt[e] += 1
    return bins


BALANCERS: dict[str, Callable[[np.ndarray, int, np.ndarray | None], np.ndarray]] = {
    "lpt": lpt,
    "kk": karmarkar_karp,
}


def balance(costs: np.ndarray, num_bins: int, method: str = "lpt", *, order: np.ndarray | None = None) -> np.ndarray:
    """int32 bin of each item, from the balancer named ``method``.

    Promises: deterministic; every bin gets at least one item whenever there are at least
    ``num_bins`` items. ``order``: the items by descending cost, ties by index
    (``np.argsort(-costs, kind="stable")``), when the caller has it: the planner does, cheaply.
    """
    try:
        fn = BALANCERS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown balance method {method!r}; expected one of {sorted(BALANCERS)}") from None
    c = _check(costs, num_bins)
    bins = fn(c, int(num_bins), order)
    return _fill_empty_bins(c, bins.astype(np.int32, copy=False), int(num_bins))


# --------------------------------------------------------------------------- micro-batches

#: Most (rank, micro-batch) pairs ``rows_by_rank_and_micro`` counts in one pass in C (a counter
#: each: 32 MiB); past it, radix passes (``stable_order``).
_GROUP_ORDER_MAX_BUCKETS = 1 << 22


def rows_by_rank_and_micro(rank: np.ndarray, micro: np.ndarray, num_ranks: int) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """A plan's final row order, by rank, then micro-batch, then row (``np.lexsort((micro,
    rank))``, int64), and the rank and micro-batch columns in that order (int32). Ranks lie in
    ``[0, num_ranks)``, micro-batches are >= 0. In C: one counting sort, the two columns written
    run by run rather than gathered."""
    r = np.ascontiguousarray(rank, dtype=np.int32)
    m = np.ascontiguousarray(micro, dtype=np.int32)
    if r.shape != m.shape or r.ndim != 1:
        raise ValueError(f"rank and micro must be 1-d and of one length, got {r.shape} and {m.shape}")
    if not r.size:
        return np.zeros(0, np.int64), r.copy(), m.copy()
    if int(r.min()) < 0 or int(r.max()) >= num_ranks or int(m.min()) < 0:
        raise ValueError(f"ranks must lie in [0, {num_ranks}) and micro-batches be >= 0")
    M = int(m.max()) + 1
    if native.module is not None and num_ranks * M <= _GROUP_ORDER_MAX_BUCKETS:
        order = np.empty(r.size, dtype=np.int64)
        r_out, m_out = np.empty_like(r), np.empty_like(m)
        native.module.group_order(r, m, int(num_ranks), M, order, r_out, m_out)
        return order, r_out, m_out
    order = stable_order(r.astype(np.int64) * M + m)  # M > every micro: the key orders by (rank, micro)
    return order, r[order], m[order]


def stable_order(*keys: np.ndarray) -> np.ndarray:
    """``np.lexsort(keys)`` (the last key primary, ties by index) for keys of non-negative
    integers, as stable sorts of 8- or 16-bit digits, least significant first: numpy sorts those
    by radix, in linear time, where a comparison sort of 10⁵-10⁶ items costs 5-10× more. The
    result is the unique stable order, whatever algorithm numpy picks."""
    order: np.ndarray | None = None
    for key in keys:
        k = np.asarray(key)
        if k.size and int(k.min()) < 0:
            raise ValueError("stable_order needs non-negative integer keys")
        if native.module is not None and k.ndim == 1 and k.dtype.kind in "biu":
            out = np.empty(k.size, dtype=np.int64)
            native.module.stable_refine(np.ascontiguousarray(k, dtype=np.int64), order, out)
            order = out
            continue
        top = int(k.max()) if k.size else 0
        shift = 0
        while True:
            rest = top >> shift
            bits = 8 if rest < (1 << 8) else 16
            digit = k >> shift if shift else k
            if rest >= (1 << bits):
                digit = digit & ((1 << bits) - 1)
            digit = digit.astype(np.uint8 if bits == 8 else np.uint16)
            order = np.argsort(digit, kind="stable") if order is None else \
                order[np.argsort(digit[order], kind="stable")]
            shift += bits
            if (top >> shift) == 0:
                break
    if order is None:
        raise ValueError("stable_order needs at least one key")
    return order


def descending_rank(values: np.ndarray) -> np.ndarray:
    """int64 dense rank of each value, 0 for the largest (equal values share a rank): a key that
    ``stable_order`` sorts by value, largest first, ties by index, exactly like
    ``np.argsort(-values, kind="stable")``. Values must not be NaN."""
    v = np.asarray(values).ravel()
    out = np.zeros(v.size, dtype=np.int64)
    if v.size == 0:
        return out
    o = np.argsort(v)  # any order of equal values: they get one rank
    sv = v[o]
    step = np.empty(v.size, dtype=np.int64)
    step[0] = 0
    np.not_equal(sv[1:], sv[:-1], out=step[1:])
    asc = np.cumsum(step)
    out[o] = asc[-1] - asc
    return out


#: The penalty of a full micro-batch in the cost-spreading loop (see there).
_FULL = 1e300


def _first_fit(tok: np.ndarray, width: int, cap: int) -> np.ndarray | None:
    """First fit of the columns of ``tok`` (item p of every group at row p) into ``width`` bins
    per group, in lockstep: the bin of each item, or None if some item found no room."""
    R = tok.shape[1]
    fill = np.zeros((R, width), dtype=tok.dtype)
    flat_fill = fill.ravel()  # a view: (group, bin) at group·width + bin
    row_start = np.arange(R) * width
    need = cap - tok  # an item fits a bin holding at most this many tokens
    cols = np.empty(tok.shape, dtype=np.int64)
    for p in range(tok.shape[0]):
        b = np.argmax(fill <= need[p][:, None], axis=1)  # 0 when no bin has room: overfills bin 0
        flat_fill[row_start + b] += tok[p]
        cols[p] = b
    return None if int(fill.max()) > cap else cols


def _lockstep_columns(gi: np.ndarray, order: np.ndarray, ts: np.ndarray, cnt: np.ndarray,
                      itype) -> tuple[np.ndarray, np.ndarray]:
    """Items laid out for a lockstep loop over groups: item i sits at column ``p`` (its place in
    its group's order: ``order``, the items sorted by group, then as the caller ranks them) of
    row ``gi[i]``.
    Returns (flat index of each item in the (columns, groups) matrix, the matrix of token
    counts, 0 where a group has no item)."""
    m = gi.size
    R = cnt.size
    start = np.cumsum(cnt) - cnt
    place = np.empty(m, dtype=np.int64)
    place[order] = np.arange(m) - np.repeat(start, cnt)
    flat = place * R + gi
    tok = np.zeros((int(cnt.max()), R), dtype=itype)
    tok.ravel()[flat] = ts
    return flat, tok


def pack_micro_batches_grouped(
    group: np.ndarray, num_groups: int, tokens: np.ndarray, costs: np.ndarray, capacity: int, *,
    by_cost: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``pack_micro_batches`` for many ranks at once, vectorized over ranks.

    ``group[i]`` is the rank of item i. Returns (micro-batch of each item int32[n], number of
    micro-batches of each group int32[num_groups]); a group without items has 0 micro-batches.
    Each group's result equals ``pack_micro_batches`` on that group's items alone (in order).
    ``by_cost``: the items by descending cost, ties by index (``np.argsort(-costs,
    kind="stable")``), when the caller has it (the planner does, from each unit's cost rank).
    """
    g = np.asarray(group, dtype=np.int64).ravel()
    t = np.asarray(tokens, dtype=np.int64).ravel()
    c = np.asarray(costs, dtype=np.float64).ravel()
    G = int(num_groups)
    if isinstance(capacity, bool) or int(capacity) != capacity or int(capacity) < 1:
        raise ValueError(f"micro-batch capacity must be an integer >= 1 tokens, got {capacity!r}")
    cap = int(capacity)
    if not (g.shape == t.shape == c.shape):
        raise ValueError(f"group, tokens and costs differ in length: {g.size}, {t.size}, {c.size}")
    n = t.size
    micro = np.zeros(n, dtype=np.int32)
    if n == 0:
        return micro, np.zeros(G, dtype=np.int32)
    if int(g.min()) < 0 or int(g.max()) >= G:
        raise ValueError(f"group ids must lie in [0, {G}), got {int(g.min())}..{int(g.max())}")
    big = np.flatnonzero(t > cap)
    if big.size:
        raise ValueError(f"unit {int(big[0])} has {int(t[big[0]])} tokens, more than the micro-batch capacity {cap}")
    if int(t.min()) < 0:
        raise ValueError(f"token counts must be >= 0, got {int(t.min())}")
    if native.module is not None:  # the same bins, per group in C
        order = stable_order(descending_rank(c)) if by_cost is None else np.asarray(by_cost, dtype=np.int64)
        num = np.empty(G, dtype=np.int32)
        native.module.pack_grouped(g, t, c, np.ascontiguousarray(order), G, cap, micro, num)
        return micro, num
    num = (np.bincount(g, minlength=G) > 0).astype(np.int32)
    over = np.bincount(g, weights=t, minlength=G) > cap
    if not over.any():
        return micro, num  # fast path: every group fits in one micro-batch
    sel = np.flatnonzero(over[g])
    ug = np.flatnonzero(over)
    gi = (np.cumsum(over) - 1)[g[sel]]
    ts, cs = t[sel], c[sel]
    R = ug.size
    cnt = np.bincount(gi, minlength=R)
    tsum = np.bincount(gi, weights=ts, minlength=R)
    itype = np.int32 if cap < (1 << 30) else np.int64
    rows = np.arange(R)

    # First-fit decreasing by tokens, all groups in lockstep: column p holds the p-th largest item
    # of every group (a group with fewer items is padded with 0-token items, which change nothing).
    # First fit leaves at most one bin at most half full, so it never needs more than 2·sum/cap + 1
    # bins; it is tried with one bin more than the sum needs first (the loop's work grows with the
    # bins), and again with the bound in the rare group where that was not enough.
    ffd_rank, tok = _lockstep_columns(gi, stable_order(cap - ts, gi), ts, cnt, itype)
    ffd_cols = None
    for width in (int(np.max(-(-tsum // cap))) + 1, int(np.max(2 * tsum // cap)) + 2):
        ffd_cols = _first_fit(tok, min(width, int(cnt.max())), cap)
        if ffd_cols is not None:
            break
    if ffd_cols is None:  # unreachable by the bound above; never hand out an overfull micro-batch
        raise AssertionError("first-fit packing overflowed its micro-batches")
    used = ffd_cols.max(axis=0) + 1
    ffd = ffd_cols.ravel()[ffd_rank]

    # Spread cost: LPT by cost over the same number of micro-batches, within the token budget. A bin
    # past a group's count is marked full (cap + 1 tokens); an item with room nowhere goes to bin 0
    # (the group then falls back to first fit), so bin 0 is overfull exactly when a group failed.
    if by_cost is None:
        by_cost_sel = stable_order(descending_rank(cs))
    elif sel.size == n:
        by_cost_sel = np.asarray(by_cost, dtype=np.int64)
    else:  # the items of the packed groups, in the caller's cost order, numbered within ``sel``
        local = np.full(n, -1, dtype=np.int64)
        local[sel] = np.arange(sel.size)
        by_cost_sel = local[np.asarray(by_cost, dtype=np.int64)]
        by_cost_sel = by_cost_sel[by_cost_sel >= 0]
    spread_rank, tok = _lockstep_columns(gi, by_cost_sel[stable_order(gi[by_cost_sel])], ts, cnt, itype)
    cost_cols = np.zeros(tok.shape, dtype=np.float64)
    cost_cols.ravel()[spread_rank] = cs
    width = int(used.max())
    tfill = np.where(np.arange(width)[None, :] < used[:, None], 0, cap + 1).astype(itype)
    cfill = np.zeros((R, width), dtype=np.float64)
    flat_t, flat_c = tfill.ravel(), cfill.ravel()
    row_start = rows * width
    need = cap - tok
    spread_cols = np.empty(tok.shape, dtype=np.int64)
    # A full bin is kept out of the choice by a penalty that swamps any cost sum (cost + _FULL ==
    # _FULL exactly): cheaper than a masked copy, and an all-full row still picks bin 0.
    penalty = float(np.max(cost_cols.sum(axis=0))) < _FULL * 2.0 ** -60
    for p in range(tok.shape[0]):
        full = tfill > need[p][:, None]
        b = np.argmin(cfill + full * _FULL if penalty else np.where(full, np.inf, cfill), axis=1)
        at = row_start + b
        flat_t[at] += tok[p]
        flat_c[at] += cost_cols[p]
        spread_cols[p] = b
    failed = tfill[:, 0] > cap
    spread = spread_cols.ravel()[spread_rank]
    choice = np.where(failed[gi], ffd, spread)
    micro[sel] = choice.astype(np.int32)
    num[ug] = used.astype(np.int32)
    return micro, num


def pack_micro_batches(tokens: np.ndarray, costs: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """One rank's units -> (micro-batch index int32 per unit, number of micro-batches).

    Every micro-batch's token sum is <= ``capacity`` (a unit longer than ``capacity`` raises
    ValueError). Uses as many micro-batches as first-fit-decreasing needs, then spreads cost over
    them by capacity-constrained LPT (falling back to the FFD packing if that does not fit).
    Everything that fits in one micro-batch goes to micro-batch 0.
    """
    t = np.asarray(tokens).ravel()
    micro, num = pack_micro_batches_grouped(np.zeros(t.size, dtype=np.int64), 1, t, costs, capacity)
    return micro, int(num[0])
