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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fabricd.errors import PlanError
from fabricd.planner.compose import window_bounds
from fabricd.planner.mixture import MixtureSchedule
from fabricd.planner.plan import Planner, StepPlan
from fabricd.planner.sequence import GlobalSequence
from fabricd.planner.units import SourceUnits

__all__ = ["BuildSegment", "SegmentHead", "SegmentedPlanner", "SegmentedSchedule", "carry_draws", "carry_sequence", "first_changeable", "localize_points",
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
    return a is b or len(a) == len(b) and bool(np.array_equal(a.sample_id, b.sample_id)
                                      and np.array_equal(a.piece, b.piece) and np.array_equal(a.tokens, b.tokens))


def carry_draws(prev: Planner, start: int, units: Sequence[SourceUnits]) -> tuple[list[int], list[int]]:
    """``(start_draws, source_keys)`` of the segment starting at ``start`` after ``prev``, in the
    sequence's source order: each source's draws so far and its permutation key, both carried
    over; a source whose units differ from ``prev``'s (``units``, in the same order) starts at 0
    draws under a key never used before (its old key + the number of sources)."""
    ordered = [prev.sources[i] for i in prev._seq_to_planner]
    return carry_sequence(prev.sequence, prev.start_step, ordered, start, units)


def carry_sequence(sequence: GlobalSequence, prev_start: int, ordered: Sequence[SourceUnits], start: int,
                   units: Sequence[SourceUnits]) -> tuple[list[int], list[int]]:
    """:func:`carry_draws` from the previous segment's draw ``sequence`` (it starts at
    ``prev_start``; ``ordered``: its units in the sequence's source order) alone, without its
    planner."""
    cursor = sequence.cursor(start - prev_start).tolist()
    keys = list(sequence.source_keys)
    draws = []
    for j, (old, new) in enumerate(zip(ordered, units)):
        if same_units(old, new):
            draws.append(int(cursor[j]))
        else:
            draws.append(0)
            keys[j] += len(keys)
    return draws, keys


def first_changeable(starts: Sequence[int], window: int, frontier: int) -> int:
    """The first step a plan change may take effect at, given that no step at or past
    ``frontier`` was planned or delivered and that segments start at ``starts`` with composition
    windows of ``window`` steps (1: no composition): ``frontier`` itself when it starts a window,
    else the end of the window holding it. Every later step can change too."""
    frontier = max(0, int(frontier))
    lo, hi = window_bounds(starts, max(1, int(window)), frontier)
    return frontier if lo == frontier else int(hi)


@dataclass(frozen=True, eq=False)
class SegmentHead:
    """What a segment's planner is made of, short of its end and its unit arrays: its start, the
    spec in effect (``spec``, opaque here), its sources' units in the spec's order, its mixture
    schedule read from ``start``, its draws per step and seed, and the draws and permutation keys
    it carries over (as :class:`Planner` takes them: empty for the first segment). ``sequence`` is
    the segment's draw sequence (the very one its planner draws by), so the head of the next
    segment follows from this one alone (:meth:`carry`): a late segment's start never needs the
    planners of the earlier ones."""

    start: int
    spec: Any
    units: tuple[SourceUnits, ...]
    schedule: MixtureSchedule
    samples_per_step: int
    seed: int
    start_draws: tuple[int, ...]
    source_keys: tuple[int, ...]
    sequence: GlobalSequence

    @classmethod
    def make(cls, *, start: int, spec: Any, units: Sequence[SourceUnits], schedule: MixtureSchedule,
             samples_per_step: int, seed: int, start_draws: Sequence[int] = (),
             source_keys: Sequence[int] = ()) -> "SegmentHead":
        """A head, its sequence built as its planner builds it (so a source weighted with no
        units is refused here, as the planner refuses it)."""
        by_name = {u.name: u for u in units}
        sequence = GlobalSequence(seed=seed, samples_per_step=samples_per_step, schedule=schedule,
                                  source_sizes=[len(by_name[n]) for n in schedule.sources],
                                  start_draws=start_draws, source_keys=source_keys)
        return cls(start=int(start), spec=spec, units=tuple(units), schedule=schedule,
                   samples_per_step=int(samples_per_step), seed=int(seed), start_draws=tuple(start_draws),
                   source_keys=tuple(source_keys), sequence=sequence)

    def carry(self, start: int, units: Sequence[SourceUnits]) -> tuple[list[int], list[int]]:
        """``(start_draws, source_keys)`` of the segment after this one, starting at ``start``
        with ``units``: what :func:`carry_draws` gives from this segment's planner."""
        by_name = {u.name: u for u in self.units}
        return carry_sequence(self.sequence, self.start, [by_name[n] for n in self.schedule.sources], start, units)


class SegmentedSchedule:
    """The mixture weights of a segmented plan, by absolute step (for autoscaling and ``plan
    show``): ``weights``, ``points`` and ``sources`` as :class:`MixtureSchedule` has them."""

    def __init__(self, starts: Sequence[int], schedules: Sequence[MixtureSchedule]) -> None:
        self._schedules = tuple(schedules)
        self._starts = np.asarray(starts, dtype=np.int64)
        self.sources = self._schedules[0].sources

    @property
    def points(self) -> tuple[tuple[int, dict[str, float]], ...]:
        return tuple((int(start) + s, w) for start, sched in zip(self._starts.tolist(), self._schedules)
                     for s, w in sched.points)

    def weights(self, steps: int | np.ndarray) -> np.ndarray:
        scalar = np.ndim(steps) == 0
        s = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        seg = np.searchsorted(self._starts, s, side="right") - 1
        out = np.zeros((s.size, len(self.sources)), dtype=np.float64)
        for i in np.unique(seg).tolist():
            sel = seg == i
            out[sel] = self._schedules[i].weights(s[sel] - int(self._starts[i]))
        return out[0] if scalar else out


#: Builds the planner of one segment: (its head, its end step or None) → the planner.
BuildSegment = Callable[[SegmentHead, "int | None"], Planner]


class SegmentedPlanner:
    """A job's planner across its plan changes: one :class:`Planner` per segment, contiguous from
    step 0 (see the module doc). ``plan(step, dp_size)`` is the segment's; promises as Planner's.

    A segment's planner is built (by ``build``, from its :class:`SegmentHead` and end) only when a
    step of it is first planned, and ``build`` may keep only a few recent ones: a job with
    thousands of plan changes holds the heads (a few hundred bytes each), not thousands of
    planners. ``compose``, ``window`` and ``dp_history``: the job's, as its planners have them.
    """

    def __init__(self, heads: Sequence[SegmentHead], build: BuildSegment, *, compose: str, window: int,
                 dp_history: Sequence[tuple[int, int]]) -> None:
        heads = tuple(heads)
        if not heads or heads[0].start != 0 or any(a.start >= b.start for a, b in zip(heads, heads[1:])):
            raise PlanError(f"plan segments must start at step 0 and increase: {[h.start for h in heads]!r}")
        self.heads = heads
        self._build = build
        self.starts = tuple(h.start for h in heads)
        self._starts = np.asarray(self.starts, dtype=np.int64)
        first = heads[0]
        self.sources, self.samples_per_step = first.units, first.samples_per_step
        self.compose, self.window, self.dp_history = compose, int(window), tuple(dp_history)
        self.schedule = SegmentedSchedule(self.starts, [h.schedule for h in heads])

    def end(self, i: int) -> int | None:
        """The end step of the ``i``-th segment (None: the last, unbounded)."""
        return self.starts[i + 1] if i + 1 < len(self.starts) else None

    def index(self, step: int) -> int:
        """Which segment holds ``step``."""
        return int(np.searchsorted(self._starts, int(step), side="right")) - 1

    def segment(self, step: int) -> Planner:
        """The planner of the segment holding ``step`` (built now if it is not at hand)."""
        i = self.index(step)
        return self._build(self.heads[i], self.end(i))

    @property
    def planners(self) -> tuple[Planner, ...]:
        """Every segment's planner (each built if not at hand: for inspection, not for planning)."""
        return tuple(self._build(h, self.end(i)) for i, h in enumerate(self.heads))

    def plan(self, step: int, dp_size: int) -> StepPlan:
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or int(step) < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        return self.segment(step).plan(step, dp_size)

    def prepare(self, step: int, dp_size: int) -> None:
        """See :meth:`Planner.prepare`: the window holding ``step``, in its segment."""
        self.segment(step).prepare(step, dp_size)

    def next_window(self, step: int) -> int | None:
        """The first step of the composition window after the one holding ``step`` (the next
        segment's first step when this window ends its segment), or None without composition."""
        if self.compose == "none":
            return None
        return int(window_bounds(self.starts, self.window, int(step))[1])

    def sources_at(self, step: int) -> tuple[SourceUnits, ...]:
        """The units the sources have at ``step`` (a bucket change makes new ones)."""
        return self.heads[self.index(step)].units

    def first_changeable(self, frontier: int) -> int:
        """See :func:`first_changeable`."""
        return first_changeable(self.starts, self.window, frontier)
