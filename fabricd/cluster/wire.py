"""Cluster messages on the wire: typed records inside the protocol's ``PeerMessage`` envelope.

The lease, replication and membership modules define their messages as frozen dataclasses with
typed (and, where it matters, range-bounded) fields; this module maps them to
``PeerMessage(sender, kind, body)`` and back. ``body`` travels as raw JSON and is decoded here
straight into the record of ``kind``, checked field by field (msgspec), so a malformed peer
message is a ``ProtocolError`` (dropped and counted) and never reaches the state machines. A
field typed ``bytes`` (a snapshot chunk's ``data``) travels as a payload frame after the header,
in field order, never inside the JSON. Fields a newer peer adds are ignored (rolling upgrades);
a field of the wrong type or out of its range is refused.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

import msgspec
from fabric_client import protocol
from fabric_client.errors import ProtocolError

from . import replication
from .lease import LeaseAck, LeaseRelease, LeaseRenew, VoteReply, VoteRequest
from .membership import MemberBeat

__all__ = ["PEER_KINDS", "to_peer", "from_peer"]

PEER_KINDS: dict[str, type] = {
    "vote_request": VoteRequest,
    "vote_reply": VoteReply,
    "lease_renew": LeaseRenew,
    "lease_ack": LeaseAck,
    "lease_release": LeaseRelease,
    "member_beat": MemberBeat,
    **replication.MESSAGE_TYPES,
}
_KIND_OF = {cls: kind for kind, cls in PEER_KINDS.items()}
_DECODERS = {kind: msgspec.json.Decoder(cls) for kind, cls in PEER_KINDS.items()}
_ENCODER = msgspec.json.Encoder()
#: per kind: the fields that travel as payload frames (typed ``bytes``), in field order
_PAYLOAD_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(name for name, tp in typing.get_type_hints(cls).items() if tp is bytes) for cls in PEER_KINDS.values()
}


def to_peer(sender: str, msg: Any) -> tuple[protocol.PeerMessage, list[bytes]]:
    """Wrap a cluster message for the wire: the envelope and its payload frames (often none);
    send them as ``protocol.encode(envelope, payload)``."""
    carried = _PAYLOAD_FIELDS[type(msg)]
    if carried:
        body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name not in carried}
    else:
        body = msg
    envelope = protocol.PeerMessage(sender=sender, kind=_KIND_OF[type(msg)], body=msgspec.Raw(_ENCODER.encode(body)))
    return envelope, [getattr(msg, name) for name in carried]


def from_peer(envelope: protocol.PeerMessage, payload: Sequence[Any] = ()) -> Any:
    """The typed cluster message inside ``envelope`` and its ``payload`` frames (bytes or
    ``zmq.Frame``); ProtocolError if it is not one."""
    kind = envelope.kind
    cls = PEER_KINDS.get(kind)
    if cls is None:
        raise ProtocolError(protocol.ErrorCode.UNKNOWN_TYPE, f"unknown peer message kind {kind!r:.80}")
    carried = _PAYLOAD_FIELDS[cls]
    if len(payload) != len(carried):
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{kind}: {len(payload)} payload frames, "
                                                          f"expected {len(carried)} ({', '.join(carried) or 'none'})")
    try:
        decoder = _DECODERS.get(kind)
        if decoder is not None and not carried:
            return decoder.decode(envelope.body)  # one pass: parse and check every field
        body = msgspec.json.decode(envelope.body, type=dict[str, Any])
        if set(carried) & set(body):
            raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{kind}: {sorted(carried)} belong in payload "
                                                              f"frames, not the header")
        frames = {name: bytes(f.bytes if hasattr(f, "bytes") else f) for name, f in zip(carried, payload)}
        return msgspec.convert({**body, **frames}, cls)
    except (msgspec.MsgspecError, RecursionError, ValueError, TypeError) as e:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{kind}: {str(e)[:200]}") from None
