"""The planner: pure functions from metadata to per-step, per-rank plans (no sockets, no I/O)."""

from fabricd.planner.balance import BALANCERS, balance, karmarkar_karp, lpt, pack_micro_batches
from fabricd.planner.cost import CostModel
from fabricd.planner.mixture import SCHEDULE_KINDS, MixtureSchedule
from fabricd.planner.plan import Planner, StepPlan
from fabricd.planner.sequence import (
    LONG_SAMPLE_POLICIES,
    GlobalSequence,
    SourceUnits,
    build_units,
    feistel_permute,
)

__all__ = [
    "BALANCERS",
    "CostModel",
    "GlobalSequence",
    "LONG_SAMPLE_POLICIES",
    "MixtureSchedule",
    "Planner",
    "SCHEDULE_KINDS",
    "SourceUnits",
    "StepPlan",
    "balance",
    "build_units",
    "feistel_permute",
    "karmarkar_karp",
    "lpt",
    "pack_micro_batches",
]
