"""Step composition: which of a window's units go into which of its steps, so that no step's
balance is bounded by a few outlier units.

Why. A step's DP ranks wait for the slowest. Balancing puts units on ranks, but no balancer can
split a unit: when one 32k-token document costs more than a rank's whole share of the step, the
rank that holds it sets the step time and every other rank waits. The fix (after WLB-LLM, OSDI'25)
is to choose *which* units share a step: outliers wait in a queue and are released together,
so every rank of that step gets one and the step's mean rises to meet them.

THE RULE. Steps are grouped into windows of ``W = max_delay_steps + 1`` consecutive steps. The
global sequence (:mod:`fabricd.planner.sequence`) draws a window's units exactly as it would
without composition; :func:`compose_window` only moves each of them to a step of the same
window. A pure function of the window's units (in draw order), their costs and sizes, and the
composition DP size ``dp``:

1. ``mean`` = total cost ÷ (W·dp): a rank's mean share of a step. A unit costing more than
   ``mean`` is an *outlier*.
2. Units are ranked by cost, largest first (ties: draw order). Outliers are released in
   *groups*, one group per step: a group takes the next ``dp`` units of that ranking (so each
   rank of its step gets one; the last group is completed with the largest non-outliers), then
   tops up with further outliers while one still fits on the lightest rank under the group's
   largest cost (an exact per-rank simulation), and while the group's size stays under
   ``OUTLIER_SHARE`` of the step's size.
3. Group ``g`` of ``G`` goes to step ``floor((g + 1/2)·W / G)`` of the window: spread evenly.
4. Every other unit keeps its draw order and fills the steps in order, each step up to its size
   quota (the window's size ÷ W, less its group's size): steps are equal in size (tokens under
   ``tokens_per_step``, units otherwise) up to one unit, whatever their groups.
5. A step left with fewer than ``dp`` units takes the last-drawn of those units from the step
   with the most, so every rank of every step gets data.
6. Of the candidates (the groups as above; without a last group that had to be completed with
   non-outliers; and the steps as drawn), the window keeps the one whose mean step bound
   max(largest unit, mean share) / mean share is lowest (the first on a tie): composition never
   makes a window's bound worse than no composition.

Consequences, by construction: the window's multiset of units is the sequence's, so the mixture
is exact over every window and every unit is delivered exactly once per epoch (a unit moves by
less than W steps); no unit is delayed more than ``max_delay_steps``; the result depends on
``dp``, so a change of DP size is a logged plan change (the window that starts at or after it
uses the new size; see ``Planner(dp_history=...)``). Sums run in a fixed order (sequential, or
per slice of ``CHUNK`` units and then across slices), sorts are stable: the same inputs give the
same steps on every machine.

Speed. A window at DP 4096 holds ~10⁷ units, so the work runs over slices of ``CHUNK`` units
(no window-sized temporaries), step numbers are one byte, rule 4 places a slice's units with W
binary searches into their (rising) midpoints, and the outlier ranking partitions only the
units above a threshold, not the whole window.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import numpy as np

from fabricd.planner import native

__all__ = ["COMPOSE_MODES", "MAX_DELAY_STEPS", "OUTLIER_SHARE", "compose_window", "composition_dp", "extend_dp_history",
           "check_dp_history", "split_by_step", "step_dtype", "window_bounds"]

log = logging.getLogger(__name__)

#: ``[batch] compose`` values: "none" plans each step's draws as drawn; "outliers" composes windows.
COMPOSE_MODES = ("none", "outliers")
#: Largest ``max_delay_steps`` a spec may ask for (a window's units are held in memory at once).
MAX_DELAY_STEPS = 64
#: Most of a step's size (tokens or units) that one outlier group may take.
OUTLIER_SHARE = 0.75


def check_dp_history(history) -> tuple[tuple[int, int], ...]:
    """``history`` as a tuple of ``(from_step, dp_size)`` int pairs; ValueError (or TypeError for
    a non-pair) unless the steps rise strictly from 0 and every size is >= 1. Empty is allowed."""
    out = tuple((int(a), int(b)) for a, b in history)
    if out and (out[0][0] != 0 or any(b < 1 for _, b in out) or any(x[0] >= y[0] for x, y in zip(out, out[1:]))):
        raise ValueError(f"dp_history must be (step, dp_size >= 1) pairs, strictly increasing steps from 0; "
                         f"got {out!r}")
    return out


def window_bounds(starts: Sequence[int], window: int, step: int) -> tuple[int, int]:
    """``[lo, hi)`` of the composition window holding ``step`` (``window`` >= 1 steps) when
    segments start at ``starts``: a window ends at its length or at the next segment's start."""
    i = int(np.searchsorted(np.asarray(starts, dtype=np.int64), step, side="right")) - 1
    lo = starts[i] + ((step - starts[i]) // window) * window
    hi = lo + window
    if i + 1 < len(starts):
        hi = min(hi, starts[i + 1])
    return lo, hi


def composition_dp(dp_history: tuple[tuple[int, int], ...], window_start: int) -> int:
    """The DP size a window starting at ``window_start`` is composed for: the last entry of the
    history (``(from_step, dp_size)`` pairs, sorted by step, the first at step 0) at or before it."""
    dp = dp_history[0][1]
    for start, size in dp_history:
        if start > window_start:
            break
        dp = size
    return dp


def extend_dp_history(history: tuple[tuple[int, int], ...], *, new_dp: int, frontier: int,
                      window: int) -> tuple[tuple[int, int], ...]:
    """The DP-size history after a change to ``new_dp``, given that no step at or past
    ``frontier`` can have been delivered yet: the change takes effect at the first window
    boundary past the frontier plus one window of margin (a window some of whose steps may have
    been delivered keeps the size it was composed for). Entries past the new one are dropped."""
    start = (-(-max(0, int(frontier)) // window) + 1) * window
    kept = tuple((a, b) for a, b in history if a < start)
    if kept and kept[-1][1] == new_dp:
        return kept
    return kept + ((start, int(new_dp)),)


#: Units per slice of a window's elementwise work: temporaries stay a few MiB, so the allocator
#: reuses them instead of mapping (and page-faulting) fresh memory for every array of a window.
CHUNK = 1 << 20


def _slices(n: int) -> list[slice]:
    return [slice(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]


def step_dtype(steps: int) -> type:
    """The integer type of a window's step numbers: one byte for any window a spec may ask for."""
    return np.uint8 if int(steps) <= 255 else np.int64


def split_by_step(where: np.ndarray, W: int, values: np.ndarray | None = None) -> list[np.ndarray]:
    """Each step's units, in draw order: their indices, or ``values`` at them. A stable counting
    sort of ``where`` by slices (each slice's units sorted by step by radix, appended to their
    steps' lists), so no window-sized index array is made."""
    if native.module is not None and where.dtype == np.uint8 and values is not None and values.itemsize == 8:
        out = np.empty(values.size, dtype=values.dtype)
        counts = np.zeros(W, dtype=np.int64)
        native.module.split_by_step(np.ascontiguousarray(where), np.ascontiguousarray(values).view(np.int64),
                                    out.view(np.int64), counts)
        return np.split(out, np.cumsum(counts)[:-1])  # views of one array, each step's in draw order
    parts: list[list[np.ndarray]] = [[] for _ in range(W)]
    for sl in _slices(where.size):
        w = where[sl]
        order = np.argsort(w, kind="stable")
        picked = order + sl.start if values is None else values[sl][order]
        bounds = np.cumsum(np.bincount(w, minlength=W))
        lo = 0
        for s, hi in enumerate(bounds.tolist()):
            if hi > lo:
                parts[s].append(picked[lo:hi])
            lo = hi
    dtype = np.int64 if values is None else values.dtype
    return [np.concatenate(p) if p else np.zeros(0, dtype=dtype) for p in parts]


def _seq_sum(x: np.ndarray) -> float:
    """``float(np.cumsum(x)[-1])`` (a strictly sequential sum) in slices, carrying the sum so far
    into each slice's first element: the same value, without a window-sized temporary."""
    if native.module is not None and x.dtype == np.float64:
        return native.module.seq_sum(np.ascontiguousarray(x))
    total = 0.0
    for sl in _slices(x.size):
        part = x[sl].astype(np.float64)  # a copy
        part[0] += total
        total = float(np.cumsum(part)[-1])
    return total


def _step_sums(where: np.ndarray, weights: np.ndarray | None, W: int) -> np.ndarray:
    """Per step, the sum of ``weights`` (or the count) of its units: one bincount per slice, the
    slices' partial sums added in slice order (a fixed order: the same on every machine)."""
    out = np.zeros(W, dtype=np.float64 if weights is not None else np.int64)
    if native.module is not None and where.dtype == np.uint8 and weights is not None:
        native.module.step_sums(np.ascontiguousarray(where), np.ascontiguousarray(weights, dtype=np.float64), CHUNK, out)
        return out
    for sl in _slices(where.size):
        out += np.bincount(where[sl], weights=None if weights is None else weights[sl], minlength=W)
    return out


def _top(c: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Indices of the ``k`` largest of ``c``, largest first, ties in index order (the first ``k``
    of a stable descending sort, without sorting everything), and a bound on every other value
    (-inf when none is left). Looks among the values above a threshold halved until at least
    ``k`` pass, so a window's few large units are partitioned, not all of them."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64), (float(c.max()) if c.size else -np.inf)
    if k >= c.size:
        pick = np.arange(c.size)
        return pick[np.lexsort((pick, -c))], -np.inf
    cand = None
    t = float(c.max()) / 2
    while t > 0 and np.isfinite(t):
        if int(np.count_nonzero(c > t)) >= k:
            cand = np.flatnonzero(c > t)
            break
        t /= 4
    if cand is None:
        cand = np.arange(c.size)
    cc = c[cand]
    v = np.partition(cc, cc.size - k)[cc.size - k]  # the k-th largest value (all its ties are candidates)
    above = cand[cc > v]
    ties = cand[cc == v][: k - above.size]
    pick = np.concatenate([above, ties])
    return pick[np.lexsort((pick, -c[pick]))], float(v)


def compose_window(cost: np.ndarray, size: np.ndarray, *, steps: int, dp: int,
                   drawn: np.ndarray | None = None) -> np.ndarray:
    """Step (in ``[0, steps)``) of each unit of a window, by the module's rule: uint8 for up to
    255 steps (every window a spec may ask for), int64 above.

    ``cost`` (float64) and ``size`` (integer tokens, or ones) per unit, in draw order; ``drawn``:
    the step (in the window) each unit was drawn for, a candidate kept when composing would not
    lower the window's bound (rule 6).
    """
    c = np.asarray(cost, dtype=np.float64)
    z = np.asarray(size)
    if z.dtype.kind not in "iu":
        z = z.astype(np.int64)
    n = c.size
    W = int(steps)
    if W < 1 or int(dp) < 1:
        raise ValueError(f"steps and dp must be >= 1, got {steps!r}, {dp!r}")
    if n == 0:
        return np.zeros(0, dtype=step_dtype(W))
    dp = int(dp)
    total = _seq_sum(c)
    mean = total / (W * dp)
    n_out = int(np.count_nonzero(c > mean))
    order, rest_max = _top(c, min(n, n_out + dp))  # only the units a group can take, ranked
    quota = float(int(z.sum(dtype=np.int64))) / W
    groups = _groups(c[order].tolist(), z[order].tolist(), n_out=n_out, n=n, dp=dp, W=W,
                     cap=OUTLIER_SHARE * quota)
    candidates = [_assign(order, groups, z, W, dp, quota)]
    if groups and groups[-1][1] - groups[-1][0] == dp and groups[-1][1] > n_out:
        # the last group was completed with non-outliers: also try leaving its outliers unqueued
        candidates.append(_assign(order, groups[:-1], z, W, dp, quota))
    if drawn is not None:
        d = np.asarray(drawn)
        candidates.append(d.astype(step_dtype(W)) if d.dtype != step_dtype(W) else d)
    best, best_bound = candidates[0], _mean_bound(c, candidates[0], W, dp, order, rest_max)
    for cand in candidates[1:]:
        b = _mean_bound(c, cand, W, dp, order, rest_max)
        if b < best_bound:
            best, best_bound = cand, b
    return best


def _groups(ranked_c: list[float], ranked_z: list[int], *, n_out: int, n: int, dp: int, W: int,
            cap: float) -> list[tuple[int, int]]:
    """Rule 2: the outlier groups, as [lo, hi) slices of the cost ranking."""
    groups: list[tuple[int, int]] = []
    pos = 0
    while pos < n_out and len(groups) < W:
        lo = pos
        hi = min(n, pos + dp)
        top = ranked_c[lo]
        used = sum(ranked_z[lo:hi])
        if hi - lo == dp and hi < n_out:
            loads = ranked_c[lo:hi]
            heapq.heapify(loads)
            while hi < n_out and used + ranked_z[hi] <= cap and loads[0] + ranked_c[hi] <= top:
                heapq.heapreplace(loads, loads[0] + ranked_c[hi])
                used += ranked_z[hi]
                hi += 1
        groups.append((lo, hi))
        pos = hi
    return groups


def _assign(order: np.ndarray, groups: list[tuple[int, int]], z: np.ndarray, W: int, dp: int,
            quota: float) -> np.ndarray:
    """Rules 3-5: groups spread over the window's steps, every other unit filling them in order.

    The filling runs over every unit in slices, a grouped unit counting 0 toward its step's size
    (its step is set afterwards): the midpoints of the others are exactly those of the units
    left alone, and they rise with draw order, so W binary searches per slice place them."""
    out = np.empty(z.size, dtype=step_dtype(W))
    grouped = order[: groups[-1][1]] if groups else order[:0]  # the groups: consecutive slices from 0
    gstep = np.repeat(((2 * np.arange(len(groups), dtype=np.int64) + 1) * W) // (2 * max(1, len(groups))),
                      [hi - lo for lo, hi in groups])
    taken = np.bincount(gstep, weights=z[grouped], minlength=W)  # integer sums: exact
    room = np.maximum(quota - taken, 0.0)
    bounds = np.cumsum(room)
    gz = z[grouped].astype(np.int64)
    rtotal = int(z.sum(dtype=np.int64)) - int(gz.sum())
    n_rest = z.size - grouped.size
    scale = bounds[-1] / float(rtotal) if rtotal > 0 and bounds[-1] > 0 else 0.0
    count = np.zeros(W, dtype=np.int64)  # units of each step, counted as they are placed
    small = (z.dtype.kind == "i" and z.dtype.itemsize <= 4) or (z.dtype.kind == "u" and z.dtype.itemsize <= 2)
    if n_rest and scale > 0 and native.module is not None and out.dtype == np.uint8 and small:
        mask = np.zeros(z.size, dtype=np.uint8)
        mask[grouped] = 1
        native.module.assign_fill(np.ascontiguousarray(z, dtype=np.int32), mask, np.ascontiguousarray(bounds), scale,
                                  out, count)
    elif n_rest and scale > 0:
        carry = 0
        for sl in _slices(z.size):
            rz = z[sl].astype(np.int64)
            inside = grouped[(grouped >= sl.start) & (grouped < sl.stop)] - sl.start
            rz[inside] = 0
            csum = np.cumsum(rz)
            csum += carry
            carry = int(csum[-1])
            mid = (csum - 0.5 * rz) * scale
            # unit i's step: the number of bounds at or below its midpoint (at most W - 1)
            cut = np.searchsorted(mid, bounds, side="left").tolist()
            part = out[sl]
            lo = 0
            for j, hi in enumerate(cut + [mid.size]):
                if hi > lo:
                    part[lo:hi] = min(j, W - 1)
                    count[min(j, W - 1)] += hi - lo
                    lo = hi
            count -= np.bincount(part[inside], minlength=W)  # grouped: placed below
    elif n_rest:  # nothing has a size, or the groups took every step's quota: spread by count
        keep = np.ones(z.size, dtype=bool)
        keep[grouped] = False
        rest = np.flatnonzero(keep)
        out[rest] = (np.arange(rest.size, dtype=np.int64) * W) // rest.size
        count += np.bincount(out[rest], minlength=W)
    out[grouped] = gstep
    count += np.bincount(gstep, minlength=W)
    if n_rest:
        _every_rank_a_unit(out, grouped, W, dp, count)
    return out


def _mean_bound(c: np.ndarray, where: np.ndarray, W: int, dp: int, big: np.ndarray, rest_max: float) -> float:
    """Mean over the window's steps of the balance bound max(largest unit, mean share) / mean
    share: what no balancer can beat (sums in a fixed order: the same on every machine). ``big``:
    the largest units; every other one costs at most ``rest_max``, so a step's largest unit is
    looked for among ``big`` alone unless one of the others could exceed its bound."""
    total = _step_sums(where, c, W)
    top = np.zeros(W)
    np.maximum.at(top, where[big].astype(np.int64), c[big])
    share = total / dp
    if rest_max > 0 and bool((np.maximum(top, share) < rest_max).any()):
        if native.module is not None and where.dtype == np.uint8 and c.dtype == np.float64:
            native.module.step_max(np.ascontiguousarray(where), np.ascontiguousarray(c), top)
        else:
            for sl in _slices(where.size):
                np.maximum.at(top, where[sl].astype(np.int64), c[sl])
    ok = share > 0
    ratio = np.where(ok, np.maximum(top, share) / np.where(ok, share, 1.0), 1.0)
    return float(np.cumsum(ratio)[-1]) / W


def _every_rank_a_unit(out: np.ndarray, grouped: np.ndarray, W: int, dp: int, count: np.ndarray) -> None:
    """Rule 5: a step with fewer than ``dp`` units (a few long ones filled its quota) takes the
    last-drawn movable (not grouped) units of the step with the most, until every step has
    ``dp`` units or no step has any to spare (a window of fewer than W·dp units). In place
    (``out`` and ``count``, the units of each step); deterministic."""
    if int(count.min()) >= dp or out.size < W * dp:
        return
    keep = np.ones(out.size, dtype=bool)
    keep[grouped] = False
    movable = np.flatnonzero(keep)
    for s in np.flatnonzero(count < dp).tolist():
        while count[s] < dp:
            donor = int(np.argmax(count))
            if count[donor] <= dp:
                return
            take = min(dp - int(count[s]), int(count[donor]) - dp)
            cand = movable[out[movable] == donor][::-1][:take]
            if cand.size == 0:
                return
            out[cand] = s
            count[donor] -= cand.size
            count[s] += cand.size
