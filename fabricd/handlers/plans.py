"""Requests about a job's plan from operators (``fabricctl plan update`` / ``plan show``)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgspec

from fabric_client import protocol

from ..errors import ConfigError
from ..job import dp_history_of
from ..plan_changes import describe_change, make_change
from ..plan_control import PlanChangeRefused
from . import Reply, handles

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)

#: PlanChangeRefused.code → the ErrorReply code an operator gets
_CODES = {"not_leader": protocol.ErrorCode.NOT_LEADER, "unknown_job": protocol.ErrorCode.UNKNOWN_JOB,
          "not_ready": protocol.ErrorCode.NOT_READY, "too_late": protocol.ErrorCode.BAD_REQUEST,
          "invalid": protocol.ErrorCode.INVALID_SPEC}


@handles(protocol.PlanUpdate, callers=("operator",))
def plan_update(daemon: Daemon, _identity: bytes, msg: protocol.PlanUpdate, _payload: list) -> Reply:
    """Request: ``PlanUpdate(job, at_step, sets, points)``. Reply: ``PlanUpdated(job, at_step,
    seq, term, frontier, change)`` once the ``plan_changed`` record is appended (it takes effect
    when committed); ``ErrorReply``: ``invalid_spec`` (a --set or --add-point that does not
    parse or apply, naming the key and value), ``bad_request`` (``at_step`` is planned or
    delivered already; the reason names the first step still changeable), ``unknown_job``,
    ``not_ready``, ``not_leader`` naming the leader. Through
    :meth:`fabricd.leadership.Leadership.propose_plan_change`, origin ``operator:NAME``."""
    now = time.monotonic()
    if not daemon.cluster.is_leader(now):
        return daemon.not_leader()
    try:
        change = make_change(msg.job, msg.at_step, msg.sets, msg.points)
    except ConfigError as e:
        return protocol.ErrorReply(code=protocol.ErrorCode.INVALID_SPEC, reason=str(e))
    result = daemon.leadership.propose_plan_change(msg.job, change, origin=daemon.current_caller or "operator",
                                                   now=now)
    if isinstance(result, PlanChangeRefused):
        if result.code == "not_leader":
            return daemon.not_leader()
        return protocol.ErrorReply(code=_CODES[result.code], reason=result.reason)
    entry = daemon.cluster.state.plan_changes[msg.job][-1]
    return protocol.PlanUpdated(job=msg.job, at_step=result.at_step, seq=entry.seq, term=result.term,
                                frontier=daemon.leadership.changeable_from(msg.job, now),
                                change=describe_change(result)[:8000])


@handles(protocol.PlanShowRequest, callers=("operator",))
def plan_show(daemon: Daemon, _identity: bytes, msg: protocol.PlanShowRequest, _payload: list) -> Reply:
    """Request: ``PlanShowRequest(job)``. Reply: ``PlanShowReply(job, spec_toml, spec_origin,
    dp_history, changes, frontier)``: the job as this daemon's replica holds it (changes committed
    or not, in log order) and the first step still changeable as it knows it (the leader knows
    the trainers' latest positions); ``ErrorReply(unknown_job)``. Any daemon answers."""
    state = daemon.cluster.state
    entry = state.jobs.get(msg.job)
    if entry is None or entry.cancelled:
        return protocol.ErrorReply(code=protocol.ErrorCode.UNKNOWN_JOB, reason=f"no active job named {msg.job!r}")
    changes = [e.change for e in state.plan_changes.get(msg.job, ())]
    frontier = 0
    if msg.job in daemon.jobs:
        try:
            frontier = daemon.leadership.changeable_from(msg.job)
        except ConfigError:
            frontier = 0
    return protocol.PlanShowReply(job=msg.job, spec_toml=entry.spec_toml, spec_origin=entry.spec_origin,
                                  dp_history=[list(x) for x in dp_history_of(entry.extra)],
                                  changes=[msgspec.to_builtins(c) for c in changes], frontier=frontier)
