"""Cluster messages on the wire: typed records inside the protocol's ``PeerMessage`` envelope.

The lease, replication and membership modules define their messages as frozen dataclasses with
typed (and, where it matters, range-bounded) fields; this module maps them to
``PeerMessage(sender, kind, body)`` and back. ``body`` travels as raw JSON and is decoded here
straight into the record of ``kind``, checked field by field (msgspec), so a malformed peer
message is a ``ProtocolError`` (dropped and counted) and never reaches the state machines.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fabric_client import protocol
from fabric_client.errors import ProtocolError

from . import replication
from .lease import LeaseAck, LeaseRenew, VoteReply, VoteRequest
from .membership import MemberBeat

__all__ = ["PEER_KINDS", "to_peer", "from_peer"]

PEER_KINDS: dict[str, type] = {
    "vote_request": VoteRequest,
    "vote_reply": VoteReply,
    "lease_renew": LeaseRenew,
    "lease_ack": LeaseAck,
    "member_beat": MemberBeat,
    **replication.MESSAGE_TYPES,
}
_KIND_OF = {cls: kind for kind, cls in PEER_KINDS.items()}
_DECODERS = {kind: msgspec.json.Decoder(cls) for kind, cls in PEER_KINDS.items()
             if cls not in replication.MESSAGE_TYPES.values()}
_ENCODER = msgspec.json.Encoder()


def to_peer(sender: str, msg: Any) -> protocol.PeerMessage:
    """Wrap a cluster message for the wire."""
    kind = _KIND_OF[type(msg)]
    if kind in _DECODERS:
        body = _ENCODER.encode(msg)
    else:
        body = _ENCODER.encode(replication.message_to_dict(msg))
    return protocol.PeerMessage(sender=sender, kind=kind, body=msgspec.Raw(body))


def from_peer(envelope: protocol.PeerMessage) -> Any:
    """The typed cluster message inside ``envelope``; ProtocolError if it is not one."""
    kind = envelope.kind
    if kind not in PEER_KINDS:
        raise ProtocolError(protocol.ErrorCode.UNKNOWN_TYPE, f"unknown peer message kind {kind!r:.80}")
    try:
        decoder = _DECODERS.get(kind)
        if decoder is not None:
            return decoder.decode(envelope.body)
        return replication.message_from_dict({**msgspec.json.decode(envelope.body, type=dict[str, Any]),
                                              "type": kind})
    except (msgspec.MsgspecError, RecursionError, ValueError, TypeError) as e:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{kind}: {str(e)[:200]}") from None
    except replication.ReplicationError as e:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, str(e)[:300]) from e
