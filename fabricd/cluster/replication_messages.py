"""The messages of log replication (leader <-> shadows).

Frozen dataclasses with typed, range-bounded fields, except a snapshot chunk's ``data`` (bytes),
which the wire carries in a payload frame. :mod:`fabricd.cluster.wire` decodes them field by field
(msgspec), so a malformed message is a ``ProtocolError``, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Union

import msgspec
from fabric_client.protocol import Name

from fabricd.errors import FabricdError

from .lease_messages import Counter

__all__ = [
    "LogAck",
    "LogAppend",
    "MESSAGE_TYPES",
    "Message",
    "ReplicationError",
    "SnapshotAck",
    "SnapshotChunk",
    "SnapshotRequest",
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

    term: Counter
    leader: Name
    prev_seq: Counter
    records: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=1 << 16)]
    commit_seq: Counter
    prev_term: Counter


@dataclass(frozen=True)
class LogAck:
    """Shadow -> leader.

    ``ok=True``: the shadow holds durably, and matching the leader's log, every record up to
    ``seq``. ``ok=False``: the append was refused (older term, gap or mismatch at ``prev_seq``);
    ``seq`` is then the highest seq at which the shadow's log may still match the leader's (a
    hint to back up to), and ``term`` the shadow's highest term.
    """

    term: Counter
    shadow: Name
    seq: Counter
    ok: bool


@dataclass(frozen=True)
class SnapshotRequest:
    """Shadow -> leader: it cannot continue from its own log; send a snapshot."""

    term: Counter
    shadow: Name


@dataclass(frozen=True)
class SnapshotChunk:
    """Leader -> shadow: bytes ``offset ..`` of the committed state at ``seq``.

    The whole snapshot is ``total`` bytes of :func:`~fabricd.cluster.state.encode_snapshot`
    output whose ``zlib.crc32`` is ``checksum``; ``data`` (at most ``CHUNK_BYTES``) travels in a
    payload frame, not in the message header.
    """

    term: Counter
    leader: Name
    seq: Counter
    commit_seq: Counter
    offset: Counter
    total: Counter
    checksum: Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]  # crc32
    data: bytes


@dataclass(frozen=True)
class SnapshotAck:
    """Shadow -> leader: it holds the first ``received`` bytes of the snapshot at ``seq``.

    ``received`` going down means the shadow restarted the transfer (a bad checksum, a newer
    transfer in between): the leader resends from there. Once installed, a ``LogAck`` follows.
    """

    term: Counter
    shadow: Name
    seq: Counter
    received: Counter


Message = Union[LogAppend, LogAck, SnapshotRequest, SnapshotChunk, SnapshotAck]
MESSAGE_TYPES: dict[str, type] = {"log_append": LogAppend, "log_ack": LogAck,
                                  "snapshot_request": SnapshotRequest, "snapshot_chunk": SnapshotChunk,
                                  "snapshot_ack": SnapshotAck}
