"""What every role process shares: its arguments, its link to the daemon, its exit conditions.

A role process is started by the daemon's supervisor as ``python -m fabricd.roles ARGS_JSON``, or
forked from the daemon's role template to the same effect (:mod:`fabricd.roles.template`).
It binds its own endpoint, announces it to the daemon (``RoleHello``), sends ``RoleStats``
heartbeats, and exits when the daemon is gone (parent-death signal and a parent-pid check), so a
killed daemon never leaves orphans behind.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from fabric_client import protocol
from fabric_client.errors import ProtocolError
from fabric_client.keys import KeyRing, KeysError
from fabric_client.sockets import SocketFactory

from .. import local_ipc

__all__ = ["RoleArgs", "DaemonLink", "HeapTrimmer", "set_parent_death_signal", "set_process_name", "StopFlag"]

log = logging.getLogger(__name__)

TRIM_EVERY_S = 5.0  # how often a role gives the C heap's free pages back (see HeapTrimmer)


@dataclass(frozen=True)
class RoleArgs:
    """The arguments the supervisor passes to a role process (as one JSON document)."""

    kind: str
    role_id: str
    daemon: str           # the daemon's control endpoint
    job: str
    spec_path: str        # persisted copy of the job spec
    spec_origin: str      # the file the spec came from (anchors relative paths)
    bind_host: str
    heartbeat_s: float
    max_message_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    parent_pid: int = 0   # the daemon; a role whose parent is not (or no longer) this pid exits
    node_id: str = ""     # the daemon's node: its key is this role's key
    keys_dir: str = ""    # CurveZMQ keys (fabric_client.keys); "" on an insecure node: plaintext

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> RoleArgs:
        return cls(**json.loads(text))


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to kill this process when its parent dies (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except OSError:
        log.debug("prctl unavailable; relying on the parent-pid check")


#: what ``top`` and ``ps -o comm`` call a role process, by role kind (forked or spawned alike)
PROCESS_NAMES = {"source_loader": "fd-loader", "constructor": "fd-constructor"}
_KIND_OF_NAME = {v: k for k, v in PROCESS_NAMES.items()}


def role_kind(process_name: str) -> str | None:
    """The role kind of a process named ``process_name`` (``psutil.Process.name()``), or None."""
    return _KIND_OF_NAME.get(process_name)


def set_process_name(name: str) -> None:
    """Name this process in ``top`` and ``ps -o comm`` (Linux, at most 15 bytes; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_NAME = 15
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass


class StopFlag:
    """Set by SIGTERM/SIGINT or by the parent's death; role loops check it every iteration."""

    def __init__(self, parent: int) -> None:
        self.stopping = False
        self.parent = parent
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: Any) -> None:
        self.stopping = True

    def should_stop(self) -> bool:
        if os.getppid() != self.parent:
            log.warning("daemon (pid %d) is gone; exiting", self.parent)
            self.stopping = True
        return self.stopping


