"""The baseline's per-rank sampling and packing, without torch (the benchmark's harness and its
simulation use it too).

Each rank draws its own units, independently of every other rank: a source by the mixture
weight of the step, then a unit of that source uniformly at random (with replacement; the
per-rank random mixing of a ``WeightedRandomSampler`` over the concatenated sources). Units are
packed greedily to the token budget: a batch takes drawn units while they fit, and the first
unit that does not fit opens the next batch (nothing is dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["RankStream", "mean_step_tokens"]

_BLOCK = 256  # draws made at a time (per weight vector)


class RankStream:
    """The packed batches of one rank: ``batch(step)`` → ``[(source index, unit index), ...]``.

    Deterministic for (seed, rank) and the weights asked for; ``weights_at(step)`` gives the
    mixture of a step (float[J], summing to 1). Call ``batch`` for steps 0, 1, 2, ... in order.
    """

    def __init__(self, unit_tokens: Sequence[np.ndarray], budget: int, *, seed: int, rank: int,
                 weights_at: Callable[[int], np.ndarray]) -> None:
        self.tokens = [np.asarray(t, np.int64) for t in unit_tokens]
        self.sizes = np.array([len(t) for t in self.tokens], np.int64)
        self.budget = int(budget)
        self.weights_at = weights_at
        self.rng = np.random.default_rng([int(seed), int(rank), 0xBA5E])
        self._carry: tuple[int, int] | None = None
        self._buf: list[tuple[int, int]] = []
        self._buf_weights: np.ndarray | None = None

    def _draw(self, w: np.ndarray) -> tuple[int, int]:
        if self._buf_weights is None or not np.array_equal(w, self._buf_weights):
            self._buf, self._buf_weights = [], w.copy()
        if not self._buf:
            src = self.rng.choice(len(w), size=_BLOCK, p=w)
            unit = (self.rng.random(_BLOCK) * self.sizes[src]).astype(np.int64)
            self._buf = list(zip(src.tolist(), unit.tolist()))[::-1]
        return self._buf.pop()

    def batch(self, step: int) -> list[tuple[int, int]]:
        w = np.asarray(self.weights_at(step), np.float64)
        out: list[tuple[int, int]] = []
        used = 0
        if self._carry is not None:
            out.append(self._carry)
            used = int(self.tokens[self._carry[0]][self._carry[1]])
            self._carry = None
        while True:
            j, k = self._draw(w)
            t = int(self.tokens[j][k])
            if used + t > self.budget and out:
                self._carry = (j, k)
                return out
            out.append((j, k))
            used += t


def mean_step_tokens(unit_tokens: Sequence[np.ndarray], budget: int, weights: np.ndarray, *, ranks: int,
                     steps: int = 200, seed: int = 0) -> float:
    """Mean tokens per step of ``ranks`` baseline ranks (their packed batches), estimated over
    ``steps`` steps of the baseline's own sampler."""
    total = 0
    for r in range(ranks):
        stream = RankStream(unit_tokens, budget, seed=seed, rank=r, weights_at=lambda _s: weights)
        for s in range(steps):
            total += sum(int(unit_tokens[j][k]) for j, k in stream.batch(s))
    return total / steps
