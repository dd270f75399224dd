"""The checkpoint log's files: their names, the frame format, segment scanning, durable writes.

A frame is a 4-byte big-endian payload length, the 4-byte big-endian ``zlib.crc32`` of the
payload, and the payload. A segment file (``segment-<first seq, 20 digits>.log``) is a run of
record frames with consecutive seqs; a snapshot file (``snapshot-<seq, 20 digits>.snap``) is one
frame. This module encodes frames, decodes a segment's bytes into records, tells a torn tail
(damage with nothing valid after it) from damage followed by valid records, finds a record's
offset through a sparse index, and writes and fsyncs files. It raises nothing of its own:
:class:`~fabricd.cluster.log.CheckpointLog` decides what a damaged frame or an ``OSError`` means.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from fabricd.cluster.state import Record, StateError

__all__ = [
    "HEADER",
    "INDEX_STRIDE",
    "MAX_FRAME",
    "SEGMENT_PREFIX",
    "SEGMENT_SUFFIX",
    "SNAPSHOT_PREFIX",
    "SNAPSHOT_SUFFIX",
    "Segment",
    "encode_frame",
    "encode_record",
    "frame_at",
    "fsync_dir",
    "scan",
    "segment_files",
    "segment_path",
    "snapshot_files",
    "snapshot_path",
    "valid_frame_after",
    "write_all",
]

HEADER = struct.Struct(">II")
MAX_FRAME = 256 << 20
INDEX_STRIDE = 64  # one remembered file offset per this many records
SEGMENT_PREFIX, SEGMENT_SUFFIX = "segment-", ".log"
SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = "snapshot-", ".snap"


def segment_path(directory: Path, first_seq: int) -> Path:
    """The segment file whose first record is ``first_seq``."""
    return directory / f"{SEGMENT_PREFIX}{first_seq:020d}{SEGMENT_SUFFIX}"


def snapshot_path(directory: Path, seq: int) -> Path:
    """The snapshot file of the state after record ``seq``."""
    return directory / f"{SNAPSHOT_PREFIX}{seq:020d}{SNAPSHOT_SUFFIX}"


def segment_files(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of the segment files in ``directory``, in order."""
    return _numbered_files(directory, SEGMENT_PREFIX, SEGMENT_SUFFIX)


def snapshot_files(directory: Path) -> list[tuple[int, Path]]:
    """(seq, path) of the snapshot files in ``directory``, in order."""
    return _numbered_files(directory, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX)


def _numbered_files(directory: Path, prefix: str, suffix: str) -> list[tuple[int, Path]]:
    """(number, path) of the files named ``<prefix><digits><suffix>``, in order."""
    out = []
    for p in directory.iterdir():
        digits = p.name[len(prefix):-len(suffix)]
        if p.name.startswith(prefix) and p.name.endswith(suffix) and digits.isdigit():
            out.append((int(digits), p))
    return sorted(out)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, buf: bytes) -> None:
    """Write all of ``buf`` to ``fd``, however many ``os.write`` calls it takes."""
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def encode_frame(payload: bytes) -> bytes:
    """One frame: length, CRC32, payload."""
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode_record(rec: Record) -> bytes:
    """One frame holding ``rec`` as compact JSON with sorted keys (equal records, equal bytes)."""
    return encode_frame(json.dumps(rec.to_dict(), separators=(",", ":"), sort_keys=True).encode())


@dataclass
class Segment:
    """One segment file: the seqs it holds, its valid size, and a sparse index of record offsets."""

    path: Path
    first_seq: int
    last_seq: int  # first_seq - 1 while empty
    size: int
    # file offset of record first_seq + k * INDEX_STRIDE at index k
    index: array = field(default_factory=lambda: array("Q"))

    def note(self, seq: int, offset: int) -> None:
        """Record that record ``seq`` starts at ``offset`` (kept for every ``INDEX_STRIDE``-th seq)."""
        if (seq - self.first_seq) % INDEX_STRIDE == 0:
            self.index.append(offset)

    def offset_of(self, seq: int) -> int:
        """File offset of record ``seq`` in this segment (its size if ``seq`` is one past its end)."""
        if seq > self.last_seq:
            return self.size
        k = (seq - self.first_seq) // INDEX_STRIDE
        off, cur = self.index[k], self.first_seq + k * INDEX_STRIDE
        with open(self.path, "rb") as f:
            f.seek(off)
            while cur < seq:
                length, _ = HEADER.unpack(f.read(HEADER.size))
                f.seek(length, os.SEEK_CUR)
                off += HEADER.size + length
                cur += 1
        return off


def frame_at(data: bytes, off: int) -> tuple[Record | None, int, str]:
    """The record framed at ``off`` and where its frame ends, or (None, off, why not)."""
    n = len(data)
    if off < 0 or n - off < HEADER.size:
        return None, off, "short frame header"
    length, crc = HEADER.unpack_from(data, off)
    end = off + HEADER.size + length
    if length > MAX_FRAME or end > n:
        return None, off, f"short frame (length {length}, {n - off - HEADER.size} bytes left)"
    payload = data[off + HEADER.size:end]
    if zlib.crc32(payload) != crc:
        return None, off, "CRC mismatch"
    try:
        return Record.from_dict(json.loads(payload)), end, ""
    except (ValueError, StateError) as e:
        return None, off, f"undecodable record with a valid CRC ({e})"


def scan(data: bytes) -> tuple[list[tuple[int, Record]], int, str | None]:
    """All frames: (offset, record) pairs, the offset where parsing stopped, and why (None: clean)."""
    out: list[tuple[int, Record]] = []
    off = 0
    while off < len(data):
        rec, end, why = frame_at(data, off)
        if rec is None:
            return out, off, why
        out.append((off, rec))
        off = end
    return out, off, None


def valid_frame_after(data: bytes, bad: int) -> int | None:
    """The offset of a valid record frame after the damaged one at ``bad``, if any."""
    if len(data) - bad >= HEADER.size:  # the header may be intact and only the payload damaged
        nxt = bad + HEADER.size + HEADER.unpack_from(data, bad)[0]
        if frame_at(data, nxt)[0] is not None:
            return nxt
    pos = data.find(b'{"', bad + HEADER.size + 1)  # every record payload starts so
    while pos != -1:
        if frame_at(data, pos - HEADER.size)[0] is not None:
            return pos - HEADER.size
        pos = data.find(b'{"', pos + 1)
    return None
