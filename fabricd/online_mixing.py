"""The leader's side of online mixing: collect the trainers' loss reports of a job, and when its
slowest trainer has passed another ``[mixture] online_every_steps`` steps, run one round of the
job's policy (``planner.online``) and turn the new weights into a plan change at a future step.

The reports are advisory and their arrival is a matter of timing; what the policy decides is a
plan-change record in the checkpoint log, with the policy's state beside it, so delivery is
replayed from the log and a new leader continues the policy where the old one stopped.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from fabric_client import protocol

from .cluster.records import MixturePoint, PlanChange, PolicyState
from .config import JobSpec
from .planner.mixture import MixtureSchedule
from .planner.online import LossObservation, OdmState, mean_losses, odm_round

__all__ = ["MAX_OBSERVATIONS", "ONLINE_ORIGIN", "OnlineMixer", "WeightChange"]

log = logging.getLogger(__name__)

#: Loss reports kept per job between two rounds (constructors merge their trainers' reports, so
#: this is about MAX_OBSERVATIONS × LOSS_FLUSH_S seconds of reports from one constructor); the
#: oldest go first.
MAX_OBSERVATIONS = 4096
#: ``origin`` of the plan changes the ODM policy makes.
ONLINE_ORIGIN = "online:odm"
#: Decimal places of a weight the policy sets: plain numbers in the log and in ``plan show``.
WEIGHT_DECIMALS = 6


@dataclass(frozen=True)
class WeightChange:
    """One round's outcome: set these weights (source name → weight) from ``at_step`` on."""

    at_step: int
    weights: tuple[tuple[str, float], ...]
    state: OdmState


@dataclass
class OnlineMixer:
    """One job's policy on the leader: its reports since the last round and its state."""

    spec: JobSpec
    state: OdmState | None = None
    next_round: int = 0  # the round runs once the job's progress floor reaches this step
    observations: deque = field(default_factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    counters: dict = field(default_factory=lambda: {"reports": 0, "reports_invalid": 0})  # rounds: state.rounds

    def __post_init__(self) -> None:
        if self.next_round == 0:
            self.next_round = self.spec.online.every_steps

    def add(self, msg: protocol.LossReport) -> bool:
        """Keep one (merged) report; False, counted, if it names a source the job does not have."""
        n = len(self.spec.sources)
        if any(source >= n for source, _, _ in msg.losses):
            self.counters["reports_invalid"] += 1
            return False
        self.observations.append(LossObservation(step=msg.step, sums=tuple(map(tuple, msg.losses))))
        self.counters["reports"] += msg.reports
        return True

    def resume(self, state: OdmState, at_step: int) -> None:
        """Continue from the state a logged change carried (a new leader, or this one after a
        restart): the next round comes ``every_steps`` after that change's step."""
        self.state = state
        self.next_round = max(self.next_round, at_step + self.spec.online.every_steps)

    def due(self, floor: int) -> bool:
        """Whether a round is due now that every trainer reached ``floor`` (and there is something to learn from)."""
        return floor >= self.next_round and bool(self.observations)

    def round(self, at_step: int, drawn_under: Sequence[float]) -> WeightChange:
        """Run one round: ``drawn_under`` are the job's effective weights where the reported
        losses come from (the plan at the progress floor), the prior is the spec's own schedule
        at ``at_step``. Pure in its inputs; the caller logs the change, then calls :meth:`applied`."""
        names = [s.name for s in self.spec.sources]
        schedule = MixtureSchedule(self.spec.mixture.kind, self.spec.mixture.as_points(), names)
        prior = [float(w) for w in schedule.weights(at_step)]
        state = self.state if self.state is not None else OdmState.start(drawn_under)
        losses = mean_losses(list(self.observations), len(names))
        new = odm_round(state, losses, prior, alpha=self.spec.online.alpha, drawn_under=drawn_under)
        rounded = [round(w, WEIGHT_DECIMALS) for w in new.weights]
        if not math.fsum(rounded) > 0:  # every weight below 1e-6: keep the unrounded ones
            rounded = list(new.weights)
        return WeightChange(at_step=at_step, weights=tuple(zip(names, rounded)), state=new)

    def change_record(self, change: WeightChange) -> PlanChange:
        """The plan change that sets ``change``'s weights: a mixture point at its step (the
        spec's later points, its curriculum, still take effect at theirs), with the policy's
        state beside it for a new leader."""
        return PlanChange(job=self.spec.name, at_step=change.at_step,
                          points=[MixturePoint(step=change.at_step, weights=dict(change.weights))],
                          origin=ONLINE_ORIGIN, policy=PolicyState(**change.state.to_record()))

    def applied(self, change: WeightChange, floor: int) -> None:
        """The change is in the log: the state moves on and the next round waits ``every_steps``."""
        self.state = change.state
        self.observations.clear()
        self.next_round = floor + self.spec.online.every_steps
