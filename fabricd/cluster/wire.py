"""Cluster messages on the wire: typed records inside the protocol's ``PeerMessage`` envelope.

The lease, replication and membership modules define their messages as frozen dataclasses with
JSON-typed fields; this module maps them to ``PeerMessage(sender, kind, body)`` and back,
checking every field's type, so a malformed peer message is a ``ProtocolError`` (dropped and
counted) and never reaches the state machines. A field typed ``bytes`` (a snapshot chunk's
``data``) travels as a payload frame after the header, in field order, never inside the JSON.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

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
_SCALARS = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}


_HINTS: dict[type, dict[str, Any]] = {cls: typing.get_type_hints(cls) for cls in PEER_KINDS.values()}
_PAYLOAD_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if _HINTS[cls][f.name] is bytes) for cls in PEER_KINDS.values()
}


def to_peer(sender: str, msg: Any) -> tuple[protocol.PeerMessage, list[bytes]]:
    """Wrap a cluster message for the wire: the envelope and its payload frames (often none);
    send them as ``protocol.encode(envelope, payload)``."""
    carried = _PAYLOAD_FIELDS[type(msg)]
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name not in carried}
    return (protocol.PeerMessage(sender=sender, kind=_KIND_OF[type(msg)], body=body),
            [getattr(msg, name) for name in carried])


def from_peer(envelope: protocol.PeerMessage, payload: Sequence[Any] = ()) -> Any:
    """The typed cluster message inside ``envelope`` and its ``payload`` frames (bytes or
    ``zmq.Frame``); ProtocolError if it is not one."""
    cls = PEER_KINDS.get(envelope.kind)
    if cls is None:
        raise ProtocolError(protocol.ErrorCode.UNKNOWN_TYPE, f"unknown peer message kind {envelope.kind!r}")
    carried = _PAYLOAD_FIELDS[cls]
    if len(payload) != len(carried):
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{envelope.kind}: {len(payload)} payload frames, "
                                                          f"expected {len(carried)} ({', '.join(carried) or 'none'})")
    if set(carried) & set(envelope.body):
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{envelope.kind}: {sorted(carried)} belong in payload "
                                                          f"frames, not the header")
    frames = {name: bytes(f.bytes if hasattr(f, "bytes") else f) for name, f in zip(carried, payload)}
    if cls in replication.MESSAGE_TYPES.values():
        try:
            return replication.message_from_dict({"type": envelope.kind, **envelope.body, **frames})
        except replication.ReplicationError as e:
            raise ProtocolError(protocol.ErrorCode.MALFORMED, str(e)) from e
    hints = _HINTS[cls]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(envelope.body) != names:
        raise ProtocolError(protocol.ErrorCode.MALFORMED,
                            f"{envelope.kind}: fields {sorted(envelope.body)}, expected {sorted(names)}")
    for name in names:
        value, tp = envelope.body[name], hints[name]
        tp = typing.get_origin(tp) or tp
        if not isinstance(value, _SCALARS.get(tp, (object,))) or (tp in (int, float) and isinstance(value, bool)):
            raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{envelope.kind}.{name} = {value!r:.80} is not {tp}")
    return cls(**envelope.body)
