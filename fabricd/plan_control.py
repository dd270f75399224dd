"""The leader's side of plan changes: when a change may take effect, and whether it may at all.

A change (``fabricd.cluster.records.PlanChange``) is accepted only if

1. the job is active and ready here (its indexes are loaded: a change is checked against the
   real units, not only the spec);
2. its step is still changeable: at or past the *frontier*, the first step no trainer can have
   received and no constructor built (``cluster.progress.delivered_frontier``: the furthest
   recorded or reported trainer position + prefetch + 1, plus ``margin``: the steps moving
   trainers can advance before the change is committed and applied on every daemon, which the
   leader estimates from their recent rate), rounded up to the next composition window boundary
   (``planner.segments.first_changeable``): a step already planned or delivered never changes;
3. the spec in effect after it, with every change already logged, passes the validation a
   submitted spec passes, and the planner builds from it and plans its first step (the planner
   of every segment it makes anew is built: for a change after the others, its own one only).

Pure checks (no sockets, no log): :meth:`fabricd.leadership.Leadership.propose_plan_change`
calls :func:`check_plan_change` and then records the change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .cluster.progress import delivered_frontier
from .cluster.records import PlanChange
from .cluster.state import FabricState
from .errors import ConfigError, FabricdError
from .job import JobRuntime, SegmentPlans
from .plan_changes import describe_change, plan_segments
from .planner.segments import first_changeable

__all__ = ["REFUSALS", "PlanChangeRefused", "changeable_from", "check_plan_change"]

log = logging.getLogger(__name__)

#: ``PlanChangeRefused.code`` values.
REFUSALS = ("not_leader", "unknown_job", "not_ready", "too_late", "invalid")


@dataclass(frozen=True)
class PlanChangeRefused:
    """Why a plan change was not recorded. ``code``: one of :data:`REFUSALS`; ``frontier``: the
    first step still changeable, when it is known (always for ``too_late``)."""

    code: str
    reason: str
    frontier: int | None = None


def changeable_from(state: FabricState, runtime: JobRuntime, live: Mapping[tuple[int, int], int],
                    logged: Sequence[PlanChange], margin: int = 0) -> int:
    """The first step of ``runtime``'s job a change may take effect at (see the module doc), with
    the segments of the changes ``logged`` so far (committed or not)."""
    spec = runtime.spec
    frontier = delivered_frontier(state, spec.name, live, spec.batch.prefetch) + max(0, int(margin))
    starts = [seg.start for seg in plan_segments(spec, logged)]
    window = spec.batch.max_delay_steps + 1 if spec.batch.compose != "none" else 1
    return first_changeable(starts, window, frontier)


def check_plan_change(state: FabricState, runtime: JobRuntime | None, change: PlanChange,
                      live: Mapping[tuple[int, int], int], margin: int = 0
                      ) -> tuple[int | None, PlanChangeRefused | None]:
    """``(first changeable step, None)`` for a change the leader may record now, else
    ``(frontier or None, the refusal)``."""
    job = change.job
    if runtime is None or not state.is_active(job):
        return None, PlanChangeRefused("unknown_job", f"no active job named {job!r}")
    if runtime.state != "ready" or runtime.planner is None:
        return None, PlanChangeRefused("not_ready", f"job {job} is {runtime.state}; a plan change needs its indexes")
    logged = [e.change for e in state.plan_changes.get(job, ())]
    try:
        first = changeable_from(state, runtime, live, logged, margin)
    except FabricdError as e:  # a logged change no longer applies: refuse rather than guess
        return None, PlanChangeRefused("invalid", f"job {job}: its logged plan changes do not apply: {e}")
    if change.at_step < first:
        return first, PlanChangeRefused(
            "too_late", f"job {job}: step {change.at_step} is already planned or delivered; the first step still "
                        f"changeable is {first} (the frontier)", first)
    try:
        plans = runtime.plans if runtime.plans is not None else SegmentPlans(runtime.spec, runtime.indexes,
                                                                              runtime.dp_history)
        # the runtime's segment planners and heads: a change appended after the others costs its
        # own segment's head and planner (kept for the replan once it is committed), not a rebuild
        planner = plans.planner([*logged, change], check=True)
        planner.plan(change.at_step, runtime.spec.topology.dp_size)
    except ConfigError as e:
        return first, PlanChangeRefused("invalid", str(e), first)
    except (FabricdError, ValueError) as e:
        return first, PlanChangeRefused("invalid", f"plan change {describe_change(change)}: {e}", first)
    return first, None
