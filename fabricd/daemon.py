"""The fabricd daemon: one per node; hosts jobs' roles as supervised children and answers requests.

One ROUTER socket is the control endpoint for trainers (``Hello``, ``Locate``), ``fabricctl``
(``SubmitJob``, ``StatusRequest``, ``CancelJob``) and the daemon's own role processes
(``RoleHello``, ``RoleStats``, ``PlanRequest``, ``PoolsRequest``, ``SkipReport``). The loop only
decodes and dispatches; each request type has one handler. A malformed message is counted and
dropped (answered with an ``ErrorReply`` when the sender can be addressed); the daemon keeps
serving whatever arrives.

Submitted job specs are persisted under ``<state_dir>/jobs`` and resumed when the daemon
restarts, so ``systemctl restart fabricd`` does not lose a running job.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

from fabric_client import protocol
from fabric_client.errors import ProtocolError

from . import __version__
from .config import JobSpec, NodeConfig, parse_job_spec
from .errors import ConfigError
from .job import JobRuntime
from .roles.base import configure_socket
from .roles.supervisor import Supervisor

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

Reply = tuple[protocol.Message, tuple] | protocol.Message | None


class Daemon:
    """The node daemon. ``serve()`` runs until ``stop()`` (from a signal handler or a test)."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        configure_socket(self.sock, max_message_bytes=cfg.max_message_bytes, hwm=10000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = self._bind(cfg.control)
        self.supervisor = Supervisor(backoff_s=cfg.restart_backoff_s, backoff_max_s=cfg.restart_backoff_max_s)
        self.jobs: dict[str, JobRuntime] = {}
        self.counters = {"malformed_dropped": 0, "requests": 0, "unroutable_replies": 0}
        self.started = time.time()
        self._stopping = False
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
        }
        self.jobs_dir = cfg.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._restore_jobs()

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

    def _restore_jobs(self) -> None:
        for path in sorted(self.jobs_dir.glob("*.toml")):
            origin_file = path.with_suffix(".origin")
            try:
                spec = parse_job_spec(path.read_text(encoding="utf-8"), origin_file.read_text().strip())
            except (OSError, ConfigError) as e:
                log.error("cannot resume persisted job %s: %s", path, e)
                continue
            log.info("resuming job %s from %s", spec.name, path)
            self._start_job(spec, path)

    # -- loop -----------------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until :meth:`stop`; then stop every role process and close the socket."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stopping:
                for role in self.supervisor.poll():
                    log.info("role %s will be restarted by the supervisor", role.role_id)
                for job in self.jobs.values():
                    job.tick()
                if not poller.poll(100):
                    continue
                # drain what is queued, bounded so supervision is never starved
                for _ in range(1000):
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
        self.sock.close(linger=0)
        self.ctx.term()

    def _handle(self, frames: list) -> None:
        self.counters["requests"] += 1
        identity = frames[0].bytes
        try:
            msg, payload = protocol.decode(frames[1:])
            handler = self.handlers.get(type(msg))
            if handler is None:
                raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"the daemon does not serve {msg.TYPE}")
            reply = handler(identity, msg, payload)
        except ProtocolError as e:
            self.counters["malformed_dropped"] += 1
            log.warning("dropped malformed message (%d so far): %s", self.counters["malformed_dropped"], e)
            reply = protocol.ErrorReply(code=e.code, reason=e.reason)
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

    # -- handlers -------------------------------------------------------------------------------

    def on_hello(self, _identity: bytes, msg: protocol.Hello, _payload: list) -> Reply:
        if msg.protocol != protocol.PROTOCOL_VERSION:
            return protocol.ErrorReply(code=protocol.ErrorCode.VERSION,
                                       reason=f"daemon speaks protocol {protocol.PROTOCOL_VERSION}, peer {msg.protocol}")
        return protocol.Welcome(protocol=protocol.PROTOCOL_VERSION, node=self.cfg.node_id, daemon_version=__version__)

    def on_submit(self, _identity: bytes, msg: protocol.SubmitJob, _payload: list) -> Reply:
        try:
            spec = parse_job_spec(msg.spec_toml, msg.spec_path)
        except ConfigError as e:
            return protocol.ErrorReply(code=protocol.ErrorCode.INVALID_SPEC, reason=str(e))
        current = self.jobs.get(spec.name)
        if current is not None and current.spec.text == spec.text and current.spec.file == spec.file \
                and current.state != "failed":
            return protocol.JobAccepted(job=spec.name, fingerprint=current.fingerprint, state=current.state)
        path = self.jobs_dir / f"{spec.name}.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(msg.spec_toml, encoding="utf-8")
        path.with_suffix(".origin").write_text(spec.file + "\n")
        os.replace(tmp, path)
        if current is not None:
            log.warning("job %s resubmitted with a different spec; replacing it", spec.name)
            current.stop()
        job = self._start_job(spec, path)
        return protocol.JobAccepted(job=spec.name, fingerprint=job.fingerprint, state=job.state)

    def _start_job(self, spec: JobSpec, path: Path) -> JobRuntime:
        job = JobRuntime(spec, path, self.cfg, self.local_endpoint, self.supervisor)
        self.jobs[spec.name] = job
        return job

    def on_cancel(self, _identity: bytes, msg: protocol.CancelJob, _payload: list) -> Reply:
        job = self.jobs.pop(msg.job, None)
        if job is None:
            return protocol.ErrorReply(code=protocol.ErrorCode.UNKNOWN_JOB, reason=f"no job named {msg.job!r}")
        job.stop()
        for suffix in (".toml", ".origin"):
            (self.jobs_dir / f"{msg.job}{suffix}").unlink(missing_ok=True)
        return protocol.Ok()

    def on_status(self, _identity: bytes, _msg: protocol.StatusRequest, _payload: list) -> Reply:
        vm = psutil.virtual_memory()
        status = {
            "node": self.cfg.node_id,
            "version": __version__,
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "leader": self.cfg.node_id,  # a node is a cluster of one until membership lands
            "telemetry": {"cpu_percent": psutil.cpu_percent(None), "mem_used_percent": vm.percent,
                          "mem_available_mb": round(vm.available / 2**20)},
            "counters": dict(self.counters),
            "jobs": {name: job.status() for name, job in self.jobs.items()},
        }
        # round-trip through JSON so nothing non-serializable reaches the encoder
        return protocol.StatusReply(status=json.loads(json.dumps(status, default=str)))

    def _job(self, name: str) -> JobRuntime | protocol.ErrorReply:
        job = self.jobs.get(name)
        if job is None:
            return protocol.ErrorReply(code=protocol.ErrorCode.UNKNOWN_JOB, reason=f"no job named {name!r} on node {self.cfg.node_id}")
        return job

    def on_locate(self, _identity: bytes, msg: protocol.Locate, _payload: list) -> Reply:
        job = self._job(msg.job)
        return job if isinstance(job, protocol.ErrorReply) else job.locate(msg)

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
        job = self.jobs.get(msg.job)
        if job is not None:
            job.on_skip(msg)
        return None
