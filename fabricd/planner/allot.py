"""How many draws each source has had before a step: a closed form, O(J) integer operations.

THE ROUNDING RULE. Each schedule point ``k`` (a weight row ``r_k``) is a *stream* of draws.

1. Draws to streams. Every step has ``B = samples_per_step`` draws. Under ``constant`` and
   ``piecewise`` all draws of a step in ``[s_k, s_k+1)`` go to stream ``k``. Under ``linear``,
   in segment ``k`` (``L = s_k+1 - s_k`` steps, ``λ(t) = (t - s_k) / L``) stream ``k+1`` has had
   ``Nb_k(m) = floor(B · Σ_{i<m} i/L + u_k) = floor(B·m(m-1)/(2L) + u_k)`` of the first ``m``
   steps' draws and stream ``k`` the rest, ``B·m - Nb_k(m)``; after the last point every draw
   goes to the last stream. ``Nb_k`` rises by ``B·λ(t) ± 1`` and at most ``B`` per step, so
   both shares are non-decreasing.
2. Stream draws to sources. ``N`` draws of stream ``k`` are split over its sources by a
   balanced binary tree over the source order: a node with ``c`` draws gives its left half
   ``floor(p·c + u)`` and its right half the rest, ``p`` = the left half's share of the node's
   weight (exact rationals of the float weights), ``u`` a per-(seed, point, node) offset in
   [0, 1). Each split is non-decreasing in ``c`` for both halves and within 1 of ``p·c``.

``cursor(s)`` (draws of each source in steps ``[0, s)``) is the sum over streams of step 2
applied to step 1's stream totals; ``counts(s) = cursor(s+1) - cursor(s)``. Hence: exactly
``B`` draws per step, never negative, a pure function of (seed, schedule, B, s), and a source's
draws over any window of steps differ from ``B × Σ weights`` over that window by less than
``2 × (streams active in the window) × (tree depth + 1)`` (depth = ``ceil(log2 J)``). Only the
(at most two) streams active at ``s`` are split per query; the totals of finished streams are
computed once per point and kept.
"""

from __future__ import annotations

import bisect
import logging
import threading
from fractions import Fraction

import numpy as np

from fabricd.planner.mixture import MixtureSchedule

__all__ = ["Allotment"]

log = logging.getLogger(__name__)

_ONE = 1 << 64
_MASK64 = _ONE - 1
_TAG_SPLIT = 0x5EED_0F_5A11_0003
_TAG_RAMP = 0x5EED_0F_4A3B_0004


def _mix64(z: int) -> int:
    """splitmix64 finaliser on a Python int (same constants as the array version in sequence.py)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _offset(seed: int, tag: int, a: int, b: int) -> int:
    """A 64-bit offset (the numerator of u = offset / 2**64) keyed by (seed, tag, a, b)."""
    h = _mix64(_mix64(seed ^ tag) + 0x9E3779B97F4A7C15 * (a + 1))
    return _mix64(h ^ _mix64(b + 0x9E3779B97F4A7C15))


class _RowSplit:
    """Step 2 of the rule for one point's weight row: ``split(N)`` → draws of each source."""

    def __init__(self, weights: np.ndarray, *, seed: int, point: int) -> None:
        w = [Fraction(float(x)) for x in weights]
        prefix = [Fraction(0)]
        for x in w:
            prefix.append(prefix[-1] + x)
        self.size = len(w)
        # preorder (lo, mid, hi, num, den * 2**64, u * den): left = (num·c·2**64 + u·den) // (den·2**64)
        self.nodes: list[tuple[int, int, int, int, int, int]] = []
        self.depth = 0
        todo = [(0, self.size, 0)]
        while todo:
            lo, hi, level = todo.pop()
            self.depth = max(self.depth, level)
            if hi - lo == 1:
                continue
            mid = (lo + hi) // 2
            total = prefix[hi] - prefix[lo]
            p = (prefix[mid] - prefix[lo]) / total if total else Fraction(0)
            u = _offset(seed, _TAG_SPLIT, point, len(self.nodes))
            self.nodes.append((lo, mid, hi, p.numerator, p.denominator * _ONE, u * p.denominator))
            todo.append((mid, hi, level + 1))
            todo.append((lo, mid, level + 1))
        self._index = {(lo, hi): i for i, (lo, _, hi, *_rest) in enumerate(self.nodes)}

    def split(self, n: int, out: list[int]) -> int:
        """Add the draws of each source out of ``n`` draws of this row to ``out``; returns the
        number of tree nodes evaluated (the work done)."""
        if n == 0:
            return 0
        if self.size == 1:
            out[0] += n
            return 0
        work = 0
        todo = [(0, self.size, n)]
        while todo:
            lo, hi, c = todo.pop()
            if hi - lo == 1:
                out[lo] += c
                continue
            if c == 0:
                continue
            _, mid, _, num, den_one, u_den = self.nodes[self._index[(lo, hi)]]
            left = (num * c * _ONE + u_den) // den_one
            work += 1
            todo.append((mid, hi, c - left))
            todo.append((lo, mid, left))
        return work


