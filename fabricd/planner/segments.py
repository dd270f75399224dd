"""Plan segments: a job's steps cut at its plan changes, each range planned under its own spec.

Why. Researchers change a running job's mixture (or a bucket's context, or the curriculum's
kind) at some future step ``N``. Rebuilding the planner from the new spec alone would replay the
sources' sampling from step 0: units already delivered would come again and others never
(the Megatron-LM #457 failure). Instead a job's steps are cut into segments ``[start,
next_start)``, each planned by a :class:`~fabricd.planner.plan.Planner` of its effective spec,
and each segment continues where the previous one stopped:

- **draws carry over**: source ``j``'s draw count at a segment's start is the count the previous
  segment reached there (``start_draws``), so the k-th draw of a source is the same unit
  whichever segment draws it: sampling without replacement continues across the change, and
  every unit is drawn exactly once per epoch of its source. A source whose *units* change (its
  bucket's ``max_seq_len`` or ``long_samples``) starts its draws afresh from 0 over its new
  units, under a new permutation key (``source_keys``): its old units are a different set.
- **the schedule is read from the segment's start**: a segment's mixture schedule is its spec's
  from ``start`` on (the weights at ``start``, then the later points), in steps counted from
  ``start``; the first segment (start 0) is exactly the spec's.
- **composition windows restart** at a segment's start and the last window of a segment ends
  with it (shorter), so no window mixes units of two segments and composition keeps its
  promises (every unit of a window delivered once, within the window) in each.

A step's content is therefore a pure function of the spec, the logged plan changes (which give
the segments), the skip records and the step, as the determinism contract requires.

Which steps can still change (:func:`first_changeable`): every step before the *frontier* (the
first step no trainer can have received or a constructor built) is fixed; under composition, a
step inside a window that holds a fixed step is fixed too (cutting the window would recompose
its delivered steps), so the first changeable step is the frontier rounded up to the next window
boundary of the segmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fabricd.errors import PlanError
from fabricd.planner.mixture import MixtureSchedule
from fabricd.planner.plan import Planner, StepPlan
from fabricd.planner.units import SourceUnits

__all__ = ["SegmentedPlanner", "SegmentedSchedule", "carry_draws", "first_changeable", "localize_points",
           "same_units", "window_bounds"]

log = logging.getLogger(__name__)


def localize_points(kind: str, points: Sequence[tuple[int, dict[str, float]]], sources: Sequence[str],
                    start: int) -> list[tuple[int, dict[str, float]]]:
    """A schedule's points as seen from ``start``: the weights at ``start`` (the point itself when
    one lies there, so a segment starting at a point plans exactly as the spec says), then the
    later points, with steps counted from ``start``."""
    if any(step == start for step, _ in points):
        first = next(w for step, w in points if step == start)
    else:
        w = MixtureSchedule(kind, points, sources).weights(start)
        first = {n: float(x) for n, x in zip(sources, w.tolist())}
    return [(0, dict(first))] + [(step - start, dict(w)) for step, w in points if step > start]


def same_units(a: SourceUnits, b: SourceUnits) -> bool:
    """Whether two builds of a source's units are the same units (same ids, pieces and lengths)."""
    return len(a) == len(b) and bool(np.array_equal(a.sample_id, b.sample_id)
                                      and np.array_equal(a.piece, b.piece) and np.array_equal(a.tokens, b.tokens))


def carry_draws(prev: Planner, start: int, units: Sequence[SourceUnits]) -> tuple[list[int], list[int]]:
    """``(start_draws, source_keys)`` of the segment starting at ``start`` after ``prev``, in the
    sequence's source order: each source's draws so far and its permutation key, both carried
    over; a source whose units differ from ``prev``'s (``units``, in the same order) starts at 0
    draws under a key never used before (its old key + the number of sources)."""
    cursor = prev.sequence.cursor(start - prev.start_step).tolist()
    keys = list(prev.sequence.source_keys)
    ordered = [prev.sources[i] for i in prev._seq_to_planner]
    draws = []
    for j, (old, new) in enumerate(zip(ordered, units)):
        if same_units(old, new):
            draws.append(int(cursor[j]))
        else:
            draws.append(0)
            keys[j] += len(keys)
    return draws, keys


