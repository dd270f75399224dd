"""The messages of log replication (leader <-> shadows) and their JSON-typed dict form.

Frozen dataclasses with JSON-typed fields, except a snapshot chunk's ``data`` (bytes), which
the wire carries in a payload frame (see :mod:`fabricd.cluster.wire`). :func:`message_from_dict`
checks every field's type, so a malformed message is a :class:`ReplicationError`, never a crash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Union

from fabricd.errors import FabricdError

__all__ = [
    "LogAck",
    "LogAppend",
    "MESSAGE_TYPES",
    "Message",
    "ReplicationError",
    "SnapshotAck",
    "SnapshotChunk",
    "SnapshotRequest",
    "message_from_dict",
    "message_to_dict",
]


class ReplicationError(FabricdError):
    """A replication message that cannot be decoded (the transport drops and counts it)."""


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogAppend:
    """Leader -> shadow: records ``prev_seq + 1 ...`` (as ``Record.to_dict()``), or none (heartbeat).

    ``prev_term`` is the term of record ``prev_seq`` in the leader's log (0 for seq 0): the shadow
    accepts only if its own record ``prev_seq`` has that term. ``commit_seq`` is the leader's.
    """

    term: int
    leader: str
    prev_seq: int
    records: list[dict]
    commit_seq: int
    prev_term: int


@dataclass(frozen=True)
class LogAck:
    """Shadow -> leader.

    ``ok=True``: the shadow holds durably, and matching the leader's log, every record up to
    ``seq``. ``ok=False``: the append was refused (older term, gap or mismatch at ``prev_seq``);
    ``seq`` is then the highest seq at which the shadow's log may still match the leader's (a
    hint to back up to), and ``term`` the shadow's highest term.
    """

    term: int
    shadow: str
    seq: int
    ok: bool


@dataclass(frozen=True)
class SnapshotRequest:
    """Shadow -> leader: it cannot continue from its own log; send a snapshot."""

    term: int
    shadow: str


@dataclass(frozen=True)
class SnapshotChunk:
    """Leader -> shadow: bytes ``offset ..`` of the committed state at ``seq``.

    The whole snapshot is ``total`` bytes of :func:`~fabricd.cluster.state.encode_snapshot`
    output whose ``zlib.crc32`` is ``checksum``; ``data`` (at most ``CHUNK_BYTES``) travels in a
    payload frame, not in the message header.
    """

    term: int
    leader: str
    seq: int
    commit_seq: int
    offset: int
    total: int
    checksum: int
    data: bytes


@dataclass(frozen=True)
class SnapshotAck:
    """Shadow -> leader: it holds the first ``received`` bytes of the snapshot at ``seq``.

    ``received`` going down means the shadow restarted the transfer (a bad checksum, a newer
    transfer in between): the leader resends from there. Once installed, a ``LogAck`` follows.
    """

    term: int
    shadow: str
    seq: int
    received: int


Message = Union[LogAppend, LogAck, SnapshotRequest, SnapshotChunk, SnapshotAck]
MESSAGE_TYPES: dict[str, type] = {"log_append": LogAppend, "log_ack": LogAck,
                                  "snapshot_request": SnapshotRequest, "snapshot_chunk": SnapshotChunk,
                                  "snapshot_ack": SnapshotAck}
_TYPE_NAMES = {cls: name for name, cls in MESSAGE_TYPES.items()}
_FIELD_TYPES = {"term": int, "leader": str, "shadow": str, "prev_seq": int, "prev_term": int, "records": list,
                "commit_seq": int, "seq": int, "ok": bool, "offset": int, "total": int, "checksum": int,
                "received": int, "data": bytes}


def message_to_dict(msg: Message) -> dict[str, Any]:
    """A JSON-typed dict with a ``type`` key, for the transport."""
    return {"type": _TYPE_NAMES[type(msg)], **asdict(msg)}


def message_from_dict(d: Any) -> Message:
    """Decode :func:`message_to_dict` output; raises ReplicationError naming what is wrong."""
    if not isinstance(d, dict) or d.get("type") not in MESSAGE_TYPES:
        raise ReplicationError(f"not a replication message: {d!r:.200}")
    cls = MESSAGE_TYPES[d["type"]]
    names = {f.name for f in fields(cls)}
    if set(d) - {"type"} != names:
        raise ReplicationError(f"{d['type']}: expected fields {sorted(names)}, got {sorted(set(d) - {'type'})}")
    for name in names:
        typ, value = _FIELD_TYPES[name], d[name]
        if not isinstance(value, typ) or (typ is int and (isinstance(value, bool) or value < 0)):
            raise ReplicationError(f"{d['type']}: {name} = {value!r:.100} is not a valid {typ.__name__}")
    return cls(**{n: d[n] for n in names})
