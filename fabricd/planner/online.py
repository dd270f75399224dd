"""Online data mixing: turn the trainers' per-source losses into mixture weights.

The policy is ODM (Albalak et al., "Efficient Online Data Mixing For Language Model
Pre-Training", arXiv 2312.02406): every source is an arm of an EXP3 multi-armed bandit whose
reward is the training loss on that source (a high loss means the model still has something to
learn there). In round ``t``:

- the reward estimate of every source that was observed is smoothed with its importance-weighted
  loss, ``R_i ← α·R_i + (1 − α)·L_i / π_i`` (``π_i`` the weight the loss was drawn under);
- the exploration rate is ``ε_t = min(1/K, sqrt(ln K / (K·t)))`` for ``K`` sources;
- the new weights are ``π_i = (1 − K·ε_t)·softmax(ε_{t−1}·R)_i + K·ε_t·prior_i``.

The paper explores uniformly (``prior_i = 1/K``); here the exploration mass follows the job
spec's own weights at the step of the change (uniform when those are equal), so a mixture the
user chose is where the bandit starts and what it falls back to while uncertain. In the first
rounds ``K·ε_t = 1``: the weights are the prior, and move only as ε falls (after about
``ln K / (K·(1/K)²) = K·ln K`` rounds).

Everything here is a pure function of its arguments, in the planner's style: the leader feeds it
the reports it received and turns its output into a plan change at a future step (a log record).
Delivery is replayed from the log, never by re-running the policy, so which reports arrived in
which round (a matter of timing) changes nothing a replay computes. The policy's state travels in
the change record, so a new leader continues where the old one stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ONLINE_POLICIES",
    "LossObservation",
    "OdmState",
    "exploration_rate",
    "mean_losses",
    "odm_round",
]

#: ``[mixture] online``: "none" (the spec's schedule only) or a policy's name.
ONLINE_POLICIES = ("none", "odm")


@dataclass(frozen=True)
class LossObservation:
    """Losses a trainer reported: per source index, the sum of per-sample (or per-token) losses
    and how many samples (tokens) they cover."""

    step: int
    sums: tuple[tuple[int, float, int], ...]  # (source index, loss sum, count)


@dataclass(frozen=True)
class OdmState:
    """Where the bandit stands after ``rounds`` rounds: one reward estimate and one weight per source."""

    rounds: int
    rewards: tuple[float, ...]
    weights: tuple[float, ...]  # the weights its last round set (what the next losses are drawn under)

    @classmethod
    def start(cls, prior: Sequence[float]) -> OdmState:
        """Round 0: no reward yet, the prior's weights (normalized)."""
        return cls(rounds=0, rewards=(0.0,) * len(prior), weights=_normalized(prior))

    def to_record(self) -> dict:
        """As the ``policy`` of a plan-change record (``cluster.records.PolicyState``)."""
        return {"rounds": self.rounds, "rewards": list(self.rewards), "weights": list(self.weights)}

    @classmethod
    def from_record(cls, record: Mapping | Any, sources: int) -> OdmState:
        """The state a plan-change record carried (its ``policy``, a mapping or a Struct with the
        same fields); ``ValueError`` if it does not fit ``sources`` sources."""
        if not isinstance(record, Mapping):
            record = {f: getattr(record, f, None) for f in ("rounds", "rewards", "weights")}
        rounds, rewards, weights = record.get("rounds"), record.get("rewards"), record.get("weights")
        if not (isinstance(rounds, int) and rounds >= 0 and isinstance(rewards, list) and isinstance(weights, list)
                and len(rewards) == len(weights) == sources
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*rewards, *weights))
                and all(w >= 0 for w in weights) and sum(weights) > 0):
            raise ValueError(f"not an ODM state of {sources} sources: {dict(record)!r}")
        return cls(rounds=rounds, rewards=tuple(float(v) for v in rewards), weights=_normalized(weights))


def exploration_rate(rounds: int, sources: int) -> float:
    """``ε_t = min(1/K, sqrt(ln K / (K·t)))``; ``ε_0 = 1/K`` (pure exploration before any round)."""
    if sources <= 1:
        return 1.0
    if rounds <= 0:
        return 1.0 / sources
    return min(1.0 / sources, math.sqrt(math.log(sources) / (sources * rounds)))


def mean_losses(observations: Sequence[LossObservation], sources: int) -> list[float | None]:
    """Per source, the mean loss over ``observations`` (None where a source was not observed).
    Entries with a source index outside the job, a count below 1 or a non-finite sum are ignored
    (the daemon counts them when it receives them)."""
    total = [0.0] * sources
    count = [0] * sources
    for obs in observations:
        for source, loss_sum, n in obs.sums:
            if 0 <= source < sources and n >= 1 and math.isfinite(loss_sum):
                total[source] += loss_sum
                count[source] += n
    return [total[i] / count[i] if count[i] else None for i in range(sources)]


def odm_round(state: OdmState, losses: Sequence[float | None], prior: Sequence[float], *,
              alpha: float, drawn_under: Sequence[float] | None = None) -> OdmState:
    """One ODM round: update the rewards of the observed sources with ``losses``, importance
    weighted by the weights they were drawn under (``drawn_under``; default ``state.weights``,
    the weights the last round set), then set new weights. ``prior`` is the spec's mixture at
    the step the new weights take effect; a source whose prior weight is 0 keeps weight 0 (the
    user turned it off there) and is not an arm."""
    k_all = len(state.rewards)
    drawn = state.weights if drawn_under is None else tuple(drawn_under)
    if not (len(losses) == len(prior) == len(state.weights) == len(drawn) == k_all):
        raise ValueError(f"{len(losses)} losses, {len(prior)} prior and {len(drawn)} drawn-under weights "
                         f"for {k_all} sources")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha = {alpha!r}: must be in [0, 1)")
    rewards = list(state.rewards)
    for i, loss in enumerate(losses):
        if loss is not None and math.isfinite(loss) and drawn[i] > 0:
            rewards[i] = alpha * rewards[i] + (1.0 - alpha) * loss / drawn[i]
    arms = [i for i, p in enumerate(prior) if p > 0]
    if not arms:
        raise ValueError("the prior weights are all 0")
    rounds = state.rounds + 1
    k = len(arms)
    eps_now = exploration_rate(rounds, k)
    eps_before = exploration_rate(rounds - 1, k)
    prior_arms = _normalized([prior[i] for i in arms])
    top = max(eps_before * rewards[i] for i in arms)  # softmax, shifted for range
    expo = [math.exp(eps_before * rewards[i] - top) for i in arms]
    z = math.fsum(expo)
    explore = min(1.0, k * eps_now)
    weights = [0.0] * k_all
    for j, i in enumerate(arms):
        weights[i] = (1.0 - explore) * expo[j] / z + explore * prior_arms[j]
    return OdmState(rounds=rounds, rewards=tuple(rewards), weights=_normalized(weights))


def _normalized(weights: Sequence[float]) -> tuple[float, ...]:
    total = math.fsum(weights)
    if not total > 0 or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights {list(weights)!r}: need finite, non-negative, not all 0")
    return tuple(float(w) / total for w in weights)