class Allotment:
    """Cumulative draws of each source before any step, by the module's rule.

    Safe to share between threads (the lazily built per-point tables are guarded by a lock).
    ``work`` counts tree nodes and stream totals evaluated, so tests can check that a query costs
    a bounded number of operations whatever the step.
    """

    def __init__(self, *, seed: int, samples_per_step: int, schedule: MixtureSchedule) -> None:
        self.seed = int(seed) & _MASK64
        self.B = int(samples_per_step)
        self.num_sources = len(schedule.sources)
        self._steps = list(schedule.point_steps)
        self._rows = schedule.rows
        self._linear = schedule.kind == "linear" and len(self._steps) > 1
        self._ramp_u = [_offset(self.seed, _TAG_RAMP, k, 0) for k in range(len(self._steps) - 1)] if self._linear else []
        self._splits: dict[int, _RowSplit] = {}
        self._done: list[list[int]] = [[0] * self.num_sources]  # _done[k]: draws of every stream < k, finished
        self._lock = threading.Lock()
        self.work = 0

    def _split(self, k: int) -> _RowSplit:
        sp = self._splits.get(k)
        if sp is None:
            sp = self._splits[k] = _RowSplit(self._rows[k], seed=self.seed, point=k)
        return sp

    def _ramp(self, k: int, m: int) -> int:
        """Nb_k(m): draws of the first m steps of linear segment k that went to stream k+1."""
        length = self._steps[k + 1] - self._steps[k]
        return (self.B * m * (m - 1) * _ONE + 2 * length * self._ramp_u[k]) // (2 * length * _ONE)

    def _stream_draws(self, k: int, step: int) -> int:
        """Draws of stream k in steps [0, step)."""
        self.work += 1
        last = k == len(self._steps) - 1
        start = self._steps[k]
        m = max(0, step - start) if last else min(max(0, step - start), self._steps[k + 1] - start)
        if not self._linear:
            return self.B * m
        own = self.B * m - (0 if last else self._ramp(k, m))
        if k == 0:
            return own
        prev_len = start - self._steps[k - 1]
        return own + self._ramp(k - 1, min(max(0, step - self._steps[k - 1]), prev_len))

    def _finished(self, k: int) -> list[int]:
        """Draws of each source from streams < k (all finished by step s_k)."""
        while len(self._done) <= k:
            i = len(self._done) - 1
            acc = list(self._done[i])
            self.work += self._split(i).split(self._stream_draws(i, self._steps[i + 1]), acc)
            self._done.append(acc)
        return self._done[k]

    def cursor(self, step: int) -> list[int]:
        """Draws of each source in steps [0, step), as Python ints (``step >= 0``, unchecked)."""
        with self._lock:
            k = bisect.bisect_right(self._steps, step) - 1
            out = list(self._finished(k))
            self.work += self._split(k).split(self._stream_draws(k, step), out)
            if self._linear and k + 1 < len(self._steps):
                self.work += self._split(k + 1).split(self._stream_draws(k + 1, step), out)
            return out

    def depth(self, k: int) -> int:
        """Depth of point k's split tree (its error bound per stream is depth + 1 draws)."""
        with self._lock:
            return self._split(k).depth
