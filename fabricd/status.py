"""What a daemon reports about itself: the status document (``fabricctl status``) and the
telemetry and role views its heartbeats carry to its peers."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import msgspec
import psutil

from . import __version__
from .cluster.telemetry import NodeTelemetry, RoleProcessTelemetry, RoleView
from .planner import native

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["HOSTS_PER_BEAT", "build_status", "node_telemetry", "role_view"]

HOSTS_PER_BEAT = 2048  # trainer host declarations passed on per heartbeat


def build_status(daemon: Daemon, now: float) -> dict[str, Any]:
    """The status document: node, cluster, telemetry, counters, and per job its state, roles,
    progress, trainer hosts and pools. JSON-typed (it travels in a ``StatusReply``)."""
    state = daemon.cluster.state
    jobs = {}
    for name, job in daemon.jobs.items():
        roles = []
        for rid in sorted(daemon.role_ids(name)):
            assigned = state.roles[rid]
            local = daemon.supervisor.roles.get(rid)
            endpoint = daemon.endpoint(rid)
            info = {"id": rid, "kind": assigned.kind, "node": assigned.node, "endpoint": endpoint,
                    "alive": endpoint is not None, "source": assigned.extra.get("source")}
            if local is not None:
                info.update(pid=local.pid, restarts=local.restarts, stats=msgspec.to_builtins(local.stats),
                            **daemon.supervisor.telemetry(local))
            roles.append(info)
        serving = job.state == "ready" and all(job.constructor_endpoint(g[0]) is not None for g in job.groups)
        jobs[name] = {**job.status(), "serving": serving, "roles": roles,
                      "progress_floor": state.floor_step(name),  # every rank reached it
                      "progress": dict(state.progress.get(name, {})),  # ranks ahead of the floor
                      "trainer_hosts": dict(state.hosts.get(name, {})),
                      "pool_sizes": dict(state.pools.get(name, {})),
                      "skipped_recorded": len(state.skipped.get(name, ()))}
    status = {
        "node": daemon.cfg.node_id,
        "version": __version__,
        "planner": native.describe(),  # "c", or "numpy (why)": the same plans either way
        "endpoint": daemon.bound_endpoint,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - daemon.started, 1),
        "leader": daemon.cluster.leader,
        "term": daemon.cluster.term,
        "is_leader": daemon.cluster.is_leader(now),
        "cluster": daemon.cluster.status(now),
        "telemetry": msgspec.to_builtins(node_telemetry(daemon)),
        "counters": daemon.metrics.status_counters(),
        "dropped": daemon.metrics.status_dropped(),
        "log_lines_suppressed": dict(daemon.bad_input.suppressed),
        "leadership": dict(daemon.leadership.counters),
        "online_mixing": daemon.leadership.online_status(),
        "security": ({"insecure": True, "warning": "plaintext sockets, no authentication ([security] insecure = true)"}
                     if daemon.ring is None else
                     {"insecure": False, "keys_dir": str(daemon.ring.keys_dir),
                      "keys": dict(daemon.ring.counts),
                      "refused_handshakes": daemon.sockets.refused_handshakes()}) | {
            # same-node links: a private Unix socket directory, plaintext (fabricd.local_ipc)
            "local_ipc": str(daemon.ipc_dir) if daemon.ipc_dir else None,
            # trainer streams over Unix sockets shared with a group of trainers' users
            "trainer_ipc": {"dir": str(daemon.trainer_ipc_dir), "group": daemon.cfg.security.trainer_group}
            if daemon.trainer_ipc_dir else None},
        "jobs": jobs,
        "metrics": daemon.metrics_server.status(),  # the /metrics URL, or why it is not served
    }
    # round-trip through JSON so nothing non-serializable reaches the encoder
    return json.loads(json.dumps(status, default=str))


def role_view(daemon: Daemon) -> dict[str, RoleView]:
    """This node's roles as peers see them in heartbeats (endpoint, liveness, trainer positions)."""
    view = {}
    for rid, role in daemon.supervisor.roles.items():
        st = role.stats
        trainers = [(s.dp_rank, s.mp_rank, s.next_step) for s in st.subscriptions]
        trainers += st.departed  # trainers that left: where they were
        view[rid] = RoleView(endpoint=role.endpoint, kind=role.args.kind,
                             alive=role.alive and bool(role.endpoint), trainers=trainers)
    return view


def node_telemetry(daemon: Daemon) -> NodeTelemetry:
    """Node CPU and memory, per role process its RSS, CPU and counters, and the trainer host
    declarations the leader has not recorded yet."""
    vm = psutil.virtual_memory()
    roles = {}
    for rid, role in daemon.supervisor.roles.items():
        st = role.stats
        roles[rid] = RoleProcessTelemetry(
            **daemon.supervisor.telemetry(role), builds=st.builds, units=st.units, requests=st.requests,
            busy_s=st.busy_s, built_batches=st.built_batches, hedged=st.hedged,
            load_retries=st.load_retries, sent=st.sent, batches_sent=st.batches_sent, tokens_sent=st.tokens_sent,
            load_queue={src: queued + in_flight for src, (queued, in_flight) in st.load_queues.items()},
            trainer_waits=[(s.dp_rank, s.mp_rank, s.next_step, s.data_wait_s) for s in st.subscriptions])
    return NodeTelemetry(cpu_percent=psutil.cpu_percent(None), mem_used_percent=vm.percent,
                         mem_available_mb=round(vm.available / 2**20), roles=len(daemon.supervisor.roles),
                         role_processes=roles, hostname=daemon.hostname[:255],
                         trainer_hosts=_host_declarations(daemon))


def _host_declarations(daemon: Daemon) -> list[tuple]:
    """Declarations the state does not hold yet, as ``(job, dp, mp, host, ms)`` (and forget the
    rest); at most ``HOSTS_PER_BEAT`` per heartbeat, so a job of many thousand ranks starting at
    once spreads its declarations over a few beats instead of one huge message."""
    state = daemon.cluster.state
    out = []
    for key, (host, ms) in list(daemon.declared_hosts.items()):
        if not state.host_is_news(*key, host, ms):
            del daemon.declared_hosts[key]
        elif len(out) < HOSTS_PER_BEAT:
            out.append((*key, host, ms))
    return out
