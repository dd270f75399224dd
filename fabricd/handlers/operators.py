"""Requests from operators (``fabricctl``): submit and cancel jobs, read the status."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fabric_client import protocol

from ..admission import check_submission, is_retry
from ..cluster.progress import delivered_frontier
from ..config import describe_defaults, parse_job_spec
from ..errors import ConfigError
from ..job import dp_history_of
from ..planner.compose import extend_dp_history
from ..status import build_status
from . import Reply, handles

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)


@handles(protocol.SubmitJob, callers=("operator",))
def submit(daemon: Daemon, _identity: bytes, msg: protocol.SubmitJob, _payload: list) -> Reply:
    """Request: ``SubmitJob(spec_toml, spec_path)``. Reply: ``JobAccepted(job, fingerprint,
    state)`` once the job is recorded (state ``indexing``: follow it with ``StatusRequest``), or at
    once for a job already running with this very spec; ``ErrorReply(invalid_spec)`` for a spec
    that does not parse, passes a bound, names a path outside the node's ``data_roots``, a missing
    path or a file of another format, or needs more roles per daemon than allowed;
    ``ErrorReply(not_leader)`` naming the leader.

    A different spec under a running job's name replaces it; the same spec of a failed job runs
    it again."""
    try:
        spec = parse_job_spec(msg.spec_toml, msg.spec_path)
    except ConfigError as e:
        return protocol.ErrorReply(code=protocol.ErrorCode.INVALID_SPEC, reason=str(e))
    now = time.monotonic()
    if not daemon.cluster.is_leader(now):
        return daemon.not_leader()
    try:
        cores = {node: view.cpus for node, view in daemon.cluster.members.members.items()}
        check_submission(spec, daemon.cfg, cores)  # roles per daemon (or core), source paths and formats
    except ConfigError as e:
        return protocol.ErrorReply(code=protocol.ErrorCode.INVALID_SPEC, reason=str(e))
    current = daemon.cluster.state.jobs.get(spec.name)
    entries: list[tuple[str, dict]] = []
    if current is not None and not current.cancelled:
        job = daemon.jobs.get(spec.name)
        same = current.spec_toml == msg.spec_toml and current.spec_origin == spec.file
        if same and not is_retry(job.state if job else None):
            return protocol.JobAccepted(job=spec.name, fingerprint=job.fingerprint if job else "",
                                        state=job.state if job else "indexing")
        log.warning("job %s resubmitted %s; replacing it", spec.name,
                    "after it failed" if same else "with a different spec")
        entries += daemon.release_roles(spec.name)
        entries.append(("job_cancelled", {"job": spec.name, "reason": "resubmitted"}))
    extra: dict = {}
    history = _dp_history(daemon, spec, current)
    if history:
        extra["dp_history"] = [list(x) for x in history]
    if _same_content(spec, current) is not None and daemon.cluster.state.plan_changes.get(spec.name):
        extra["keep_plan_changes"] = True  # the plan changes logged for this content still hold
    entries.append(("job_submitted", {"job": spec.name, "spec_toml": msg.spec_toml, "spec_origin": spec.file,
                                      "fingerprint": "", "dp_size": spec.topology.dp_size, "extra": extra}))
    if not daemon.propose(entries, now):
        return protocol.ErrorReply(code=protocol.ErrorCode.INTERNAL, reason="could not record the job; see the daemon log")
    if spec.defaults_applied:
        log.info("%s", describe_defaults(spec))
    return protocol.JobAccepted(job=spec.name, fingerprint="", state="indexing")


def _same_content(spec, current):
    """The active job ``current``'s spec when ``spec`` decides batch content as it does (a
    resubmission at another dp_size, or a retry: the job's DP history and plan changes carry
    over), else None."""
    if current is None or current.cancelled:
        return None
    try:
        old = parse_job_spec(current.spec_toml, current.spec_origin)
    except ConfigError:
        return None
    return old if old.content_key() == spec.content_key() else None


def _dp_history(daemon: Daemon, spec, current) -> tuple[tuple[int, int], ...]:
    """The composition DP-size history to record with a (re)submitted job: empty for a new job or
    new content; for the same content at another dp_size under ``compose = "outliers"``, the old
    history plus the change, at a window boundary past every step the trainers can have reached
    (their recorded progress plus prefetch; see ``extend_dp_history``)."""
    old = _same_content(spec, current)
    if spec.batch.compose == "none" or old is None:
        return ()
    history = dp_history_of(current.extra) or ((0, current.dp_size),)
    if history[-1][1] == spec.topology.dp_size:
        return history if len(history) > 1 else ()
    frontier = delivered_frontier(daemon.cluster.state, spec.name, daemon.leadership.trainer_positions(spec.name),
                                  max(old.batch.prefetch, spec.batch.prefetch))
    new = extend_dp_history(history, new_dp=spec.topology.dp_size, frontier=frontier,
                            window=spec.batch.max_delay_steps + 1)
    log.warning("job %s: dp_size %d -> %d; composition changes at step %d (recorded: %s)", spec.name,
                history[-1][1], spec.topology.dp_size, new[-1][0], new)
    return new


@handles(protocol.CancelJob, callers=("operator",))
def cancel(daemon: Daemon, _identity: bytes, msg: protocol.CancelJob, _payload: list) -> Reply:
    """Request: ``CancelJob(job)``. Reply: ``Ok`` once the cancellation is recorded (its roles are
    released with it); ``ErrorReply(unknown_job | not_leader)``."""
    now = time.monotonic()
    if not daemon.cluster.is_leader(now):
        return daemon.not_leader()
    current = daemon.cluster.state.jobs.get(msg.job)
    if current is None or current.cancelled:
        return protocol.ErrorReply(code=protocol.ErrorCode.UNKNOWN_JOB, reason=f"no job named {msg.job!r}")
    if not daemon.propose(daemon.release_roles(msg.job) + [("job_cancelled", {"job": msg.job, "reason": "cancelled"})],
                          now):
        return protocol.ErrorReply(code=protocol.ErrorCode.INTERNAL, reason="could not record the cancellation")
    return protocol.Ok()


@handles(protocol.StatusRequest, callers=("operator",))
def status(daemon: Daemon, _identity: bytes, _msg: protocol.StatusRequest, _payload: list) -> Reply:
    """Request: ``StatusRequest()``. Reply: ``StatusReply(status)``: this node, the cluster as it
    sees it (lease, log, replicas, members), its telemetry and counters (drops per reason), and
    per job its state, roles, progress, trainer hosts and pools (see :mod:`fabricd.status`)."""
    return protocol.StatusReply(status=build_status(daemon, time.monotonic()))
