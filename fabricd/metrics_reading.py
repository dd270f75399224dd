"""What a daemon's metrics read from the components that own the numbers (see :mod:`fabricd.metrics`).

Two entry points, both called on the daemon's loop:

- :func:`feed_role_stats`, when a role's ``RoleStats`` arrives: its running totals (units
  loaded, batches sent and data wait per trainer, skipped units, dropped messages) go through
  the counter feeds, keyed by ``(role id, pid)`` so a restarted role counts from zero again.
- :meth:`DaemonReader.read`, when a snapshot is due: the replicated state (roles, pools, skip
  records, progress), the lease and log, the local role processes (liveness, restarts, CPU and
  memory, load queues) and the leader's counters, read where they are kept, so the metrics and
  ``fabricctl status`` cannot disagree.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import psutil

from .cluster.autoscale import pool_bounds
from .metrics import (
    BALANCE, BALANCE_BOUND, CONSTRUCTOR_BUSY, DROPPED, IN_TOUCH, IS_LEADER, LEADER_CHANGES, LEASE_EVENTS, LEASE_TERM, LOCAL_ROLES_UP,
    LOG_COMMIT, LOG_LAST, PLAN_CACHE, PLAN_STEP, POOL_TARGET, POOL_WORKERS, PROGRESS_FLOOR, REPLICA_LAG, ROLE_CPU, ROLE_PSS, ROLE_RESTARTS,
    ROLE_RSS, ROLES, SKIP_REPORTS, SKIPPED_UNITS, SKIPS_RECORDED, SOURCE_BUSY, SOURCE_FAILED, SOURCE_IN_FLIGHT,
    SOURCE_QUEUED, SOURCE_UNITS, STALE_TERM, TRAINER_BATCHES, TRAINER_WAIT, FabricMetrics, Readings,
)

if TYPE_CHECKING:
    from .daemon import Daemon
    from .roles.supervisor import RoleProcess

__all__ = ["DaemonReader", "feed_role_stats", "trainer_label"]

SOURCE_LOADER = "source_loader"


def trainer_label(dp_rank: int, mp_rank: int) -> str:
    """The ``trainer`` label of one trainer rank: ``dp3/mp0``."""
    return f"dp{dp_rank}/mp{mp_rank}"


def feed_role_stats(metrics: FabricMetrics, role: RoleProcess) -> None:
    """Feed the running totals of the ``RoleStats`` just received from ``role``."""
    st, job, source = role.stats, role.args.job, (role.role_id, role.pid)
    if role.args.kind == SOURCE_LOADER:
        labels = (job, st.source or str(role.args.extra.get("source", "")))
        metrics.feed(SOURCE_UNITS, source, labels, st.units)
        metrics.feed(SOURCE_FAILED, source, labels, st.failed_units)
        metrics.feed(SOURCE_BUSY, source, labels, st.busy_s)
        socket = "loader"
    else:
        metrics.feed(SKIPPED_UNITS, source, (job,), st.skipped_units)
        metrics.feed(CONSTRUCTOR_BUSY, source, (job, role.role_id), st.busy_s)
        for dp, mp, sent, wait_s in st.delivered:
            metrics.feed(TRAINER_BATCHES, source, (job, trainer_label(dp, mp)), sent)
            metrics.feed(TRAINER_WAIT, source, (job, trainer_label(dp, mp)), wait_s)
        socket = "stream"
    metrics.feed(DROPPED, source, (socket, "malformed"), st.malformed)
    metrics.feed(DROPPED, source, (socket, "forbidden"), st.forbidden)


#: Seconds a process's PSS reading is reused. PSS comes from /proc/PID/smaps_rollup, which the
#: kernel computes by walking the process's page tables: milliseconds per process, so once a
#: second over a node's dozens of roles it took several percent of a core (CPU and RSS are cheap
#: and stay per snapshot).
PSS_REFRESH_S = 15.0


def _usage(proc: psutil.Process | None, labels: tuple[str, ...], r: Readings,
           pss_cache: dict[int, tuple[float, int | None]], now: float) -> None:
    """CPU seconds, RSS and PSS of one process, unless it is gone (PSS: where the kernel does not
    let us read it, the process's RSS is all there is to say; read at most every PSS_REFRESH_S,
    ``pss_cache``: pid → (when read, value))."""
    if proc is None:
        return
    try:
        with proc.oneshot():
            cpu, rss = proc.cpu_times(), proc.memory_info().rss
            cached = pss_cache.get(proc.pid)
            if cached is not None and now - cached[0] < PSS_REFRESH_S:
                pss = cached[1]
            else:
                try:
                    pss = proc.memory_full_info().pss  # /proc/PID/smaps_rollup
                except (psutil.AccessDenied, AttributeError):
                    pss = None
                pss_cache[proc.pid] = (now, pss)
    except psutil.Error:
        return
    r[ROLE_CPU][labels] = cpu.user + cpu.system
    r[ROLE_RSS][labels] = rss
    if pss is not None:
        r[ROLE_PSS][labels] = pss


class DaemonReader:
    """Reads one daemon's state into a snapshot's readings; keeps the daemon's psutil handle."""

    def __init__(self) -> None:
        self._daemon = psutil.Process(os.getpid())
        self._pss: dict[int, tuple[float, int | None]] = {}  # pid → (when read, PSS bytes or None)

    def read(self, daemon: Daemon) -> Readings:
        r: Readings = defaultdict(dict)
        self._state(daemon, r)
        self._local_roles(daemon, r)
        self._cluster(daemon, r)
        live = {(rid, role.pid) for rid, role in daemon.supervisor.roles.items()}
        for feed in daemon.metrics.feeds.values():
            feed.forget(lambda source: not isinstance(source, tuple) or source in live)
        return r

    def _state(self, daemon: Daemon, r: Readings) -> None:
        """Roles, pools, progress and skip records from the replicated state; balance per job."""
        state = daemon.cluster.state
        pools: dict[tuple[str, str], int] = defaultdict(int)
        for entry in state.roles.values():
            r[ROLES][(entry.job, entry.kind)] = r[ROLES].get((entry.job, entry.kind), 0) + 1
            if entry.kind == SOURCE_LOADER:
                pools[(entry.job, str(entry.extra.get("source", "")))] += 1
        for name, job in daemon.jobs.items():
            for s in job.spec.sources:
                base, _ = pool_bounds(job.spec, s.name, daemon.cfg.loader_workers)
                r[POOL_TARGET][(name, s.name)] = state.pools.get(name, {}).get(s.name, base)
                r[POOL_WORKERS][(name, s.name)] = pools.get((name, s.name), 0)
            r[PROGRESS_FLOOR][(name,)] = state.floor_step(name)
            r[SKIPS_RECORDED][(name,)] = len(state.skipped.get(name, ()))
            # the plan worker computes each plan's balance once (planner.quality)
            balance = job.plan_worker.latest_balance() if job.plan_worker is not None else None
            if job.plan_worker is not None:
                r[PLAN_CACHE][(name,)] = job.plan_worker.cached_bytes()
            if balance is not None:
                r[PLAN_STEP][(name,)] = balance.step
                r[BALANCE][(name,)] = balance.max_over_mean
                r[BALANCE_BOUND][(name,)] = balance.bound

    def _local_roles(self, daemon: Daemon, r: Readings) -> None:
        """Per role process of this daemon: up, restarts, CPU, memory, the load queues it holds;
        and the daemon process itself (kind ``daemon``)."""
        now = time.monotonic()
        seen = {self._daemon.pid}
        for rid, role in daemon.supervisor.roles.items():
            labels = (role.args.job, rid, role.args.kind)
            r[LOCAL_ROLES_UP][labels] = 1 if role.alive else 0
            r[ROLE_RESTARTS][labels] = role.restarts
            proc = daemon.supervisor.process(role)
            if proc is not None:
                seen.add(proc.pid)
            _usage(proc, labels, r, self._pss, now)
            for source, (queued, in_flight) in role.stats.load_queues.items():
                key = (role.args.job, source)
                r[SOURCE_QUEUED][key] = r[SOURCE_QUEUED].get(key, 0) + queued
                r[SOURCE_IN_FLIGHT][key] = r[SOURCE_IN_FLIGHT].get(key, 0) + in_flight
        _usage(self._daemon, ("", "daemon", "daemon"), r, self._pss, now)
        for pid in [p for p in self._pss if p not in seen]:  # bounded by the live processes
            del self._pss[pid]

    def _cluster(self, daemon: Daemon, r: Readings) -> None:
        """Lease, log, replication and the leader's skip-report outcomes."""
        cluster, now = daemon.cluster, time.monotonic()
        counters = cluster.counters
        r[LEASE_TERM][()] = cluster.term
        r[IS_LEADER][()] = 1 if cluster.is_leader(now) else 0
        r[IN_TOUCH][()] = 1 if cluster.in_touch(now) else 0
        r[LEADER_CHANGES][()] = counters.get("leader_changes", 0)
        r[LEASE_EVENTS][("elections_won",)] = counters.get("elections_won", 0)
        r[LEASE_EVENTS][("step_downs",)] = counters.get("step_downs", 0)
        last = cluster.log.last_position[1]
        r[LOG_LAST][()] = last
        r[LOG_COMMIT][()] = cluster.commit_seq
        if cluster.tracker is not None:
            for shadow, match in cluster.tracker.shadow_positions().items():
                r[REPLICA_LAG][(shadow,)] = max(0, last - match)
        # stale-term messages: replication's (the controller's count) and the lease's own
        r[DROPPED][("peer", STALE_TERM)] = counters.get("stale_term_rejected", 0) + \
            int(cluster.lease.status().get("stale_rejected") or 0)
        r[DROPPED][("control", "handshake_refused")] = daemon.sockets.refused_handshakes()
        for key, value in daemon.leadership.counters.items():
            if key.startswith("skips_"):  # the skip reports' outcomes (the others are plan changes and mixing)
                r[SKIP_REPORTS][(key.removeprefix("skips_"),)] = value
