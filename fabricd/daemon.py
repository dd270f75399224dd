"""The fabricd daemon: one per node. Answers requests, runs the roles assigned to it, and takes
part in the cluster (lease, log replication, heartbeats) through :class:`ClusterController`.

One ROUTER socket is the control endpoint for trainers (``Hello``, ``Locate``), ``fabricctl``
(``SubmitJob``, ``StatusRequest``, ``CancelJob``), this daemon's role processes (``RoleHello``,
``RoleStats``, ``PlanRequest``, ``PoolsRequest``, ``SkipReport``) and peer daemons
(``PeerMessage``). The loop only decodes and dispatches; each request type has one handler. A
malformed message is counted and dropped (answered with an ``ErrorReply`` when the sender can be
addressed); the daemon keeps serving. Peers are reached through one DEALER each.

What the daemon runs follows the replicated state, level-triggered: every job in the state has
a :class:`JobRuntime` here (indexes, planner), and every role the state assigns to this node runs
as a supervised child. Decisions — accepting a job, placing roles, recording skipped samples and
trainer progress, pool sizes — are taken by the leader only, and only while it can prove it holds
the lease (:class:`~fabricd.leadership.Leadership`).

Trainers declare their host in ``Locate``. The daemon that answered passes the declaration on in
its heartbeats until the leader has recorded it (``trainer_host``), and the leader places each
constructor on a daemon of its trainers' host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

import msgspec
import psutil
import zmq
from fabric_client import protocol
from fabric_client.errors import ProtocolError
from fabric_client.sockets import SocketFactory

from . import __version__
from .admission import check_submission, is_retry
from .cluster.controller import ClusterController, NotLeader
from .cluster.log import LogError
from .cluster.placement import local_changes
from .cluster.state import StateError
from .cluster.telemetry import NodeTelemetry, RoleProcessTelemetry, RoleView
from .cluster.wire import from_peer, to_peer
from .config import NodeConfig, parse_job_spec
from .errors import ConfigError
from .job import JobRuntime
from .leadership import Leadership
from .ratelog import RateLimitedLog, truncate
from .roles.base import RoleArgs
from .roles.supervisor import Supervisor

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

Reply = tuple[protocol.Message, tuple] | protocol.Message | None
HOSTS_PER_BEAT = 2048  # trainer host declarations passed on per heartbeat


class Daemon:
    """The node daemon. ``serve()`` runs until ``stop()`` (from a signal handler or a test)."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.sockets = SocketFactory(self.ctx, max_message_bytes=cfg.max_message_bytes)
        self.sock = self.sockets.router(hwm=10000)
        self.bound_endpoint = self._bind(cfg.control)
        self.supervisor = Supervisor(backoff_s=cfg.restart_backoff_s, backoff_max_s=cfg.restart_backoff_max_s)
        self.cluster = ClusterController(cfg, now=time.monotonic())
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
        self.counters = {"malformed_dropped": 0, "requests": 0, "unroutable_replies": 0, "peer_sends_dropped": 0,
                         "proposals_refused": 0}
        self.dropped: dict[str, int] = {}  # malformed or refused messages by reason (ErrorCode)
        self.bad_input = RateLimitedLog(log)
        self.started = time.time()
        self._stopping = False
        self._applied: tuple[int, int] = (-1, -1)  # (last_seq, commit_seq) reconciled
        # trainers' host declarations (from Locate) not yet in the state: (job, dp, mp) → (host, ms);
        # heartbeats carry them to the leader until it records them (bounded by the jobs' ranks)
        self._declared_hosts: dict[tuple[str, int, int], tuple[str, int]] = {}
        self.hostname = socket.gethostname()
        self.leadership = Leadership(cfg, self.cluster, self.jobs, self._propose)
        self.handlers: dict[type[protocol.Message], Callable[[bytes, Any, list], Reply]] = {
            protocol.Hello: self.on_hello,
            protocol.Ping: lambda _i, m, _p: protocol.Pong(nonce=m.nonce),
            protocol.SubmitJob: self.on_submit,
            protocol.CancelJob: self.on_cancel,
            protocol.StatusRequest: self.on_status,
            protocol.Locate: self.on_locate,
            protocol.RoleHello: self.on_role_hello,
            protocol.RoleStats: self.on_role_stats,
            protocol.PlanRequest: self.on_plan,
            protocol.PoolsRequest: self.on_pools,
            protocol.SkipReport: self.on_skip,
            protocol.PeerMessage: self.on_peer,
        }

    # -- setup ----------------------------------------------------------------------------------

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
                self._send(self.cluster.tick(now, telemetry=self._telemetry, roles=self._role_view))
                if self.cluster.is_leader(now):
                    self.leadership.run(now)
                self._reconcile()
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
        self._stopping = True

    def shutdown(self) -> None:
        log.info("stopping %d role processes", len(self.supervisor.roles))
        self.supervisor.stop()
        for job in self.jobs.values():
            job.close()
        for s in self.peers.values():
            s.close(linger=0)
        self.sock.close(linger=0)
        self.cluster.log.close()
        self.ctx.term()

    def _send(self, messages: list[tuple[str, Any]]) -> None:
        for peer, msg in messages:
            sock = self.peers.get(peer)
            if sock is None:
                continue
            try:
                sock.send_multipart(protocol.encode(*to_peer(self.cfg.node_id, msg)), flags=zmq.NOBLOCK)
            except zmq.Again:  # the peer is gone or slow: lease and replication messages are retried
                self.counters["peer_sends_dropped"] += 1

    def _handle(self, frames: list) -> None:
        self.counters["requests"] += 1
        identity = frames[0].bytes
        try:
            msg, payload = protocol.decode(frames[1:])
            handler = self.handlers.get(type(msg))
            if handler is None:
                raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"the daemon does not serve {msg.TYPE}")
            reply = handler(identity, msg, payload)
            self._reconcile()
        except ProtocolError as e:
            self.counters["malformed_dropped"] += 1
            self.dropped[e.code] = self.dropped.get(e.code, 0) + 1
            self.bad_input.warning(e.code, "dropped malformed message (%d so far): %s",
                                   self.counters["malformed_dropped"], e)
            reply = protocol.ErrorReply(code=e.code, reason=truncate(e.reason))
        except Exception as e:  # a bug in one handler must not take the node down; it is logged loudly
            log.exception("handler failed")
            reply = protocol.ErrorReply(code=protocol.ErrorCode.INTERNAL, reason=f"{type(e).__name__}: {e}")
        if reply is None:
            return
        msg_out, payload_out = reply if isinstance(reply, tuple) else (reply, ())
        try:
            self.sock.send_multipart([identity, *protocol.encode(msg_out, payload_out)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer left; EAGAIN: its queue is full
            self.counters["unroutable_replies"] += 1
            log.debug("reply to a departed peer dropped: %s", e)

    # -- following the replicated state ---------------------------------------------------------

    def _reconcile(self) -> None:
        """Make the local jobs and roles match the state (cheap when nothing changed)."""
        state = self.cluster.state
        position = (state.last_seq, self.cluster.commit_seq)
        if position == self._applied:
            return
        self._applied = position
        # a job starts (indexes, planner) on a committed record; a cancellation acts at once
        active = {name: j for name, j in state.jobs.items()
                  if not j["cancelled"] and (name in self.jobs or j["seq"] <= self.cluster.commit_seq)}
        for name in list(self.jobs):
            if (name not in active or self.jobs[name].spec.text != active[name]["spec_toml"]
                    or self.jobs[name].record_seq != active[name]["seq"]):  # resubmitted: run it afresh
                log.info("job %s %s", name, "cancelled" if name not in active else "replaced")
                self.jobs.pop(name).close()  # stops its plan worker
        for name, entry in active.items():
            if name not in self.jobs:
                path = self.jobs_dir / f"{name}.toml"
                path.write_text(entry["spec_toml"], encoding="utf-8")
                try:
                    spec = parse_job_spec(entry["spec_toml"], entry["spec_origin"])
                except ConfigError as e:  # validated by the leader; a local path problem, say
                    log.error("job %s cannot run on this node: %s", name, e)
                    continue
                self.jobs[name] = JobRuntime(spec, index_dir=self.index_dir, directory=self, record_seq=entry["seq"])
        running = {rid: role.args.extra.get("assignment") for rid, role in self.supervisor.roles.items()}
        stop, start = local_changes(state.roles, node=self.cfg.node_id, jobs=self.jobs,
                                    commit_seq=self.cluster.commit_seq, running=running)
        if stop:
            self.supervisor.stop(stop)
        for rid in start:
            r = state.roles[rid]
            if rid not in self.supervisor.roles:
                job = self.jobs[r["job"]]
                extra = {**r["extra"], "assignment": r["extra"], "index_dir": str(self.index_dir)}
                self.supervisor.start(RoleArgs(
                    kind=r["kind"], role_id=rid, daemon=self.local_endpoint, job=r["job"],
                    spec_path=str(self.jobs_dir / f"{r['job']}.toml"), spec_origin=job.spec.file,
                    bind_host=self.cfg.advertise_host, heartbeat_s=self.cfg.heartbeat_s,
                    max_message_bytes=self.cfg.max_message_bytes, extra=extra, parent_pid=os.getpid()))

    # RoleDirectory, for JobRuntime.locate / pools
    def endpoint(self, role_id: str) -> str | None:
        local = self.supervisor.roles.get(role_id)
        if local is not None:
            return local.endpoint if local.alive else None
        assigned = self.cluster.state.roles.get(role_id)
        now = time.monotonic()
        if assigned is None or not self.cluster.members.alive(assigned["node"], now):
            return None
        view = self.cluster.members.members[assigned["node"]].roles.get(role_id)
        return view.endpoint if view is not None and view.alive else None

    def role_ids(self, job: str) -> list[str]:
        return [rid for rid, r in self.cluster.state.roles.items() if r["job"] == job]

    def committed_skips(self, job: str) -> tuple[object | None, Collection[tuple[str, int, int, int]]]:
        """The job's skip records that are committed (a constructor may drop only those: an
        uncommitted one can still be truncated by a new leader), with a cache key (None while
        records past the commit point exist: they are read back from the log, and subtracted)."""
        state, commit = self.cluster.state, self.cluster.commit_seq
        units = state.skipped.get(job, set())
        if state.last_seq <= commit:
            return (state.jobs.get(job, {}).get("seq"), len(units)), units
        tail, seq = set(), commit + 1
        while seq <= state.last_seq:
            records = self.cluster.log.read(seq, 1000)
            if not records:
                break
            tail |= {(r.data["source"], r.data["sample_id"], r.data["piece"], r.data["step"])
                     for r in records if r.kind == "sample_skipped" and r.data.get("job") == job}
            seq = records[-1].seq + 1
        return None, units - tail

    def _role_view(self) -> dict[str, RoleView]:
        """This node's roles as peers see them in heartbeats (endpoint, liveness, trainer positions)."""
        view = {}
        for rid, role in self.supervisor.roles.items():
            st = role.stats
            trainers = [(s.dp_rank, s.mp_rank, s.next_step) for s in st.subscriptions]
            trainers += st.departed  # trainers that left: where they were
            view[rid] = RoleView(endpoint=role.endpoint, kind=role.args.kind,
                                 alive=role.alive and bool(role.endpoint), trainers=trainers)
        return view

    def _telemetry(self) -> NodeTelemetry:
        """Node CPU and memory, and per role process its RSS, CPU, and queue depths and rates."""
        vm = psutil.virtual_memory()
        roles = {}
        for rid, role in self.supervisor.roles.items():
            st = role.stats
            roles[rid] = RoleProcessTelemetry(
                **self.supervisor.telemetry(role), builds=st.builds, units=st.units, requests=st.requests,
                busy_s=st.busy_s, built_batches=st.built_batches, hedged=st.hedged,
                load_retries=st.load_retries, sent=st.sent)
        return NodeTelemetry(cpu_percent=psutil.cpu_percent(None), mem_used_percent=vm.percent,
                             mem_available_mb=round(vm.available / 2**20), roles=len(self.supervisor.roles),
                             role_processes=roles, hostname=self.hostname[:255],
                             trainer_hosts=self._host_declarations())

    def _host_declarations(self) -> list[tuple]:
        """Declarations the state does not hold yet, as ``[job, dp, mp, host, ms]`` (and forget the
        rest); at most ``HOSTS_PER_BEAT`` per heartbeat, so a job of many thousand ranks starting
        at once spreads its declarations over a few beats instead of one huge message."""
        state = self.cluster.state
        out = []
        for key, (host, ms) in list(self._declared_hosts.items()):
            if not state.host_is_news(*key, host, ms):
                del self._declared_hosts[key]
            elif len(out) < HOSTS_PER_BEAT:
                out.append((*key, host, ms))
        return out

    # -- decisions (leader only; see fabricd.leadership) --------------------------------------------

    def _propose(self, entries: list[tuple[str, dict]], now: float) -> bool:
        """Record ``entries`` as leader; True when all of them were recorded. A record the state
        refuses costs only itself: the others are proposed again one by one."""
        try:
            self._send(self.cluster.propose(entries, now))
            return True
        except NotLeader:
            return False
        except StateError as e:
            if len(entries) > 1:
                results = [self._propose([entry], now) for entry in entries]
                return all(results)
            self.counters["proposals_refused"] += 1
            self.bad_input.log(logging.ERROR, "refused", "refused to record %s: %s", entries[0][0], e)
            return False
        except LogError as e:
            log.error("could not record %d decisions: %s", len(entries), e)
            return False

    # -- handlers -------------------------------------------------------------------------------

    def on_peer(self, _identity: bytes, msg: protocol.PeerMessage, payload: list) -> Reply:
        if msg.sender not in self.peers:
            raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"peer {msg.sender!r} is not in this cluster")
        self._send(self.cluster.on_peer(from_peer(msg, payload), time.monotonic()))
        return None

    def on_hello(self, _identity: bytes, msg: protocol.Hello, _payload: list) -> Reply:
        if msg.protocol != protocol.PROTOCOL_VERSION:
            return protocol.ErrorReply(code=protocol.ErrorCode.VERSION,
                                       reason=f"daemon speaks protocol {protocol.PROTOCOL_VERSION}, peer {msg.protocol}")
        return protocol.Welcome(protocol=protocol.PROTOCOL_VERSION, node=self.cfg.node_id, daemon_version=__version__)

    def _not_leader(self) -> protocol.ErrorReply:
        leader, endpoint = self.cluster.leader, self.cluster.leader_endpoint()
        return protocol.ErrorReply(code=protocol.ErrorCode.NOT_LEADER,
                                   reason=f"{self.cfg.node_id} is not the leader; leader: {leader or 'unknown'}"
                                          + (f" at {endpoint}" if endpoint else ""))

    def on_submit(self, _identity: bytes, msg: protocol.SubmitJob, _payload: list) -> Reply:
        try:
            spec = parse_job_spec(msg.spec_toml, msg.spec_path)
        except ConfigError as e:
            return protocol.ErrorReply(code=protocol.ErrorCode.INVALID_SPEC, reason=str(e))
        now = time.monotonic()
        if not self.cluster.is_leader(now):
            return self._not_leader()
        try:
            check_submission(spec, self.cfg)  # roles per daemon, source paths and formats
        except ConfigError as e:
            return protocol.ErrorReply(code=protocol.ErrorCode.INVALID_SPEC, reason=str(e))
        state = self.cluster.state
        current = state.jobs.get(spec.name)
        entries: list[tuple[str, dict]] = []
        if current is not None and not current["cancelled"]:
            job = self.jobs.get(spec.name)
            same = current["spec_toml"] == msg.spec_toml and current["spec_origin"] == spec.file
            if same and not is_retry(job.state if job else None):
                return protocol.JobAccepted(job=spec.name, fingerprint=job.fingerprint if job else "",
                                            state=job.state if job else "indexing")
            log.warning("job %s resubmitted %s; replacing it", spec.name,
                        "after it failed" if same else "with a different spec")
            entries += self._release_roles(spec.name)
            entries.append(("job_cancelled", {"job": spec.name, "reason": "resubmitted"}))
        entries.append(("job_submitted", {"job": spec.name, "spec_toml": msg.spec_toml, "spec_origin": spec.file,
                                          "fingerprint": "", "dp_size": spec.topology.dp_size}))
        if not self._propose(entries, now):
            return protocol.ErrorReply(code=protocol.ErrorCode.INTERNAL, reason="could not record the job; see the daemon log")
        return protocol.JobAccepted(job=spec.name, fingerprint="", state="indexing")

    def _release_roles(self, job: str) -> list[tuple[str, dict]]:
        return [("role_released", {"role_id": rid, "reason": f"job {job} replaced or cancelled"})
                for rid in self.role_ids(job)]

    def on_cancel(self, _identity: bytes, msg: protocol.CancelJob, _payload: list) -> Reply:
        now = time.monotonic()
        if not self.cluster.is_leader(now):
            return self._not_leader()
        current = self.cluster.state.jobs.get(msg.job)
        if current is None or current["cancelled"]:
            return protocol.ErrorReply(code=protocol.ErrorCode.UNKNOWN_JOB, reason=f"no job named {msg.job!r}")
        if not self._propose(self._release_roles(msg.job) + [("job_cancelled", {"job": msg.job, "reason": "cancelled"})], now):
            return protocol.ErrorReply(code=protocol.ErrorCode.INTERNAL, reason="could not record the cancellation")
        return protocol.Ok()

    def on_status(self, _identity: bytes, _msg: protocol.StatusRequest, _payload: list) -> Reply:
        now = time.monotonic()
        state = self.cluster.state
        jobs = {}
        for name, job in self.jobs.items():
            roles = []
            for rid in sorted(self.role_ids(name)):
                assigned = state.roles[rid]
                local = self.supervisor.roles.get(rid)
                endpoint = self.endpoint(rid)
                info = {"id": rid, "kind": assigned["kind"], "node": assigned["node"], "endpoint": endpoint,
                        "alive": endpoint is not None, "source": assigned["extra"].get("source")}
                if local is not None:
                    info.update(pid=local.pid, restarts=local.restarts, stats=msgspec.to_builtins(local.stats),
                                **self.supervisor.telemetry(local))
                roles.append(info)
            serving = job.state == "ready" and all(job.constructor_endpoint(g[0]) is not None for g in job.groups)
            jobs[name] = {**job.status(), "serving": serving, "roles": roles,
                          "progress_floor": state.floor_step(name),  # every rank reached it
                          "progress": dict(state.progress.get(name, {})),  # ranks ahead of the floor
                          "trainer_hosts": dict(state.hosts.get(name, {})),
                          "pool_sizes": dict(state.pools.get(name, {})),
                          "skipped_recorded": len(state.skipped.get(name, ()))}
        status = {
            "node": self.cfg.node_id,
            "version": __version__,
            "endpoint": self.bound_endpoint,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "leader": self.cluster.leader,
            "term": self.cluster.term,
            "is_leader": self.cluster.is_leader(now),
            "cluster": self.cluster.status(now),
            "telemetry": msgspec.to_builtins(self._telemetry()),
            "counters": dict(self.counters),
            "dropped": dict(self.dropped),
            "log_lines_suppressed": dict(self.bad_input.suppressed),
            "jobs": jobs,
        }
        # round-trip through JSON so nothing non-serializable reaches the encoder
        return protocol.StatusReply(status=json.loads(json.dumps(status, default=str)))

    def _job(self, name: str) -> JobRuntime | protocol.ErrorReply:
        job = self.jobs.get(name)
        if job is None:
            return protocol.ErrorReply(code=protocol.ErrorCode.UNKNOWN_JOB,
                                       reason=f"no job named {name!r} on node {self.cfg.node_id}")
        return job

    def on_locate(self, _identity: bytes, msg: protocol.Locate, _payload: list) -> Reply:
        job = self._job(msg.job)
        if isinstance(job, protocol.ErrorReply):
            return job
        topo = job.spec.topology
        if msg.host and msg.dp_size == topo.dp_size and 0 <= msg.dp_rank < topo.dp_size \
                and 0 <= msg.mp_rank < topo.mp_size and len(msg.host) <= 255:
            self._declared_hosts[(msg.job, msg.dp_rank, msg.mp_rank)] = (msg.host, int(time.time() * 1000))
        return job.locate(msg)

    def on_plan(self, _identity: bytes, msg: protocol.PlanRequest, _payload: list) -> Reply:
        job = self._job(msg.job)
        return job if isinstance(job, protocol.ErrorReply) else job.plan(msg)

    def on_pools(self, _identity: bytes, msg: protocol.PoolsRequest, _payload: list) -> Reply:
        job = self._job(msg.job)
        return job if isinstance(job, protocol.ErrorReply) else protocol.PoolsReply(job=msg.job, pools=job.pools())

    def on_role_hello(self, _identity: bytes, msg: protocol.RoleHello, _payload: list) -> Reply:
        role = self.supervisor.roles.get(msg.role_id)
        if role is None or role.pid != msg.pid:
            log.debug("hello from unknown or stale role %s (pid %d)", msg.role_id, msg.pid)
            return None
        role.endpoint = msg.endpoint
        role.last_seen = time.monotonic()
        return None

    def on_role_stats(self, _identity: bytes, msg: protocol.RoleStats, _payload: list) -> Reply:
        role = self.supervisor.roles.get(msg.role_id)
        if role is not None:
            role.stats = msg.stats
            role.last_seen = time.monotonic()
        return None

    def on_skip(self, _identity: bytes, msg: protocol.SkipReport, _payload: list) -> Reply:
        if (msg.source, msg.sample_id, msg.piece, msg.step) in self.cluster.state.skipped.get(msg.job, ()):
            return None  # already recorded: a constructor re-sends until it sees the record committed
        job = self.jobs.get(msg.job)
        if job is not None:
            job.on_skip(msg)
        record = {"job": msg.job, "source": msg.source, "sample_id": msg.sample_id, "piece": msg.piece,
                  "step": msg.step, "reason": msg.reason}
        if self.cluster.is_leader(time.monotonic()):
            self.leadership.add_skip(record)  # checked, bounded; kept until recorded
        elif (leader := self.cluster.leader) in self.peers:
            # the leader records it; a report lost on the way (or with a dying leader) is re-sent by the
            # constructor until it sees the skip committed
            try:
                self.peers[leader].send_multipart(protocol.encode(msg), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.counters["peer_sends_dropped"] += 1
        return None
