"""Mixture schedules: per-source sampling weights as a function of the training step.

A schedule is a list of points ``(step, {source: weight})``. Between points the weights are
held (``piecewise``) or interpolated (``linear``); ``constant`` has a single point at step 0.
Weights at each point are normalised to sum to 1, so only their ratios matter.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["SCHEDULE_KINDS", "MixtureSchedule"]

log = logging.getLogger(__name__)

SCHEDULE_KINDS = ("constant", "piecewise", "linear")


class MixtureSchedule:
    """Per-source mixture weights as a function of step (curriculum).

    Promises: ``weights(s)`` is a pure function of the constructor inputs and ``s``; every row
    is non-negative and sums to 1 (up to float rounding); a source absent from a point has
    weight 0 at that point; a source with weight 0 at every point never gets weight.
    """

    def __init__(
        self,
        kind: str,
        points: Sequence[tuple[int, Mapping[str, float]]],
        sources: Sequence[str],
    ) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown mixture schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        self.kind = kind
        self.sources: tuple[str, ...] = tuple(str(s) for s in sources)
        if not self.sources:
            raise ValueError(f"mixture schedule needs at least one source, got {list(sources)!r}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"mixture schedule sources must be unique, got {list(self.sources)!r}")
        points = list(points)
        if not points:
            raise ValueError(f"mixture schedule {kind!r} has no points: {points!r}")
        if kind == "constant" and len(points) != 1:
            raise ValueError(f"constant mixture schedule takes exactly one point, got {len(points)}: {points!r}")
        index = {name: j for j, name in enumerate(self.sources)}
        steps: list[int] = []
        rows = np.zeros((len(points), len(self.sources)), dtype=np.float64)
        for k, point in enumerate(points):
            try:
                step, mapping = point
            except (TypeError, ValueError):
                raise ValueError(f"mixture schedule point must be (step, {{source: weight}}), got {point!r}") from None
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise ValueError(f"mixture schedule point step must be an integer, got {step!r}")
            step = int(step)
            if k == 0 and step != 0:
                raise ValueError(f"first mixture schedule point must be at step 0, got step {step!r}")
            if k > 0 and step <= steps[-1]:
                raise ValueError(
                    f"mixture schedule steps must be strictly increasing, got {step!r} after {steps[-1]!r}"
                )
            steps.append(step)
            for name, weight in dict(mapping).items():
                if name not in index:
                    raise ValueError(
                        f"mixture schedule point at step {step} names unknown source {name!r}; "
                        f"sources are {list(self.sources)!r}"
                    )
                try:
                    w = float(weight)
                except (TypeError, ValueError):
                    raise ValueError(f"weight of source {name!r} at step {step} is not a number: {weight!r}") from None
                if not math.isfinite(w) or w < 0:
                    raise ValueError(f"weight of source {name!r} at step {step} must be finite and >= 0, got {weight!r}")
                rows[k, index[name]] = w
            total = math.fsum(rows[k].tolist())  # exactly rounded: identical on every machine
            if total <= 0:
                raise ValueError(f"mixture schedule weights at step {step} sum to 0: {dict(mapping)!r}")
            rows[k] /= total
        self._steps = np.asarray(steps, dtype=np.int64)
        self._rows = rows
        self._rows.setflags(write=False)

    @property
    def points(self) -> tuple[tuple[int, dict[str, float]], ...]:
        """The normalised points, in step order."""
        return tuple(
            (int(s), {n: float(w) for n, w in zip(self.sources, row)}) for s, row in zip(self._steps, self._rows)
        )

    @property
    def point_steps(self) -> tuple[int, ...]:
        """The steps of the points, strictly increasing, the first one 0."""
        return tuple(int(x) for x in self._steps)

    @property
    def rows(self) -> np.ndarray:
        """float64 (points, J), read-only: the normalised weights at each point, in source order."""
        return self._rows

    def max_weights(self) -> np.ndarray:
        """float64[J]: the largest weight each source reaches at any step."""
        return self._rows.max(axis=0)

    def weights(self, steps: int | np.ndarray) -> np.ndarray:
        """Weights at ``steps``: float64 (len(steps), J), or (J,) for an int; rows sum to 1."""
        scalar = np.ndim(steps) == 0
        s = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        if s.size and int(s.min()) < 0:
            raise ValueError(f"mixture schedule step must be >= 0, got {int(s.min())!r}")
        k = np.searchsorted(self._steps, s, side="right") - 1  # last point with step <= s
        out = self._rows[k]
        if self.kind == "linear" and len(self._steps) > 1:
            inner = k < len(self._steps) - 1
            if inner.any():
                ki = k[inner]
                s0 = self._steps[ki]
                s1 = self._steps[ki + 1]
                t = ((s[inner] - s0) / (s1 - s0).astype(np.float64))[:, None]
                out = out.copy()
                out[inner] = (1.0 - t) * self._rows[ki] + t * self._rows[ki + 1]
        return out[0].copy() if scalar else np.array(out, copy=True)

    def __repr__(self) -> str:
        return f"MixtureSchedule({self.kind!r}, {list(self.points)!r}, {list(self.sources)!r})"
