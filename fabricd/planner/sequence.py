"""Units and the global unit sequence.

``build_units`` expands a source's samples into *units* (a sample, or one context-sized piece
of a long text-only sample). ``GlobalSequence`` fixes which units every step consumes: a pure
function of (seed, mixture schedule, per-source unit counts, step), independent of the DP world
size. Random access is cheap: counts of any step come from a counter-based hash, cursors from
block prefix sums, and unit indices from a keyed bijection evaluated per index (no permutation
is ever materialised).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fabricd.errors import PlanError
from fabricd.planner.mixture import MixtureSchedule

__all__ = [
    "LONG_SAMPLE_POLICIES",
    "CURSOR_BLOCK_STEPS",
    "SourceUnits",
    "build_units",
    "GlobalSequence",
    "feistel_permute",
]

log = logging.getLogger(__name__)

LONG_SAMPLE_POLICIES = ("split", "truncate")

#: Steps per cursor block: the prefix of counts at every block start is cached.
CURSOR_BLOCK_STEPS = 65536

_FEISTEL_ROUNDS = 6
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = _U64(30), _U64(27), _U64(31), _U64(11)
# Domain-separation constants: one per use of the hash, so streams never collide.
_TAG_STEP = 0x5EED_0F_57E9_0001
_TAG_PERM = 0x5EED_0F_9E72_0002
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- units


@dataclass(frozen=True)
class SourceUnits:
    """The units of one source, in sample order (pieces of a sample are consecutive)."""

    name: str
    sample_id: np.ndarray  # int64[N]  sample id = row of the source's index
    piece: np.ndarray  # int32[N]  0 unless the sample was split
    tokens: np.ndarray  # int32[N]  length of the unit in tokens
    images: np.ndarray  # int32[N]  images in the unit

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])


def build_units(
    name: str,
    text_tokens: np.ndarray,
    num_images: np.ndarray,
    *,
    max_seq_len: int,
    long_samples: str,
    image_tokens: int,
) -> SourceUnits:
    """Expand samples into units by THE RULE (the sample transform produces exactly these lengths).

    Full length ``L = text_tokens + num_images * image_tokens``. A text-only sample under the
    ``"split"`` policy yields ``ceil(L / max_seq_len)`` pieces of ``min(max_seq_len, L - j*max_seq_len)``
    tokens; every other sample yields one unit of ``min(L, max_seq_len)`` tokens carrying
    ``num_images`` images (an upper bound when truncated). Vectorized: O(N + units).
    """
    if long_samples not in LONG_SAMPLE_POLICIES:
        raise ValueError(f"source {name!r}: unknown long_samples policy {long_samples!r}; expected one of {LONG_SAMPLE_POLICIES}")
    if isinstance(max_seq_len, bool) or int(max_seq_len) != max_seq_len or not 1 <= int(max_seq_len) < 2**31:
        raise ValueError(f"source {name!r}: max_seq_len must be an integer in [1, 2**31), got {max_seq_len!r}")
    if isinstance(image_tokens, bool) or int(image_tokens) != image_tokens or int(image_tokens) < 0:
        raise ValueError(f"source {name!r}: image_tokens must be an integer >= 0, got {image_tokens!r}")
    msl = int(max_seq_len)
    text = np.asarray(text_tokens).astype(np.int64, copy=False).ravel()
    imgs = np.asarray(num_images).astype(np.int64, copy=False).ravel()
    if text.shape != imgs.shape:
        raise ValueError(f"source {name!r}: text_tokens has {text.shape[0]} rows but num_images has {imgs.shape[0]}")
    if text.size:
        bad = np.flatnonzero(text <= 0)
        if bad.size:
            raise ValueError(f"source {name!r}: sample {int(bad[0])} has text_tokens {int(text[bad[0]])} (must be > 0, EOS included)")
        bad = np.flatnonzero(imgs < 0)
        if bad.size:
            raise ValueError(f"source {name!r}: sample {int(bad[0])} has num_images {int(imgs[bad[0]])} (must be >= 0)")
    full = text + imgs * int(image_tokens)
    if long_samples == "split":
        npieces = np.where(imgs == 0, (full + (msl - 1)) // msl, 1)
    else:
        npieces = np.ones_like(full)
    total = int(npieces.sum())
    sample_id = np.repeat(np.arange(text.size, dtype=np.int64), npieces)
    first = np.cumsum(npieces) - npieces
    piece = np.arange(total, dtype=np.int64) - np.repeat(first, npieces)
    tokens = np.minimum(msl, np.repeat(full, npieces) - piece * msl)
    images = np.repeat(imgs, npieces)
    if images.size and int(images.max()) >= 2**31:
        raise ValueError(f"source {name!r}: num_images {int(images.max())} does not fit int32")
    return SourceUnits(
        name=str(name),
        sample_id=sample_id,
        piece=piece.astype(np.int32),
        tokens=tokens.astype(np.int32),
        images=images.astype(np.int32),
    )


# --------------------------------------------------------------------------- hashing


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _u64(x: int) -> np.ndarray:
    return np.array([int(x) & _MASK64], dtype=np.uint64)


def _uniform(seed: int, steps: np.ndarray) -> np.ndarray:
    """A uniform float64 in [0, 1) per step, from a counter-based hash of (seed, step)."""
    with np.errstate(over="ignore"):
        key = _mix(_u64(seed) ^ _u64(_TAG_STEP))
        h = _mix(key ^ _mix(steps.astype(np.uint64) + _GOLDEN))
    return (h >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)


def _perm_keys(seed: int, source: int, epochs: np.ndarray) -> list[np.ndarray]:
    """Feistel round keys for (seed, source, epoch) of each element.

    Keys are computed once per distinct epoch; with a single epoch they are shape (1,) and
    broadcast, which is the common case (a step rarely crosses an epoch boundary).
    """
    uniq, inv = np.unique(epochs, return_inverse=True)
    with np.errstate(over="ignore"):
        base = _mix(_mix(_u64(seed) ^ _u64(_TAG_PERM)) + _u64(source + 1) * _GOLDEN)
        k = _mix(base ^ _mix(uniq.astype(np.uint64) * _M2 + _GOLDEN))
        keys = [_mix(k + _U64(r + 1) * _GOLDEN) for r in range(_FEISTEL_ROUNDS)]
    if uniq.size == 1:
        return keys
    return [kr[inv] for kr in keys]


def _feistel_once(x: np.ndarray, keys: list[np.ndarray], bits: int) -> np.ndarray:
    """One pass of an (unbalanced when ``bits`` is odd) Feistel network: a bijection of [0, 2**bits)."""
    a = bits // 2  # width of the half that gets mixed
    b = bits - a  # width of the half that feeds the round function
    sa, sb = _U64(a), _U64(b)
    mask_a, mask_b = _U64((1 << a) - 1), _U64((1 << b) - 1)
    with np.errstate(over="ignore"):
        for k in keys:
            left = x >> sb
            right = x & mask_b
            x = (right << sa) | (left ^ (_mix(right ^ k) & mask_a))
    return x


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
    x = _feistel_once(x, keys, bits)
    nn = _U64(n)
    out = x >= nn
    while out.any():  # cycle walking: terminates because x's cycle returns into [0, n)
        sel = np.flatnonzero(out)
        sub_keys = keys if keys[0].size == 1 else [k[sel] for k in keys]
        x[sel] = _feistel_once(x[sel], sub_keys, bits)
        out[sel] = x[sel] >= nn
    return x.astype(np.int64).reshape(idx.shape)


# --------------------------------------------------------------------------- global sequence


class GlobalSequence:
    """The global unit sequence: which units each step consumes, fixed by seed and schedule.

    Promises: ``counts(s)`` sums to ``samples_per_step`` and has expectation
    ``samples_per_step * weights(s)`` (systematic sampling); the k-th draw of source j is unit
    ``perm_{j, k // N_j}(k mod N_j)``, so within an epoch of a source no unit repeats and after
    ``N_j`` draws every unit was drawn exactly once; every epoch is a fresh shuffle. Nothing
    depends on the DP world size, on call order or on process state. Caches cursor prefixes
    (one int64[J] per ``block_steps`` steps, plus the last cursor), so an instance is cheap to
    query but not safe to share between threads.
    """

    def __init__(
        self,
        *,
        seed: int,
        samples_per_step: int,
        schedule: MixtureSchedule,
        source_sizes: Sequence[int],
        block_steps: int = CURSOR_BLOCK_STEPS,
    ) -> None:
        if isinstance(samples_per_step, bool) or int(samples_per_step) != samples_per_step or int(samples_per_step) < 1:
            raise ValueError(f"samples_per_step must be an integer >= 1, got {samples_per_step!r}")
        if int(block_steps) < 1:
            raise ValueError(f"block_steps must be >= 1, got {block_steps!r}")
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
        self.block_steps = int(block_steps)
        self._block_starts: list[np.ndarray] = [np.zeros(len(sizes), dtype=np.int64)]
        self._last: tuple[int, np.ndarray] = (0, self._block_starts[0])

    @property
    def num_sources(self) -> int:
        return int(self.source_sizes.shape[0])

    def _counts_range(self, start: int, stop: int) -> np.ndarray:
        """int64 (stop - start, J): counts of steps [start, stop), one row per step."""
        steps = np.arange(start, stop, dtype=np.int64)
        B = float(self.samples_per_step)
        c = np.cumsum(self.schedule.weights(steps), axis=1) * B
        np.minimum(c, B, out=c)
        u = _uniform(self.seed, steps)[:, None]
        # Float guard: c + u may round up to B + 1 (large B) or the cumsum may end below B,
        # so clamp the edges to [0, B] and pin the last one: the counts then sum to B exactly.
        edges = np.minimum(np.floor(c + u).astype(np.int64), self.samples_per_step)
        edges[:, -1] = self.samples_per_step
        return np.diff(edges, axis=1, prepend=0)

    def _sum_counts(self, start: int, stop: int) -> np.ndarray:
        total = np.zeros(self.num_sources, dtype=np.int64)
        chunk = max(1, (1 << 21) // max(1, self.num_sources))
        for a in range(start, stop, chunk):
            total += self._counts_range(a, min(stop, a + chunk)).sum(axis=0)
        return total

    @staticmethod
    def _check_step(step: int) -> int:
        if isinstance(step, bool) or int(step) != step or int(step) < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        return int(step)

    def counts(self, step: int) -> np.ndarray:
        """int64[J]: units drawn from each source at ``step``; sums to samples_per_step."""
        step = self._check_step(step)
        return self._counts_range(step, step + 1)[0]

    def cursor(self, step: int) -> np.ndarray:
        """int64[J]: units drawn from each source in steps [0, step)."""
        step = self._check_step(step)
        block = step // self.block_steps
        while len(self._block_starts) <= block:
            b = len(self._block_starts) - 1
            start = b * self.block_steps
            self._block_starts.append(self._block_starts[b] + self._sum_counts(start, start + self.block_steps))
        base_step = block * self.block_steps
        base = self._block_starts[block]
        last_step, last = self._last
        if base_step <= last_step <= step:
            base_step, base = last_step, last
        result = base + self._sum_counts(base_step, step)
        self._last = (step, result)
        return result.copy()

    def epoch(self, step: int) -> np.ndarray:
        """int64[J]: epoch of each source at the start of ``step`` (0 for empty sources)."""
        cur = self.cursor(step)
        return np.where(self.source_sizes > 0, cur // np.maximum(self.source_sizes, 1), 0)

    def step_units(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index int32[B], unit index int64[B]) of ``step``, ordered by source then draw."""
        step = self._check_step(step)
        start = self.cursor(step)
        n = self.counts(step)
        src = np.repeat(np.arange(self.num_sources, dtype=np.int32), n)
        unit = np.empty(self.samples_per_step, dtype=np.int64)
        offset = 0
        for j in np.flatnonzero(n):
            cnt = int(n[j])
            size = int(self.source_sizes[j])
            if size == 0:  # unreachable: excluded at construction
                raise PlanError(f"source {self.schedule.sources[j]!r} drawn at step {step} but has 0 units")
            draws = int(start[j]) + np.arange(cnt, dtype=np.int64)
            unit[offset : offset + cnt] = feistel_permute(
                draws % size, size, seed=self.seed, source=int(j), epoch=draws // size
            )
            offset += cnt
        self._last = (step + 1, start + n)
        return src, unit
