"""Requests from this daemon's role processes: announce, report, ask for plans and pools,
report skipped units and trainers' losses."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zmq
from fabric_client import protocol

from ..metrics import SEND_QUEUE_FULL
from ..metrics_reading import feed_role_stats
from . import Reply, handles

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)


@handles(protocol.RoleHello, callers=("role",))
def role_hello(daemon: Daemon, _identity: bytes, msg: protocol.RoleHello, _payload: list) -> Reply:
    """Request: ``RoleHello(role_id, kind, endpoint, pid)``. No reply. Recorded only from the
    process this daemon started for ``role_id`` (its pid); anything else is ignored."""
    role = daemon.supervisor.roles.get(msg.role_id)
    if role is None or role.pid != msg.pid:
        log.debug("hello from unknown or stale role %s (pid %d)", msg.role_id, msg.pid)
        return None
    role.endpoint = msg.endpoint
    role.last_seen = time.monotonic()
    return None


@handles(protocol.RoleStats, callers=("role",))
def role_stats(daemon: Daemon, _identity: bytes, msg: protocol.RoleStats, _payload: list) -> Reply:
    """Request: ``RoleStats(role_id, stats: RoleCounters)``. No reply. The counters of a role this
    daemon runs (typed and bounded at decode) feed its heartbeats and status."""
    role = daemon.supervisor.roles.get(msg.role_id)
    if role is not None:
        role.stats = msg.stats
        role.last_seen = time.monotonic()
        feed_role_stats(daemon.metrics, role)  # running totals → the daemon's counters
    return None


@handles(protocol.PlanRequest, callers=("role",))
def plan(daemon: Daemon, _identity: bytes, msg: protocol.PlanRequest, _payload: list) -> Reply:
    """Request: ``PlanRequest(job, step, ranks)``. Reply: ``PlanReply(job, step, dp_size, rows,
    columns, dtypes, num_micro, skips)`` + one frame per column, for a step already planned;
    ``ErrorReply(not_ready)`` ("step N is being planned") while the job's plan worker computes it,
    never computing here, and ("step N: ... not in touch with the leader") while this daemon's copy
    of the state may be stale (a partition, or catching up after one: a skip record or role move
    it lacks would make its plan contradict the log); ``ErrorReply(unknown_job | bad_request |
    internal)``."""
    job = daemon.job_or_error(msg.job)
    if isinstance(job, protocol.ErrorReply):
        return job
    refused = daemon.out_of_touch(f"step {msg.step}")
    return refused if refused is not None else job.plan(msg)


@handles(protocol.PoolsRequest, callers=("role",))
def pools(daemon: Daemon, _identity: bytes, msg: protocol.PoolsRequest, _payload: list) -> Reply:
    """Request: ``PoolsRequest(job)``. Reply: ``PoolsReply(job, pools)``: source name → endpoints
    of its live source-loader workers, anywhere in the cluster; ``ErrorReply(unknown_job)``."""
    job = daemon.job_or_error(msg.job)
    return job if isinstance(job, protocol.ErrorReply) else protocol.PoolsReply(job=msg.job, pools=job.pools())


@handles(protocol.SkipReport, callers=("role", "peer"))
def skip(daemon: Daemon, _identity: bytes, msg: protocol.SkipReport, _payload: list) -> Reply:
    """Request: ``SkipReport(job, step, source, sample_id, piece, reason, dp_rank)``. No reply: the
    constructor re-sends until it sees the skip among the step's committed records (``PlanReply``).
    The leader checks and records it; another daemon forwards it to the leader."""
    if (msg.source, msg.sample_id, msg.piece, msg.step) in daemon.cluster.state.skipped.get(msg.job, ()):
        return None  # already recorded: a constructor re-sends until it sees the record committed
    job = daemon.jobs.get(msg.job)
    if job is not None:
        job.on_skip(msg)
    record = {"job": msg.job, "source": msg.source, "sample_id": msg.sample_id, "piece": msg.piece,
              "step": msg.step, "reason": msg.reason, "dp_rank": msg.dp_rank}
    if daemon.cluster.is_leader(time.monotonic()):
        daemon.leadership.add_skip(record)  # checked, bounded; kept until recorded
    else:  # a report lost on the way (or with a dying leader) is re-sent by the constructor
        _to_leader(daemon, msg)
    return None


@handles(protocol.LossReport, callers=("role", "peer"))
def loss_report(daemon: Daemon, _identity: bytes, msg: protocol.LossReport, _payload: list) -> Reply:
    """Request: ``LossReport(job, step, losses, dp_rank, reports)``: trainers' losses per source,
    merged by a constructor. No reply. The leader feeds the job's online-mixing policy with it
    (checked there: a job with ``[mixture] online``, source indexes of the job); another daemon
    passes it on to the leader. Advisory: one lost on the way is not re-sent."""
    if daemon.cluster.is_leader(time.monotonic()):
        daemon.leadership.add_losses(msg)
    else:
        _to_leader(daemon, msg)
    return None


def _to_leader(daemon: Daemon, msg: protocol.Message) -> None:
    """Pass a report on to the leader, without blocking (a full queue drops it, counted)."""
    if (leader := daemon.cluster.leader) in daemon.peers:
        try:
            daemon.peers[leader].send_multipart(protocol.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            daemon.metrics.dropped.add("peer", SEND_QUEUE_FULL)
