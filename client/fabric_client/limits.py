"""Upper bounds shared by the wire protocol, the job spec and the planner.

Each bound is far above what a real training cluster uses and far below what would let one
message or one job spec make a daemon do unbounded work (a fork bomb of roles, a plan of a
trillion samples, a seek to step 2^62). A value past a bound is refused where it enters: at
decode for messages, at validation for job specs, and the refusal names the bound.
"""

from __future__ import annotations

__all__ = [
    "MAX_STEP",
    "MAX_DP_SIZE",
    "MAX_MP_SIZE",
    "MAX_NAME_CHARS",
    "MAX_LIST_ITEMS",
]

#: Largest training step anything may name (2^40 ≈ 1.1e12; the longest runs take ~1e7 steps).
MAX_STEP = 1 << 40
#: Largest data-parallel world size of a job.
MAX_DP_SIZE = 1 << 16
#: Largest model-parallel group (ranks that receive the same batch).
MAX_MP_SIZE = 1 << 10
#: Longest job, source, role, node or host name.
MAX_NAME_CHARS = 255
#: Longest list in one control message (ranks of a plan request, endpoints of a pool, ...).
MAX_LIST_ITEMS = 1 << 17
