"""Local jobs and role processes follow the replicated state, level-triggered.

Every active job in the state has a :class:`~fabricd.job.JobRuntime` on this daemon (indexes,
planner), started once its ``job_submitted`` record is committed, and planning with the job's
committed ``plan_changed`` records (an uncommitted one may still be truncated by a new leader); a cancelled or resubmitted job's
runtime is dropped at once. Every role the state assigns to this node runs as a supervised child,
started on a committed record; a role no longer assigned here is stopped at once (stopping early
costs only a pause). Cheap when nothing changed: it acts only when the log position moves.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from .cluster.placement import local_changes
from .config import parse_job_spec
from .errors import ConfigError
from .job import JobRuntime, dp_history_of
from .roles.base import RoleArgs

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["LocalReconciler"]

log = logging.getLogger(__name__)


class LocalReconciler:
    """Makes ``daemon``'s jobs and role processes match the state it replicates."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._applied: tuple[int, int] = (-1, -1)  # (last_seq, commit_seq) reconciled

    def run(self) -> None:
        d = self.daemon
        state, commit = d.cluster.state, d.cluster.commit_seq
        if (state.last_seq, commit) == self._applied:
            return
        self._applied = (state.last_seq, commit)
        self._jobs(commit)
        self._roles(commit)

    def _jobs(self, commit: int) -> None:
        d = self.daemon
        # a job starts (indexes, planner) on a committed record; a cancellation acts at once
        active = {name: j for name, j in d.cluster.state.jobs.items()
                  if not j.cancelled and (name in d.jobs or j.seq <= commit)}
        for name in list(d.jobs):
            if (name not in active or d.jobs[name].spec.text != active[name].spec_toml
                    or d.jobs[name].record_seq != active[name].seq):  # resubmitted: run it afresh
                log.info("job %s %s", name, "cancelled" if name not in active else "replaced")
                d.jobs.pop(name).close()  # stops its plan worker
        for name, entry in active.items():
            if name in d.jobs:
                d.jobs[name].update_plan(d.cluster.state.committed_plan_changes(name, commit))
                continue
            path = d.jobs_dir / f"{name}.toml"
            path.write_text(entry.spec_toml, encoding="utf-8")
            try:
                spec = parse_job_spec(entry.spec_toml, entry.spec_origin)
            except ConfigError as e:  # validated by the leader; a local path problem, say
                log.error("job %s cannot run on this node: %s", name, e)
                continue
            d.jobs[name] = JobRuntime(spec, index_dir=d.index_dir, directory=d, record_seq=entry.seq,
                                      data_roots=d.cfg.data_roots, dp_history=dp_history_of(entry.extra),
                                      plan_changes=d.cluster.state.committed_plan_changes(name, commit),
                                      plan_threads=d.plan_threads)
        for name, job in d.jobs.items():  # steps of a change this log holds uncommitted wait (JobRuntime.plan)
            job.hold_from = d.cluster.state.uncommitted_change_from(name, commit)

    def _roles(self, commit: int) -> None:
        d = self.daemon
        state = d.cluster.state
        running = {rid: role.args.extra.get("assignment") for rid, role in d.supervisor.roles.items()}
        stop, start = local_changes(state.roles, node=d.cfg.node_id, jobs=d.jobs, commit_seq=commit, running=running)
        if stop:
            d.supervisor.stop(stop)
        for rid in start:
            if rid in d.supervisor.roles:
                continue
            r = state.roles[rid]
            job = d.jobs[r.job]
            extra = {**r.extra, "assignment": r.extra, "index_dir": str(d.index_dir),
                     "data_roots": [str(p) for p in d.cfg.data_roots], "ipc_dir": str(d.ipc_dir or ""),
                     "stream_ipc_dir": str(d.stream_ipc_dir or "")}
            d.supervisor.start(RoleArgs(
                kind=r.kind, role_id=rid, daemon=d.local_endpoint, job=r.job,
                spec_path=str(d.jobs_dir / f"{r.job}.toml"), spec_origin=job.spec.file,
                bind_host=d.cfg.advertise_host, heartbeat_s=d.cfg.heartbeat_s,
                max_message_bytes=d.cfg.max_message_bytes, extra=extra, parent_pid=os.getpid(),
                node_id=d.cfg.node_id, keys_dir="" if d.ring is None else str(d.cfg.security.keys_dir)))
