"""What a job's plan will look like over a range of steps, from metadata only (``fabricctl plan show``).

For each step: its units and tokens, each source's share of the units, and the balance over DP
ranks: the largest rank's cost over the mean (what the step's slowest rank costs) and the bound
no balancer can beat (the largest unit's cost, or the mean share if larger, over the mean). It
runs the job's own planner (``fabricd.job.build_planner``) with the log's plan changes, plus a
change being previewed, so what it predicts is what the fabric will plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .planner.plan import StepPlan
from .planner.quality import step_balance

__all__ = ["StepSummary", "summarize", "format_summaries"]


@dataclass(frozen=True)
class StepSummary:
    step: int
    units: int
    tokens: int
    mix: dict[str, float]      # source → share of the step's units
    balance: float             # max rank cost / mean rank cost
    bound: float               # max(largest unit cost, mean rank cost) / mean rank cost

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(plan: StepPlan, names: Sequence[str]) -> StepSummary:
    """The summary of one planned step (``names``: the planner's source names, in its order)."""
    counts = np.bincount(plan.source, minlength=len(names))
    total = max(1, len(plan))
    balance = step_balance(plan)
    return StepSummary(step=plan.step, units=len(plan), tokens=int(plan.tokens.sum()),
                       mix={n: round(int(c) / total, 4) for n, c in zip(names, counts.tolist())},
                       balance=round(balance.max_over_mean, 4), bound=round(balance.bound, 4))


def format_summaries(rows: Sequence[StepSummary]) -> list[str]:
    """A table, one line per step, then the range's totals (mix over all its units)."""
    if not rows:
        return ["(no steps)"]
    names = list(rows[0].mix)
    out = [f"{'step':>8} {'units':>7} {'tokens':>10} {'max/mean':>9} {'bound':>7}  mix (share of units)"]
    for r in rows:
        mix = " ".join(f"{n} {r.mix[n]:.2f}" for n in names)
        out.append(f"{r.step:>8} {r.units:>7} {r.tokens:>10} {r.balance:>9.3f} {r.bound:>7.3f}  {mix}")
    units = sum(r.units for r in rows)
    mix = " ".join(f"{n} {sum(r.mix[n] * r.units for r in rows) / max(1, units):.3f}" for n in names)
    out.append(f"{'total':>8} {units:>7} {sum(r.tokens for r in rows):>10} "
               f"{float(np.mean([r.balance for r in rows])):>9.3f} {float(np.mean([r.bound for r in rows])):>7.3f}  "
               f"{mix}  (balance and bound: means)")
    return out
