"""Snapshots in bounded chunks: encoded once on the leader, reassembled and checked on a shadow.

A snapshot travels as its canonical bytes (:func:`~fabricd.cluster.state.encode_snapshot`, what
the checkpoint log stores) cut into chunks of at most :data:`CHUNK_BYTES`, each carried in a
payload frame of its own message, never in a JSON header. Every chunk names the whole
transfer: ``(term, leader, seq, total, checksum)``, where ``checksum`` is the ``zlib.crc32`` of
all ``total`` bytes.

- :class:`EncodedSnapshot` is one snapshot's bytes and checksum; the leader builds it once per
  snapshot position and cuts every resend from it.
- :class:`SnapshotAssembly` is a shadow's reassembly of one transfer at a time. It takes chunks
  in order only (a chunk past what it holds is refused, and the leader resends from the
  acknowledged offset), so its memory is at most ``total`` <= ``max_bytes`` bytes. A chunk of a
  newer transfer (a higher term, a new leader, a newer snapshot) restarts it cleanly; a chunk of
  an older one is dropped. The checksum of the whole is checked before the bytes are handed out.

Pure: no sockets, no clock. Nothing a peer sends raises; every refusal is a named outcome.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from fabricd.cluster.log_files import MAX_FRAME

__all__ = [
    "CHUNK_BYTES",
    "MAX_SNAPSHOT_BYTES",
    "ChunkOutcome",
    "EncodedSnapshot",
    "SnapshotAssembly",
]

#: Bytes of snapshot per chunk message (the last chunk may be shorter).
CHUNK_BYTES = 256 << 10
#: Largest snapshot a shadow accepts: the log stores a snapshot as one frame of at most this size.
MAX_SNAPSHOT_BYTES = MAX_FRAME
_MAX_CHECKSUM = (1 << 32) - 1


@dataclass(frozen=True)
class EncodedSnapshot:
    """The bytes of the state after record ``seq`` (of term ``term``), and their crc32."""

    seq: int
    term: int
    data: bytes
    checksum: int

    @classmethod
    def of(cls, seq: int, term: int, data: bytes) -> EncodedSnapshot:
        return cls(seq, term, data, zlib.crc32(data))

    @property
    def total(self) -> int:
        return len(self.data)

    def chunk(self, offset: int, chunk_bytes: int = CHUNK_BYTES) -> bytes:
        """The chunk starting at ``offset`` (at most ``chunk_bytes`` bytes)."""
        return self.data[offset:offset + chunk_bytes]


@dataclass(frozen=True)
class ChunkOutcome:
    """What :meth:`SnapshotAssembly.add` made of a chunk.

    ``status``: ``accepted`` (appended; ``received`` grew), ``duplicate`` (already held),
    ``gap`` (starts past ``received``: resend from there), ``stale`` (an older transfer than the
    one in progress), ``invalid`` (offsets or sizes out of bounds; ``reason`` says which),
    ``corrupt`` (complete but the checksum differs: the transfer restarts from 0) or
    ``complete`` (``data`` holds the whole snapshot, checksum verified). ``received`` is the
    count of leading bytes of the current transfer now held (what to acknowledge).
    """

    status: str
    received: int
    data: bytes | None = None
    reason: str = ""


class SnapshotAssembly:
    """A shadow's reassembly of one snapshot transfer at a time, in bounded memory."""

    def __init__(self, *, max_bytes: int = MAX_SNAPSHOT_BYTES, max_chunk: int = CHUNK_BYTES) -> None:
        if max_bytes < 1 or max_chunk < 1:
            raise ValueError(f"max_bytes = {max_bytes!r} and max_chunk = {max_chunk!r} must be >= 1")
        self.max_bytes = max_bytes
        self.max_chunk = max_chunk
        self.key: tuple[int, str, int, int, int] | None = None  # (term, leader, seq, total, checksum)
        self._buf = bytearray()

    @property
    def received(self) -> int:
        """Leading bytes of the current transfer held so far (0 if none is in progress)."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget the transfer in progress (its memory is released)."""
        self.key, self._buf = None, bytearray()

    def add(self, term: int, leader: str, seq: int, total: int, checksum: int, offset: int,
            data: bytes) -> ChunkOutcome:
        """Take one chunk: ``data`` is bytes ``offset ..`` of the ``total``-byte snapshot at ``seq``."""
        why = self._check(total, checksum, offset, data)
        if why:
            return ChunkOutcome("invalid", self.received, reason=why)
        key = (term, leader, seq, total, checksum)
        if key != self.key:
            if self.key is not None and (term, seq) < (self.key[0], self.key[2]):
                return ChunkOutcome("stale", self.received)
            self.key, self._buf = key, bytearray()  # a newer transfer (or the first): start over
        held = len(self._buf)
        if offset + len(data) <= held:
            return ChunkOutcome("duplicate", held)
        if offset > held:
            return ChunkOutcome("gap", held)  # a chunk before it was lost: only in-order chunks are kept
        self._buf += data[held - offset:]
        if len(self._buf) < total:
            return ChunkOutcome("accepted", len(self._buf))
        whole = bytes(self._buf)
        self.reset()
        if zlib.crc32(whole) != checksum:
            return ChunkOutcome("corrupt", 0, reason=f"crc32 {zlib.crc32(whole)} of {total} bytes != {checksum}")
        return ChunkOutcome("complete", total, data=whole)

    def _check(self, total: int, checksum: int, offset: int, data: bytes) -> str:
        if not 1 <= total <= self.max_bytes:
            return f"total = {total} bytes is outside 1..{self.max_bytes}"
        if not 0 <= checksum <= _MAX_CHECKSUM:
            return f"checksum = {checksum} is not a crc32"
        if not data or len(data) > self.max_chunk:
            return f"chunk of {len(data)} bytes is outside 1..{self.max_chunk}"
        if offset < 0 or offset + len(data) > total:
            return f"chunk {offset}..{offset + len(data)} lies outside the snapshot's {total} bytes"
        return ""
