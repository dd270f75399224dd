"""The fabricd daemon: one per node. Answers requests, runs the roles assigned to it, and takes
part in the cluster (lease, log replication, heartbeats) through :class:`ClusterController`.

This module is the thin socket loop. One ROUTER socket is the control endpoint for trainers,
``fabricctl``, this daemon's role processes and peer daemons; the loop decodes each message (the
protocol validates every field) and dispatches it by type to its handler in
:mod:`fabricd.handlers`, which documents each request and reply. A malformed message is counted
per reason and dropped (answered with an ``ErrorReply`` when the sender can be addressed), with
rate-limited log lines; the daemon keeps serving. Peers are reached through one DEALER each.

What the daemon runs follows the replicated state, level-triggered (:mod:`fabricd.reconcile`).
Decisions — accepting a job, placing roles, recording skipped samples and trainer progress, pool
sizes — are taken by the leader only, and only while it can prove it holds the lease
(:class:`~fabricd.leadership.Leadership`). What it reports is built by :mod:`fabricd.status`.

Trainers declare their host in ``Locate``. The daemon that answered passes the declaration on in
its heartbeats until the leader has recorded it (``trainer_host``), and the leader places each
constructor on a daemon of its trainers' host.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import zmq
from fabric_client import protocol
from fabric_client.errors import ProtocolError
from fabric_client.keys import KeyRing
from fabric_client.sockets import SocketFactory

from . import __version__, local_ipc
from .cluster.controller import ClusterController, NotLeader
from .cluster.log import LogError
from .cluster.state import StateError
from .cluster.wire import to_peer
from .config import NodeConfig
from .errors import FabricdError
from .handlers import CALLERS, HANDLERS, caller_kind
from .job import JobRuntime, SkipUnit
from .leadership import Leadership
from .metrics import SEND_QUEUE_FULL, UNROUTABLE_REPLY, FabricMetrics, MetricsServer
from .metrics_reading import DaemonReader
from .planner import native
from .planner.threads import plan_threads
from .ratelog import RateLimitedLog, truncate
from .reconcile import LocalReconciler
from .roles.supervisor import Supervisor
from .sdnotify import SystemdNotifier
from .service import ServiceLifecycle
from .status import node_telemetry, role_view

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

PEER_LINGER_MS = 200  # at shutdown: how long queued peer messages (the lease release) may take to leave


class Daemon:
    """The node daemon. ``serve()`` runs until ``stop()`` (from a signal handler or a test).

    ``notifier`` (optional) reports to systemd through :attr:`service`, which also runs the
    reloads asked for by ``service.request_reload()`` (SIGHUP) and its ``reload_hooks``.
    """

    def __init__(self, cfg: NodeConfig, notifier: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        try:  # threads per job's plan worker: FABRICD_PLAN_THREADS, else a few within this process's cores
            self.plan_threads = plan_threads()
        except ValueError as e:
            raise FabricdError(str(e)) from None
        self.ctx = zmq.Context()
        if cfg.security.insecure:
            self.ring = None
            log.warning("INSECURE: %s has [security] insecure = true: plaintext sockets, and anyone who can "
                        "reach this node may submit and cancel jobs, register roles and read data", cfg.file)
        else:  # KeysError (names the file) when a key is missing or malformed
            self.ring = KeyRing(cfg.security.keys_dir, cfg.node_id)
        self.sockets = SocketFactory(self.ctx, max_message_bytes=cfg.max_message_bytes, ring=self.ring,
                                     keys=None if self.ring is None else self.ring.client())
        self.sock = self.sockets.router(hwm=10000)
        self.bound_endpoint = self._bind(cfg.control)
        self.supervisor = Supervisor(backoff_s=cfg.restart_backoff_s, backoff_max_s=cfg.restart_backoff_max_s)
        self.cluster = ClusterController(cfg, now=time.monotonic(), cpus=os.cpu_count() or 0)
        self.peers: dict[str, zmq.Socket] = {}
        for peer in cfg.cluster.peers:
            if peer.node_id != cfg.node_id:
                s = self.sockets.dealer(hwm=1000)
                s.connect(peer.control)
                self.peers[peer.node_id] = s
        self.jobs: dict[str, JobRuntime] = {}
        self.jobs_dir = cfg.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.index_dir = cfg.state_dir / "indexes"
        # same-node links over private Unix sockets (fabricd.local_ipc); removed at shutdown
        self.ipc_dir = local_ipc.make_dir(cfg.state_dir / "ipc_dir") if cfg.security.local_ipc else None
        # and trainer streams over Unix sockets shared with [security] trainer_group, when set
        sec = cfg.security
        self.trainer_ipc_dir = local_ipc.make_shared_dir(
            sec.trainer_gid, cfg.state_dir / "trainer_ipc_dir", sec.trainer_socket_dir,
        ) if self.ipc_dir is not None and sec.trainer_gid is not None else None
        # what the daemon counts (messages, drops per socket and reason) and its /metrics endpoint
        self.metrics = FabricMetrics(cfg.node_id, __version__)
        self.metrics_reader = DaemonReader()
        self.metrics_server = MetricsServer(cfg.metrics, self.metrics.registry, cfg.metrics_endpoint_file)
        self.bad_input = RateLimitedLog(log)
        self.started = time.time()
        self._stopping = False
        # trainers' host declarations (from Locate) not yet in the state: (job, dp, mp) → (host, ms);
        # heartbeats carry them to the leader until it records them (bounded by the jobs' ranks)
        self.declared_hosts: dict[tuple[str, int, int], tuple[str, int]] = {}
        self.hostname = socket.gethostname()
        self.leadership = Leadership(cfg, self.cluster, self.jobs, self.propose)
        self.current_caller: str | None = None  # the key of the request being handled (see _handle)
        self._skip_tails: dict[str, tuple[object, tuple]] = {}  # job → (key, skip_records answer) past the commit point
        self.reconciler = LocalReconciler(self)
        self.service = ServiceLifecycle(self, notifier)
        self.service.reload_hooks.append(lambda _cfg: self.reload_keys())  # SIGHUP: the allow-lists too

    # -- setup ----------------------------------------------------------------------------------

    @property
    def stream_ipc_dir(self) -> Path | None:
        """Where this daemon's constructors serve trainer streams on Unix sockets
        (fabricd.local_ipc): the directory shared with ``[security] trainer_group``, else the
        private one (the daemon's user only), else None."""
        return self.trainer_ipc_dir or self.ipc_dir

    def _bind(self, control: str) -> str:
        if control.startswith("tcp://") and control.rsplit(":", 1)[-1] == "0":
            host = control[len("tcp://"):].rsplit(":", 1)[0]
            port = self.sock.bind_to_random_port(f"tcp://{host}")
            endpoint = f"tcp://{host}:{port}"
        else:
            self.sock.bind(control)
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # roles on this node connect back here; a wildcard bind is reached through loopback
        self.local_endpoint = endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cfg.endpoint_file.with_suffix(".tmp")
        tmp.write_text(self.local_endpoint + "\n")
        os.replace(tmp, self.cfg.endpoint_file)
        log.info("fabricd %s node %s listening on %s", __version__, self.cfg.node_id, endpoint)
        if native.module is None:  # the same plans, bit for bit, several times slower at thousands of ranks
            log.warning("planner: %s", native.describe())
        return endpoint

    # -- loop -----------------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until :meth:`stop`; then stop every role process and close the sockets."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stopping:
                now = time.monotonic()
                self.supervisor.poll()
                self.send_to_peers(self.cluster.tick(now, telemetry=lambda: node_telemetry(self),
                                                     roles=lambda: role_view(self)))
                if self.cluster.is_leader(now):
                    self.leadership.run(now)
                self.reconciler.run()
                self.service.turn(now)  # reload if asked; READY, STATUS, WATCHDOG to systemd
                if self.metrics.due(now):
                    self.metrics.refresh(self.metrics_reader.read(self))
                if not poller.poll(50):
                    continue
                for _ in range(1000):  # drain, bounded so the cluster tick is never starved
                    try:
                        frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
        finally:
            self.shutdown()

    def stop(self) -> None:
        if not self._stopping:
            self.service.stopping()
        self._stopping = True

    def shutdown(self) -> None:
        # a leader hands over first, so a shadow is elected while the roles drain
        self.send_to_peers(self.cluster.release_lease(time.monotonic()))
        self.metrics_server.close()
        log.info("stopping %d role processes", len(self.supervisor.roles))
        self.supervisor.stop()
        for job in self.jobs.values():
            job.close()
        for s in self.peers.values():
            s.close(linger=PEER_LINGER_MS)  # the lease release may still be queued
        self.sock.close(linger=0)
        local_ipc.remove_dir(self.ipc_dir)
        local_ipc.remove_dir(self.trainer_ipc_dir)
        self.cluster.log.close()
        self.sockets.close()
        self.ctx.term()

    def send_to_peers(self, messages: list[tuple[str, Any]]) -> None:
        for peer, msg in messages:
            sock = self.peers.get(peer)
            if sock is None:
                continue
            try:
                sock.send_multipart(protocol.encode(*to_peer(self.cfg.node_id, msg)), flags=zmq.NOBLOCK)
            except zmq.Again:  # the peer is gone or slow: lease and replication messages are retried
                self.metrics.dropped.add("peer", SEND_QUEUE_FULL)

    def _handle(self, frames: list) -> None:
        self.metrics.events.requests += 1
        identity = frames[0].bytes
        try:
            msg, payload = protocol.decode(frames[1:])
            handler = HANDLERS.get(type(msg))
            if handler is None:
                raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"the daemon does not serve {msg.TYPE}")
            # who sent it (``kind:name`` of its key; None on an insecure node), for handlers that record it
            self.current_caller = self.sockets.caller(frames) if self.ring is not None else None
            if self.ring is not None:
                self._authorize(msg, self.current_caller)
            reply = handler(self, identity, msg, payload)
            self.reconciler.run()
        except ProtocolError as e:
            self.bad_input.warning(e.code, "dropped malformed message (%d so far): %s",
                                   self.metrics.dropped.add("control", e.code), e)
            reply = protocol.ErrorReply(code=e.code, reason=truncate(e.reason))
        except Exception as e:  # a bug in one handler must not take the node down; it is logged loudly
            log.exception("handler failed")
            reply = protocol.ErrorReply(code=protocol.ErrorCode.INTERNAL, reason=truncate(f"{type(e).__name__}: {e}"))
        if reply is None:
            return
        msg_out, payload_out = reply if isinstance(reply, tuple) else (reply, ())
        try:
            self.sock.send_multipart([identity, *protocol.encode(msg_out, payload_out)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer left; EAGAIN: its queue is full
            self.metrics.dropped.add("control", UNROUTABLE_REPLY)
            log.debug("reply to a departed peer dropped: %s", e)

    def reload_keys(self) -> None:
        """Read the key allow-lists again (a key added is let in, one removed is refused from its
        next message on) and have every local role process do the same (SIGHUP). A keys directory
        that cannot be read keeps the lists in force (raises KeysError, logged by the reload)."""
        if self.ring is None:
            return
        counts = self.ring.reload()
        log.warning("reload: key allow-lists read again: %s", counts)
        for role in self.supervisor.roles.values():
            if role.pid is not None and role.alive:
                try:
                    os.kill(role.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def out_of_touch(self, what: str) -> protocol.ErrorReply | None:
        """``ErrorReply(not_ready)`` ("WHAT: daemon N is not in touch with the leader"; counted)
        while this daemon's copy of the state may be stale (``ClusterController.in_touch``), else
        None: for the requests it must not answer from such a copy (plans, Locate)."""
        if self.cluster.in_touch(time.monotonic()):
            return None
        self.metrics.events.stale_refused += 1
        return protocol.ErrorReply(code=protocol.ErrorCode.NOT_READY,
                                   reason=f"{what}: daemon {self.cfg.node_id} is not in touch with the leader")

    def _authorize(self, msg: protocol.Message, who: str | None) -> None:
        """Refuse a message its sender's key may not send (see ``fabricd.handlers``)."""
        allowed = CALLERS[type(msg)]
        kind = caller_kind(who, self.cfg.node_id) if who is not None else None
        if kind is None or ("any" not in allowed and kind not in allowed):
            raise ProtocolError(protocol.ErrorCode.FORBIDDEN,
                                f"{who or 'a key no longer allowed'} may not send {msg.TYPE}")
        if isinstance(msg, protocol.PeerMessage) and msg.sender != who.partition(":")[2]:
            raise ProtocolError(protocol.ErrorCode.FORBIDDEN, f"{who} may not send peer messages as {msg.sender!r}")
        if isinstance(msg, protocol.Locate) and kind == "trainer" and (job := self.jobs.get(msg.job)) is not None \
                and not job.spec.trainer_allowed(who):
            raise ProtocolError(protocol.ErrorCode.FORBIDDEN, f"{who} may not read job {msg.job!r} (its job.trainers)")

    # RoleDirectory, for JobRuntime.locate / pools
    def endpoint(self, role_id: str) -> str | None:
        local = self.supervisor.roles.get(role_id)
        if local is not None:
            return local.endpoint if local.alive else None
        assigned = self.cluster.state.roles.get(role_id)
        now = time.monotonic()
        if assigned is None or not self.cluster.members.alive(assigned.node, now):
            return None
        view = self.cluster.members.members[assigned.node].roles.get(role_id)
        return view.endpoint if view is not None and view.alive else None

    def role_ids(self, job: str) -> list[str]:
        return [rid for rid, r in self.cluster.state.roles.items() if r.job == job]

    def skip_records(self, job: str) -> tuple[object, Collection[SkipUnit], Collection[SkipUnit]]:
        """The job's skip records as ``(key, committed, uncommitted)``; ``key`` changes whenever
        either does. A constructor may drop only committed units (an uncommitted record can still
        be truncated by a new leader); it must not deliver an uncommitted one either, until the
        record is committed or gone (``PlanReply.pending``)."""
        state, commit = self.cluster.state, self.cluster.commit_seq
        units = state.skipped.get(job, set())
        entry = state.jobs.get(job)
        key = (entry.seq if entry is not None else None, len(units), commit, state.last_seq, state.last_term)
        if state.last_seq <= commit:
            return key, units, ()
        cached = self._skip_tails.get(job)
        if cached is not None and cached[0] == key:
            return cached[1]
        tail, seq = set(), commit + 1
        while seq <= state.last_seq:
            records = self.cluster.log.read(seq, 1000)
            if not records:
                break
            tail |= {(r.data["source"], r.data["sample_id"], r.data["piece"], r.data["step"])
                     for r in records if r.kind == "sample_skipped" and r.data.get("job") == job}
            seq = records[-1].seq + 1
        self._skip_tails[job] = (key, (key, units - tail, tail))  # read from the log once per change
        return key, units - tail, tail

    def reported_skips(self, job: str, step: int) -> Collection[tuple[str, int, int]]:
        """``(source, sample_id, piece)`` reported as skipped at ``step`` and waiting, on this
        daemon as leader, to be appended to the log (none on a follower)."""
        if not self.cluster.is_leader(time.monotonic()):
            return ()
        return self.leadership.pending_units(job, step)

    # -- decisions (leader only; see fabricd.leadership) --------------------------------------------

    def propose(self, entries: list[tuple[str, dict]], now: float) -> bool:
        """Record ``entries`` as leader; True when all of them were recorded. A record the state
        refuses costs only itself: the others are proposed again one by one."""
        try:
            self.send_to_peers(self.cluster.propose(entries, now))
            return True
        except NotLeader:
            return False
        except StateError as e:
            if len(entries) > 1:
                results = [self.propose([entry], now) for entry in entries]
                return all(results)
            self.metrics.events.proposals_refused += 1
            self.bad_input.log(logging.ERROR, "refused", "refused to record %s: %s", entries[0][0], e)
            return False
        except LogError as e:
            log.error("could not record %d decisions: %s", len(entries), e)
            return False

    # -- for the handlers -----------------------------------------------------------------------

    def job_or_error(self, name: str) -> JobRuntime | protocol.ErrorReply:
        """The job ``name`` on this daemon, or the ``ErrorReply(unknown_job)`` to answer."""
        job = self.jobs.get(name)
        if job is None:
            return protocol.ErrorReply(code=protocol.ErrorCode.UNKNOWN_JOB,
                                       reason=f"no job named {name!r} on node {self.cfg.node_id}")
        return job

    def not_leader(self) -> protocol.ErrorReply:
        """The refusal of a leader-only request, naming the leader where it is known."""
        leader, endpoint = self.cluster.leader, self.cluster.leader_endpoint()
        return protocol.ErrorReply(code=protocol.ErrorCode.NOT_LEADER,
                                   reason=f"{self.cfg.node_id} is not the leader; leader: {leader or 'unknown'}"
                                          + (f" at {endpoint}" if endpoint else ""))

    def release_roles(self, job: str) -> list[tuple[str, dict]]:
        """Records releasing every role of ``job``."""
        return [("role_released", {"role_id": rid, "reason": f"job {job} replaced or cancelled"})
                for rid in self.role_ids(job)]
