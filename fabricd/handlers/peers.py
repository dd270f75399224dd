"""Messages from peer daemons: lease, log replication and heartbeats, in ``PeerMessage``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fabric_client import protocol
from fabric_client.errors import ProtocolError

from ..cluster.wire import from_peer
from . import Reply, handles

if TYPE_CHECKING:
    from ..daemon import Daemon


@handles(protocol.PeerMessage, callers=("peer",))
def peer(daemon: Daemon, _identity: bytes, msg: protocol.PeerMessage, payload: list) -> Reply:
    """Request: ``PeerMessage(sender, kind, body)`` + payload frames (a snapshot chunk's bytes).
    No reply on this socket: what the cluster answers goes to the sender's own control endpoint.
    ``ErrorReply(bad_request)`` for a sender outside the cluster, ``ErrorReply(malformed)`` for a
    body that is not a valid record of ``kind``."""
    if msg.sender not in daemon.peers:
        raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"peer {msg.sender!r} is not in this cluster")
    daemon.send_to_peers(daemon.cluster.on_peer(from_peer(msg, payload), time.monotonic()))
    return None