class HeapTrimmer:
    """Gives the C heap's free pages back to the system every ``every_s`` seconds (glibc's
    ``malloc_trim(0)``; a no-op where there is none).

    A role's buffers (decoded row groups, images, encoded batches) come and go through malloc;
    glibc keeps the freed pages in the middle of its heap for reuse, so a role idles at its peak
    footprint. Measured on the demo corpus: 3 to 24 MB per source loader between requests. Costs
    about a millisecond per call, and page faults when the memory is used again."""

    def __init__(self, every_s: float = TRIM_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._next = 0.0
        self.trims = 0
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def maybe(self) -> None:
        if self._trim is None:
            return
        now = self.clock()
        if now >= self._next:
            self._next = now + self.every_s
            self._trim(0)
            self.trims += 1


def role_sockets(ctx: zmq.Context, args: RoleArgs) -> SocketFactory:
    """The role process's socket factory: CurveZMQ with its node's keys (it serves with the
    fabric's server key, and connects as its node), or plaintext on an insecure node. SIGHUP
    reads the allow-lists again (the daemon forwards it when its own are reloaded)."""
    if not args.keys_dir:
        return SocketFactory(ctx, max_message_bytes=args.max_message_bytes)
    ring = KeyRing(args.keys_dir, args.node_id)

    def reload(*_: object) -> None:
        try:
            log.info("allow-lists reloaded: %s", ring.reload())
        except KeysError as e:  # keep the old lists: a half-written key file must not lock anyone out
            log.error("allow-lists not reloaded: %s", e)

    signal.signal(signal.SIGHUP, reload)
    return SocketFactory(ctx, max_message_bytes=args.max_message_bytes, ring=ring, keys=ring.client())


def local_router(sockets: SocketFactory, args: RoleArgs, tcp_endpoint: str, *, domain: str) -> zmq.Socket | None:
    """A plaintext ROUTER on the Unix socket of ``tcp_endpoint`` in the daemon's directory for
    ``domain`` (fabricd.local_ipc): ``loader``, the private one; ``stream`` (trainers), the one
    the daemon names in ``Located.local_endpoint``, shared with ``[security] trainer_group`` when
    set, the socket open to whoever may enter it. The directory is the access control, so no
    CurveZMQ. None when the daemon has no such directory, or (logged; peers then use TCP) when
    it cannot bind."""
    stream = domain == "stream"
    directory = args.extra.get("stream_ipc_dir" if stream else "ipc_dir")
    if not directory:
        return None
    sock = sockets.router(domain=domain, local=True)
    endpoint = local_ipc.endpoint_for(directory, tcp_endpoint)
    try:
        sock.bind(endpoint)
        if stream:
            local_ipc.share_socket(directory, tcp_endpoint)
    except (zmq.ZMQError, OSError) as e:
        log.warning("cannot serve on %s (%s): same-node peers use TCP", endpoint, e)
        sock.close(linger=0)
        return None
    return sock


class DaemonLink:
    """A role's DEALER connection to its daemon: hello, heartbeats, and request/reply."""

    def __init__(self, sockets: SocketFactory, args: RoleArgs, endpoint: str) -> None:
        self.args = args
        self.endpoint = endpoint
        self.sock = sockets.dealer()
        self.sock.connect(args.daemon)
        self._next_beat = 0.0
        self.malformed = 0
        self.bad_stats = 0
        self.heap = HeapTrimmer()

    def hello(self) -> None:
        self.send(protocol.RoleHello(role_id=self.args.role_id, kind=self.args.kind,
                                     endpoint=self.endpoint, pid=os.getpid()))

    def send(self, msg: protocol.Message, payload: tuple = ()) -> None:
        try:
            self.sock.send_multipart(protocol.encode(msg, payload), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("daemon link full; dropped %s", msg.TYPE)

    def beat(self, stats: Callable[[], dict]) -> None:
        """When a heartbeat is due: re-announce, and send ``stats()`` (only computed then) as the
        typed :class:`~fabric_client.protocol.RoleCounters` (keys it does not name are left out);
        and give free heap pages back when that is due (:class:`HeapTrimmer`)."""
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + self.args.heartbeat_s
            self.heap.maybe()
            self.hello()
            try:
                counters = msgspec.convert(stats(), protocol.RoleCounters, strict=False)
            except msgspec.ValidationError as e:  # a bug here must not take the role down
                self.bad_stats += 1
                if self.bad_stats == 1 or self.bad_stats % 100 == 0:
                    log.error("role counters do not fit RoleCounters (%d times): %s", self.bad_stats, e)
                return
            self.send(protocol.RoleStats(role_id=self.args.role_id, stats=counters))

    def recv(self) -> tuple[protocol.Message, list] | None:
        """One message from the daemon, or None if it was malformed (counted)."""
        frames = self.sock.recv_multipart(copy=False)
        try:
            return protocol.decode(frames)
        except ProtocolError as e:
            self.malformed += 1
            log.warning("dropped malformed message from daemon: %s", e)
            return None

    def close(self) -> None:
        self.sock.close(linger=0)
