"""The global unit sequence: which units of which source every step consumes.

``GlobalSequence`` is a pure function of (seed, mixture schedule, samples per step, per-source
unit counts, step), independent of the DP world size. Seeking to any step costs a bounded number
of operations (nothing is summed step by step):

* how many draws each source has had before a step (its *cursor*) has a closed form, the
  rounding rule of :mod:`fabricd.planner.allot`: per-point streams of draws (linear ramps split
  a step's draws between the two points by ``floor(B·m(m-1)/(2L) + u)``), each stream's draws
  split over sources by a binary tree of monotone roundings ``floor(p·c + u)``; a step's counts
  are the difference of two cursors, so they sum to exactly ``samples_per_step``;
* the k-th draw of source j is unit ``perm_{j, k // N_j}(k mod N_j)``, a keyed Feistel bijection
  per (seed, source, epoch) evaluated per index (no permutation is ever materialised).

Units and the length rule live in :mod:`fabricd.planner.units` (re-exported here).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from fabric_client.limits import MAX_STEP

from fabricd.errors import PlanError
from fabricd.planner import native
from fabricd.planner.allot import Allotment
from fabricd.planner.mixture import MixtureSchedule
from fabricd.planner.units import LONG_SAMPLE_POLICIES, SourceUnits, build_units

__all__ = [
    "LONG_SAMPLE_POLICIES",
    "SourceUnits",
    "build_units",
    "GlobalSequence",
    "feistel_permute",
]

log = logging.getLogger(__name__)

_FEISTEL_ROUNDS = 6
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)
# Domain-separation constants: one per use of the hash, so streams never collide.
_TAG_PERM = 0x5EED_0F_9E72_0002
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- hashing


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _u64(x: int) -> np.ndarray:
    return np.array([int(x) & _MASK64], dtype=np.uint64)


def _perm_keys(seed: int, source: int, epochs: np.ndarray) -> list[np.ndarray]:
    """Feistel round keys for (seed, source, epoch) of each element.

    Keys are computed once per distinct epoch; with a single epoch they are shape (1,) and
    broadcast, which is the common case (a step rarely crosses an epoch boundary).
    """
    if epochs.size and int(epochs.min()) == int(epochs.max()):  # the common case, without a sort
        uniq, inv = epochs[:1], None
    elif epochs.size and bool((epochs[1:] >= epochs[:-1]).all()):  # a step's draws: rising, no sort
        new = np.empty(epochs.size, dtype=bool)
        new[0] = True
        np.not_equal(epochs[1:], epochs[:-1], out=new[1:])
        uniq, inv = epochs[new], np.cumsum(new) - 1
    else:
        uniq, inv = np.unique(epochs, return_inverse=True)
    with np.errstate(over="ignore"):
        base = _mix(_mix(_u64(seed) ^ _u64(_TAG_PERM)) + _u64(source + 1) * _GOLDEN)
        k = _mix(base ^ _mix(uniq.astype(np.uint64) * _M2 + _GOLDEN))
        keys = [_mix(k + _U64(r + 1) * _GOLDEN) for r in range(_FEISTEL_ROUNDS)]
    if uniq.size == 1:
        return keys
    return [kr[inv] for kr in keys]


def _feistel_once(x: np.ndarray, keys: list[np.ndarray], bits: int) -> np.ndarray:
    """One pass of an (unbalanced when ``bits`` is odd) Feistel network: a bijection of [0, 2**bits).
    Overwrites and returns ``x``; the rounds work in three scratch arrays (no temporaries)."""
    a = bits // 2  # width of the half that gets mixed
    b = bits - a  # width of the half that feeds the round function
    sa, sb = _U64(a), _U64(b)
    mask_a, mask_b = _U64((1 << a) - 1), _U64((1 << b) - 1)
    right = np.empty_like(x)
    f = np.empty_like(x)
    tmp = np.empty_like(x)
    with np.errstate(over="ignore"):
        for k in keys:
            np.bitwise_and(x, mask_b, out=right)
            np.bitwise_xor(right, k, out=f)
            _mix_inplace(f, tmp)  # f = _mix(right ^ k)
            f &= mask_a
            x >>= sb  # left
            x ^= f
            right <<= sa
            x |= right  # (right << a) | (left ^ f)
    return x


#: Indices per block of a Feistel pass: a block and its scratch stay in the CPU's cache, which
#: halves the time of a pass over a step's draws.
_BLOCK = 1 << 14


def _feistel_blocks(x: np.ndarray, keys: list[np.ndarray], bits: int) -> np.ndarray:
    """``_feistel_once`` over ``x`` (in place) block by block; per-index keys are sliced along."""
    for i in range(0, x.size, _BLOCK):
        block = [k if k.size == 1 else k[i:i + _BLOCK] for k in keys]
        _feistel_once(x[i:i + _BLOCK], block, bits)
    return x


def _mix_inplace(z: np.ndarray, tmp: np.ndarray) -> None:
    """``z = _mix(z)`` in place (``tmp``: scratch of the same shape)."""
    np.right_shift(z, _S30, out=tmp)
    z ^= tmp
    z *= _M1
    np.right_shift(z, _S27, out=tmp)
    z ^= tmp
    z *= _M2
    np.right_shift(z, _S31, out=tmp)
    z ^= tmp


def feistel_permute(index: np.ndarray, n: int, *, seed: int, source: int, epoch: np.ndarray | int) -> np.ndarray:
    """Image of ``index`` (values in [0, n)) under a keyed pseudo-random bijection of [0, n).

    The bijection is a Feistel network (splitmix64 round function, unbalanced for an odd bit
    count) over the next power of two >= max(n, 4), with cycle walking back into [0, n); keyed by
    (seed, source, epoch). O(1) memory per index, any n >= 1, expected < 2 passes per index.
    """
    idx = np.asarray(index, dtype=np.int64)
    n = int(n)
    if n < 1:
        raise ValueError(f"permutation domain size must be >= 1, got {n!r}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"permutation index out of [0, {n}): {int(idx.min())}..{int(idx.max())}")
    bits = max(2, (n - 1).bit_length())
    ep = np.broadcast_to(np.asarray(epoch, dtype=np.int64), idx.shape).ravel()
    x = idx.ravel().astype(np.uint64)
    keys = _perm_keys(source=source, seed=seed, epochs=ep)
    if native.module is not None and bits <= 62:  # the same network, index by index, in C
        native.module.feistel(x, np.stack(keys).ravel() if keys[0].size > 1 else
                              np.concatenate(keys), bits, n)
        return x.astype(np.int64).reshape(idx.shape)
    nn = _U64(n)
    if keys[0].size == 1 and 2 * x.size >= (1 << bits):
        # the indices cover much of the domain (a step drawing a small source whole): tabulate
        # the network over all of [0, 2**bits) once, then walk cycles by table lookups
        table = _feistel_blocks(np.arange(1 << bits, dtype=np.uint64), keys, bits)
        x = table[x]
        out = x >= nn
        while out.any():
            sel = np.flatnonzero(out)
            x[sel] = table[x[sel]]
            out[sel] = x[sel] >= nn
        return x.astype(np.int64).reshape(idx.shape)
    _feistel_blocks(x, keys, bits)
    out = x >= nn
    while out.any():  # cycle walking: terminates because x's cycle returns into [0, n)
        sel = np.flatnonzero(out)
        sub_keys = keys if keys[0].size == 1 else [k[sel] for k in keys]
        x[sel] = _feistel_blocks(x[sel], sub_keys, bits)
        out[sel] = x[sel] >= nn
    return x.astype(np.int64).reshape(idx.shape)


# --------------------------------------------------------------------------- global sequence


class GlobalSequence:
    """The global unit sequence: which units each step consumes, fixed by seed and schedule.

    Promises: ``counts(s)`` sums to exactly ``samples_per_step``; a source's draws over any
    window of steps track ``samples_per_step × Σ weights`` over the window within a bounded
    error (see :mod:`fabricd.planner.allot`); the k-th draw of source j is unit
    ``perm_{j, k // N_j}(k mod N_j)``, so within an epoch of a source no unit repeats and after
    ``N_j`` draws every unit was drawn exactly once; every epoch is a fresh shuffle. Nothing
    depends on the DP world size, on call order or on process state. ``cursor``/``counts`` of
    any step up to ``MAX_STEP`` cost O(J + log points) integer operations (``work`` counts
    them); a step past ``MAX_STEP`` is a PlanError naming the bound. Safe to share between
    threads.
    """

    def __init__(
        self,
        *,
        seed: int,
        samples_per_step: int,
        schedule: MixtureSchedule,
        source_sizes: Sequence[int],
        start_draws: Sequence[int] = (),
        source_keys: Sequence[int] = (),
    ) -> None:
        if isinstance(samples_per_step, bool) or int(samples_per_step) != samples_per_step or int(samples_per_step) < 1:
            raise ValueError(f"samples_per_step must be an integer >= 1, got {samples_per_step!r}")
        sizes = np.asarray([int(n) for n in source_sizes], dtype=np.int64)
        if sizes.shape[0] != len(schedule.sources):
            raise ValueError(
                f"source_sizes has {sizes.shape[0]} entries but the schedule has sources {list(schedule.sources)!r}"
            )
        if sizes.size and int(sizes.min()) < 0:
            raise ValueError(f"source sizes must be >= 0, got {sizes.tolist()!r}")
        peak = schedule.max_weights()
        for j, name in enumerate(schedule.sources):
            if peak[j] > 0 and sizes[j] == 0:
                raise PlanError(f"source {name!r} has mixture weight {peak[j]:.6g} at some step but 0 units")
        self.seed = int(seed)
        self.samples_per_step = int(samples_per_step)
        self.schedule = schedule
        self.source_sizes = sizes
        # a plan segment continues each source's draws where the previous segment left them
        # (sampling without replacement across a plan change); the permutation of source j is
        # keyed by source_keys[j] (default j: a source whose units changed gets a fresh key)
        self.start_draws = np.asarray([int(x) for x in start_draws] or [0] * sizes.size, dtype=np.int64)
        self.source_keys = tuple(int(k) for k in source_keys) or tuple(range(sizes.size))
        if self.start_draws.shape != sizes.shape or len(self.source_keys) != sizes.size \
                or (self.start_draws.size and int(self.start_draws.min()) < 0):
            raise ValueError(f"start_draws {self.start_draws.tolist()!r} and source_keys {self.source_keys!r} need "
                             f"one entry (>= 0) per source ({sizes.size})")
        self._allot = Allotment(seed=self.seed, samples_per_step=self.samples_per_step, schedule=schedule)

    @property
    def num_sources(self) -> int:
        return int(self.source_sizes.shape[0])

    @property
    def work(self) -> int:
        """Integer operations spent on cursors so far (tree nodes and stream totals evaluated)."""
        return self._allot.work

    def _check_step(self, step: int) -> int:
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or int(step) < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        step = int(step)
        if step > MAX_STEP:
            raise PlanError(f"step {step} is past the largest step MAX_STEP = 2**40 = {MAX_STEP}")
        if self.samples_per_step * (step + 1) >= 2**63:
            raise PlanError(f"step {step}: (step + 1) × samples_per_step {self.samples_per_step} draws "
                            f"exceed 2**63 (a source's draw count must fit int64)")
        return step

    def _cursor(self, step: int) -> np.ndarray:
        return self.start_draws + np.asarray(self._allot.cursor(step), dtype=np.int64)

    def counts(self, step: int) -> np.ndarray:
        """int64[J]: units drawn from each source at ``step``; sums to samples_per_step."""
        step = self._check_step(step)
        return self._cursor(step + 1) - self._cursor(step)

    def cursor(self, step: int) -> np.ndarray:
        """int64[J]: units drawn from each source in steps [0, step) (plus ``start_draws``)."""
        return self._cursor(self._check_step(step))

    def epoch(self, step: int) -> np.ndarray:
        """int64[J]: epoch of each source at the start of ``step`` (0 for empty sources)."""
        cur = self.cursor(step)
        return np.where(self.source_sizes > 0, cur // np.maximum(self.source_sizes, 1), 0)

    def step_units(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index int32[B], unit index int64[B]) of ``step``, ordered by source then draw."""
        step = self._check_step(step)
        start = self._cursor(step)
        n = self._cursor(step + 1) - start
        src = np.repeat(np.arange(self.num_sources, dtype=np.int32), n)
        unit = np.empty(self.samples_per_step, dtype=np.int64)
        offset = 0
        for j in np.flatnonzero(n):
            cnt = int(n[j])
            size = int(self.source_sizes[j])
            if size == 0:  # unreachable: excluded at construction
                raise PlanError(f"source {self.schedule.sources[j]!r} drawn at step {step} but has 0 units")
            # one call per epoch the draws span (a step may draw a small source many times over):
            # each call's keys are shared by all its draws
            first = int(start[j])
            end = first + cnt
            while first < end:
                epoch = first // size
                stop = min(end, (epoch + 1) * size)
                idx = np.arange(first - epoch * size, stop - epoch * size, dtype=np.int64)
                unit[offset : offset + idx.size] = feistel_permute(idx, size, seed=self.seed,
                                                                   source=self.source_keys[j], epoch=epoch)
                offset += idx.size
                first = stop
        return src, unit
