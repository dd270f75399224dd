"""The planner: pure functions from metadata to per-step, per-rank plans (no sockets, no I/O)."""

from fabricd.planner.balance import BALANCERS, balance, karmarkar_karp, lpt, pack_micro_batches
from fabricd.planner.cost import CostModel
from fabricd.planner.mixture import SCHEDULE_KINDS, MixtureSchedule
from fabricd.planner.plan import Planner, StepPlan
from fabricd.planner.sequence import GlobalSequence, feistel_permute
from fabricd.planner.units import LONG_SAMPLE_POLICIES, SourceUnits, build_units, piece_counts, piece_lengths

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
    "piece_counts",
    "piece_lengths",
]
