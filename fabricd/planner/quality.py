"""How well a step's plan is balanced, in the two numbers operators and benchmarks compare.

A step's DP ranks wait for the slowest one, so what a plan costs the trainers is the slowest
rank's cost over the mean rank's (``max_over_mean``; 1.0 is perfect). No balancer can do better
than ``bound`` = max(largest single unit, mean share) / mean share: a unit cannot be split.
The planner's balance is good when ``max_over_mean`` is close to ``bound``, not to 1.0.
"""

from __future__ import annotations

import msgspec

from fabricd.planner.plan import StepPlan

__all__ = ["StepBalance", "step_balance"]


class StepBalance(msgspec.Struct, frozen=True):
    """One step's balance over its DP ranks (see the module docstring)."""

    step: int
    max_over_mean: float
    bound: float


def step_balance(plan: StepPlan) -> StepBalance:
    """The balance of ``plan`` (a step without cost, e.g. no units, is perfectly balanced: 1.0)."""
    costs = plan.rank_costs()
    mean = float(costs.mean()) if costs.size else 0.0
    if mean <= 0.0:
        return StepBalance(step=plan.step, max_over_mean=1.0, bound=1.0)
    largest = float(plan.cost.max()) if plan.cost.size else 0.0
    return StepBalance(step=plan.step, max_over_mean=float(costs.max()) / mean, bound=max(mean, largest) / mean)