def window_bounds(starts: Sequence[int], window: int, step: int) -> tuple[int, int | None]:
    """``[lo, hi)`` of the composition window holding ``step`` when segments start at ``starts``
    (``hi`` None: unbounded, never with ``window`` >= 1)."""
    i = int(np.searchsorted(np.asarray(starts, dtype=np.int64), step, side="right")) - 1
    lo = starts[i] + ((step - starts[i]) // window) * window
    hi = lo + window
    if i + 1 < len(starts):
        hi = min(hi, starts[i + 1])
    return lo, hi


def first_changeable(starts: Sequence[int], window: int, frontier: int) -> int:
    """The first step a plan change may take effect at, given that no step at or past
    ``frontier`` was planned or delivered and that segments start at ``starts`` with composition
    windows of ``window`` steps (1: no composition): ``frontier`` itself when it starts a window,
    else the end of the window holding it. Every later step can change too."""
    frontier = max(0, int(frontier))
    lo, hi = window_bounds(starts, max(1, int(window)), frontier)
    return frontier if lo == frontier else int(hi)


class SegmentedSchedule:
    """The mixture weights of a segmented plan, by absolute step (for autoscaling and ``plan
    show``): ``weights``, ``points`` and ``sources`` as :class:`MixtureSchedule` has them."""

    def __init__(self, planners: Sequence[Planner]) -> None:
        self._planners = tuple(planners)
        self._starts = np.asarray([p.start_step for p in planners], dtype=np.int64)
        self.sources = planners[0].schedule.sources

    @property
    def points(self) -> tuple[tuple[int, dict[str, float]], ...]:
        return tuple((p.start_step + s, w) for p in self._planners for s, w in p.schedule.points)

    def weights(self, steps: int | np.ndarray) -> np.ndarray:
        scalar = np.ndim(steps) == 0
        s = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        seg = np.searchsorted(self._starts, s, side="right") - 1
        out = np.zeros((s.size, len(self.sources)), dtype=np.float64)
        for i in np.unique(seg).tolist():
            sel = seg == i
            out[sel] = self._planners[i].schedule.weights(s[sel] - int(self._starts[i]))
        return out[0] if scalar else out


class SegmentedPlanner:
    """A job's planner across its plan changes: one :class:`Planner` per segment, contiguous from
    step 0 (see the module doc). ``plan(step, dp_size)`` is the segment's; promises as Planner's.
    """

    def __init__(self, planners: Sequence[Planner]) -> None:
        planners = tuple(planners)
        if not planners or planners[0].start_step != 0 or planners[-1].end_step is not None or any(
                a.end_step != b.start_step for a, b in zip(planners, planners[1:])):
            raise PlanError("plan segments must be contiguous from step 0, the last one unbounded: "
                            f"{[(p.start_step, p.end_step) for p in planners]!r}")
        self.planners = planners
        self.starts = tuple(p.start_step for p in planners)
        first = planners[0]
        self.sources, self.samples_per_step = first.sources, first.samples_per_step
        self.compose, self.window, self.dp_history = first.compose, first.window, first.dp_history
        self.schedule = SegmentedSchedule(planners)

    def segment(self, step: int) -> Planner:
        """The planner of the segment holding ``step``."""
        return self.planners[int(np.searchsorted(np.asarray(self.starts), int(step), side="right")) - 1]

    def plan(self, step: int, dp_size: int) -> StepPlan:
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or int(step) < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        return self.segment(step).plan(step, dp_size)

    def sources_at(self, step: int) -> tuple[SourceUnits, ...]:
        """The units the sources have at ``step`` (a bucket change makes new ones)."""
        return self.segment(step).sources

    def first_changeable(self, frontier: int) -> int:
        """See :func:`first_changeable`."""
        return first_changeable(self.starts, self.window, frontier)
