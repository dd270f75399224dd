"""The data of each log record kind, as typed, range-checked records.

A record reaches the checkpoint log only after its data has been converted into the Struct of its
kind: every field typed and bounded (steps ≤ MAX_STEP, ranks inside the protocol's limits, names
non-empty and short, pool sizes sane). So a value no job could hold (a trainer at step 2^70, a
rank of -1) is refused when the leader proposes it, never written, never replicated, and never
met by code that reads the state. The state applies the checked Structs (its entries are typed
Structs too, see ``fabricd.cluster.state``); nothing unchecked reaches it.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fabric_client.protocol import Count, DpRank, DpSize, MpRank, Name, NextStep, OptName, SpecText, Step, Text

__all__ = ["MAX_PLAN_OPS", "MAX_PROGRESS_AHEAD", "RECORD_TYPES", "MixturePoint", "PlanChange", "RecordDataError",
           "SetOp", "check_data"]

#: Most ranks a ``job_progress`` record lists ahead of its floor.
MAX_PROGRESS_AHEAD = 32
#: Most set operations, and most added mixture points, one plan change carries.
MAX_PLAN_OPS = 64

NonEmptyIdent = Annotated[str, msgspec.Meta(min_length=1, max_length=4 * 255)]
Extra = Annotated[dict[str, Any], msgspec.Meta(max_length=256)]
Workers = Annotated[int, msgspec.Meta(ge=1, le=4096)]
Piece = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
Origin = Annotated[str, msgspec.Meta(max_length=4096)]


class _Data(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every record's data."""


class JobSubmitted(_Data):
    job: Name
    spec_toml: SpecText
    spec_origin: Origin
    fingerprint: OptName
    dp_size: DpSize
    extra: Extra = {}


class JobCancelled(_Data):
    job: Name
    reason: Text


class SampleSkipped(_Data):
    job: Name
    source: Name
    sample_id: Count
    piece: Piece
    step: Step
    reason: Text


class TrainerProgress(_Data):
    job: Name
    dp_rank: DpRank
    mp_rank: MpRank
    next_step: NextStep


class JobProgress(_Data):
    """Every rank of the job reached ``floor``; ``ahead`` lists ranks well past it."""

    job: Name
    floor: NextStep
    ahead: Annotated[list[tuple[DpRank, MpRank, NextStep]], msgspec.Meta(max_length=MAX_PROGRESS_AHEAD)]


class TrainerHost(_Data):
    job: Name
    dp_rank: DpRank
    mp_rank: MpRank
    host: Name
    declared_ms: Count


class PoolResized(_Data):
    job: Name
    source: Name
    workers: Workers


class RoleAssigned(_Data):
    role_id: NonEmptyIdent
    job: Name
    kind: Name
    node: Name
    extra: Extra


class RoleReleased(_Data):
    role_id: NonEmptyIdent
    reason: Text


class SetOp(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``--set PATH=VALUE`` of a plan change (``mixture.weights.code = 0.3``); what a path may
    name and what its value must be is checked against the job spec (``fabricd.plan_changes``)."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    value: str | bool | int | float


class MixturePoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A mixture point a plan change adds (or replaces) at ``step``: raw weights, normalised as
    the spec's points are."""

    step: Step
    weights: Annotated[dict[Name, float], msgspec.Meta(max_length=4096)]


class PolicyState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where an online-mixing policy stood when it made a change (``fabricd.planner.online``):
    what a new leader continues from. Not read by the planner: content comes from the change."""

    rounds: Count
    rewards: Annotated[list[Annotated[float, msgspec.Meta(ge=0.0, le=1e300)]], msgspec.Meta(max_length=4096)]
    weights: Annotated[list[Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]], msgspec.Meta(max_length=4096)]


class PlanChange(_Data):
    """A change of a running job's plan, in effect from ``at_step`` on, for every rank: the spec's
    keys ``sets`` changes and the mixture points ``points`` adds, applied to the spec in effect
    before (see ``fabricd.plan_changes``). ``origin`` says who asked (``operator:NAME``,
    ``online:odm``); ``term`` is the term of the leader that accepted it (the record's own)."""

    job: Name
    at_step: Step
    sets: Annotated[list[SetOp], msgspec.Meta(max_length=MAX_PLAN_OPS)] = []
    points: Annotated[list[MixturePoint], msgspec.Meta(max_length=MAX_PLAN_OPS)] = []
    origin: Origin = ""
    term: Count = 0
    policy: PolicyState | None = None  # an online-mixing policy's state after the round that made it


class MemberSeen(_Data):
    node: Name
    endpoint: NonEmptyIdent


#: kind → the Struct its data must convert to
RECORD_TYPES: dict[str, type[_Data]] = {
    "job_submitted": JobSubmitted,
    "job_cancelled": JobCancelled,
    "sample_skipped": SampleSkipped,
    "trainer_progress": TrainerProgress,
    "job_progress": JobProgress,
    "trainer_host": TrainerHost,
    "pool_resized": PoolResized,
    "role_assigned": RoleAssigned,
    "role_released": RoleReleased,
    "member_seen": MemberSeen,
    "plan_changed": PlanChange,
}


class RecordDataError(ValueError):
    """A record's data does not fit its kind; the message names the field and the bound."""


def check_data(kind: str, data: Any) -> _Data:
    """``data`` checked against ``kind``'s record: the record's Struct, optional fields filled in."""
    cls = RECORD_TYPES.get(kind)
    if cls is None:
        raise RecordDataError(f"unknown kind {kind!r:.80} (known: {', '.join(RECORD_TYPES)})")
    try:
        rec = msgspec.convert(data, cls)
    except (msgspec.ValidationError, RecursionError, TypeError) as e:
        raise RecordDataError(_describe(str(e), data)) from None
    return rec


def _describe(reason: str, data: Any) -> str:
    """msgspec's "Expected `int` >= 0 - at `$.next_step`" as "next_step = -1: expected `int` >= 0"."""
    reason, _, where = reason.partition(" - at `$.")
    key = where.rstrip("`")
    if key and isinstance(data, dict) and key in data:
        return f"{key} = {data[key]!r:.100}: {reason[:1].lower()}{reason[1:200]}"
    if key:
        return f"{key}: {reason[:1].lower()}{reason[1:200]}"
    return reason[:300]
