"""Requests from trainers: the version handshake, liveness, and where a rank's constructor is."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
from fabric_client import protocol

from .. import __version__, local_ipc
from . import Reply, handles

if TYPE_CHECKING:
    from ..daemon import Daemon


@handles(protocol.Hello, callers=("any",))
def hello(daemon: Daemon, _identity: bytes, msg: protocol.Hello, _payload: list) -> Reply:
    """Request: ``Hello(protocol, peer)``. Reply: ``Welcome(protocol, node, daemon_version)``, or
    ``ErrorReply(version)`` when the peer speaks another protocol version."""
    if msg.protocol != protocol.PROTOCOL_VERSION:
        return protocol.ErrorReply(code=protocol.ErrorCode.VERSION,
                                   reason=f"daemon speaks protocol {protocol.PROTOCOL_VERSION}, peer {msg.protocol}")
    return protocol.Welcome(protocol=protocol.PROTOCOL_VERSION, node=daemon.cfg.node_id, daemon_version=__version__)


@handles(protocol.Ping, callers=("any",))
def ping(_daemon: Daemon, _identity: bytes, msg: protocol.Ping, _payload: list) -> Reply:
    """Request: ``Ping(nonce)``. Reply: ``Pong(nonce)`` (behind whatever is queued before it)."""
    return protocol.Pong(nonce=msg.nonce)


@handles(protocol.Locate, callers=("trainer", "operator"))
def locate(daemon: Daemon, _identity: bytes, msg: protocol.Locate, _payload: list) -> Reply:
    """Request: ``Locate(job, dp_rank, dp_size, mp_rank, avoid, host)``. Reply: ``Located(job,
    fingerprint, endpoint, dp_size, mp_size, prefetch, standby, local_endpoint)`` naming the rank's
    constructor (its primary, else its standby, avoiding ``avoid``), and its Unix socket when it is
    one of this daemon's own (fabricd.local_ipc); ``ErrorReply(not_ready)`` while the job
    indexes or the constructor starts or moves; ``ErrorReply(unknown_job | bad_request |
    invalid_spec)``; ``ErrorReply(not_ready)`` too while this daemon is not in touch with the
    leader (its role records may be stale: the trainer asks another daemon). A ``host`` is
    remembered and passed on to the leader in heartbeats."""
    job = daemon.job_or_error(msg.job)
    if isinstance(job, protocol.ErrorReply):
        return job
    if (refused := daemon.out_of_touch(f"job {msg.job}")) is not None:
        return refused
    topo = job.spec.topology
    if msg.host and msg.dp_size == topo.dp_size and msg.dp_rank < topo.dp_size and msg.mp_rank < topo.mp_size:
        daemon.declared_hosts[(msg.job, msg.dp_rank, msg.mp_rank)] = (msg.host, int(time.time() * 1000))
    found = job.locate(msg)
    # a constructor of this daemon also serves on a Unix socket (fabricd.local_ipc)
    local = local_ipc.local_endpoint(daemon.stream_ipc_dir, found.endpoint) \
        if isinstance(found, protocol.Located) else None
    return msgspec.structs.replace(found, local_endpoint=local) if local else found
