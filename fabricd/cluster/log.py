"""The checkpoint log: a durable, append-only record log with periodic snapshots.

On disk, one directory holds

- ``segment-<first seq, 20 digits>.log``: records ``first seq, first seq + 1, ...`` as frames;
- ``snapshot-<seq, 20 digits>.snap``: one frame holding ``FabricState.to_snapshot()`` at ``seq``.

A frame is a 4-byte big-endian payload length, the 4-byte big-endian ``zlib.crc32`` of the
payload, and the payload: the compact JSON of the record (sorted keys, so replicas that hold the
same records hold the same bytes).

Promises:

- ``append`` returns only once its records are written and fsync'd (unless ``fsync=False``); it
  writes O(size of the records), whatever the size of the state.
- A crash at any instant loses at most the records of an ``append`` that had not returned. A torn
  or corrupt *tail* (the end of the last segment) is cut off at ``open`` with a WARNING; damage
  *followed by valid records* is never silently skipped: ``open`` raises :class:`LogError`
  naming the file and offset.
- A snapshot is written to a temporary file, fsync'd, renamed, and the directory fsync'd; a crash
  at any point leaves the previous snapshot usable. Segments wholly covered by a snapshot are
  then deleted.
- Disk full (ENOSPC / EDQUOT) raises :class:`LogFull` and leaves the log as it was, so the leader
  can step down rather than run unlogged.

Compaction must only cover *committed* records (``state.last_seq <= commit seq``): records past
the commit point may still be truncated by a new leader, and a snapshot cannot be truncated.
:meth:`CheckpointLog.compact_upto` builds such a state from disk whatever the in-memory state is.

Not thread-safe: one owner calls it.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fabricd.cluster.log_files import (
    HEADER,
    INDEX_STRIDE,
    MAX_FRAME,  # noqa: F401 (importable from here too)
    SNAPSHOT_PREFIX,
    SNAPSHOT_SUFFIX,
    Segment,
    encode_frame,
    encode_record,
    fsync_dir,
    scan,
    segment_files,
    segment_path,
    snapshot_files,
    snapshot_path,
    valid_frame_after,
    write_all,
)
from fabricd.cluster.state import FabricState, Record, StateError, encode_snapshot
from fabricd.errors import FabricdError
from fabricd.failpoints import FailpointHit, failpoint

__all__ = ["CheckpointLog", "Compacted", "LogError", "LogFull", "encode_frame"]

log = logging.getLogger(__name__)

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: The most recent records are kept in memory (at most this many, and at most RECENT_BYTES of
#: them as written), so a leader streaming them to many shadows reads and parses no file.
RECENT_RECORDS = 65536
RECENT_BYTES = 8 << 20


class LogError(FabricdError):
    """The log cannot be read or written as promised (corruption, I/O error, misuse)."""


class LogFull(LogError):
    """The disk is full (ENOSPC / EDQUOT): the leader must step down rather than run unlogged."""


class Compacted(LogError):
    """Records from ``from_seq`` were compacted into a snapshot; the oldest left is ``first_seq``."""

    def __init__(self, from_seq: int, first_seq: int) -> None:
        self.from_seq = from_seq
        self.first_seq = first_seq
        super().__init__(f"records from seq {from_seq} were compacted; the first record kept is seq {first_seq}")


def _os_error(e: OSError, what: str) -> LogError:
    if e.errno in _FULL_ERRNOS:
        return LogFull(f"{what}: disk full ({os.strerror(e.errno)})")
    return LogError(f"{what}: {e}")


class CheckpointLog:
    """Append-only, CRC-checked, fsync'd records in segment files + periodic snapshot."""

    def __init__(self, directory: Path, *, fsync: bool = True, segment_bytes: int = 16 << 20) -> None:
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes = {segment_bytes!r} must be >= 1")
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._segments: list[Segment] = []
        self._fd: int | None = None  # append fd of self._segments[-1]
        self._snap_term = 0
        self._snap_seq = 0
        self._last_term = 0
        self._last_seq = 0
        self._opened = False
        self._broken: str | None = None
        self._recent: deque[Record] = deque()  # consecutive seqs ending at _last_seq
        self._recent_sizes: deque[int] = deque()  # their sizes as written
        self._recent_bytes = 0

    # -- opening --------------------------------------------------------------------------

    def open(self) -> FabricState:
        """Load the newest valid snapshot, replay the records after it, and get ready to append."""
        if self._opened:
            raise LogError(f"{self.directory}: log is already open")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            state = self._load_newest_snapshot()
            self._snap_term, self._snap_seq = state.last_term, state.last_seq
            self._last_term, self._last_seq = state.last_term, state.last_seq
            self._segments = []
            self._forget_recent()
            paths = segment_files(self.directory)
            for i, (first, path) in enumerate(paths):
                if not self._load_segment(first, path, state, last=(i == len(paths) - 1)):
                    for _, later in paths[i + 1:]:
                        later.unlink()
                    break
            self._drop_covered_segments()
            if self._segments:
                self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            self._close_fd()
            raise _os_error(e, f"{self.directory}: open") from e
        except LogError:
            self._close_fd()
            raise
        self._opened = True
        self._broken = None
        log.info("log %s opened: snapshot at seq %d, records %d..%d, last term %d", self.directory,
                 self._snap_seq, self.first_seq, self._last_seq, self._last_term)
        return state

    def _load_newest_snapshot(self) -> FabricState:
        for seq, path in reversed(snapshot_files(self.directory)):
            try:
                return self._read_snapshot(path, seq)
            except LogError as e:
                log.warning("log %s: ignoring unusable snapshot: %s", self.directory, e)
        return FabricState()

    @staticmethod
    def _snapshot_file_payload(path: Path) -> bytes:
        data = path.read_bytes()
        if len(data) < HEADER.size:
            raise LogError(f"{path}: short snapshot ({len(data)} bytes)")
        length, crc = HEADER.unpack_from(data, 0)
        payload = data[HEADER.size:]
        if length != len(payload) or zlib.crc32(payload) != crc:
            raise LogError(f"{path}: snapshot length or CRC mismatch")
        return payload

    def _read_snapshot(self, path: Path, seq: int) -> FabricState:
        payload = self._snapshot_file_payload(path)
        try:
            state = FabricState.from_snapshot(json.loads(payload))
        except (ValueError, StateError) as e:
            raise LogError(f"{path}: {e}") from e
        if state.last_seq != seq:
            raise LogError(f"{path}: holds seq {state.last_seq}, its name says {seq}")
        return state

    def _load_segment(self, first: int, path: Path, state: FabricState, *, last: bool) -> bool:
        """Scan one segment and replay its records past the snapshot into ``state``.

        Returns False if the segment disagrees with the snapshot about the term of the
        snapshot's last record: it and everything after are then a divergent tail (a shadow
        crashed while installing a leader's snapshot) and are cut off.
        """
        if self._segments and self._segments[-1].last_seq + 1 != first:
            raise LogError(f"{path}: starts at seq {first} but the previous segment ends at "
                           f"seq {self._segments[-1].last_seq}")
        if not self._segments and first > self._snap_seq + 1:
            raise LogError(f"{path}: starts at seq {first}, records {self._snap_seq + 1}..{first - 1} are missing")
        data = path.read_bytes()
        records, stop, why = scan(data)
        if why is not None:
            later = valid_frame_after(data, stop)
            if later is not None or not last:
                raise LogError(f"{path}: corrupt frame at offset {stop} ({why}) followed by valid records"
                               + (f" at offset {later}" if later is not None else " in later segments"))
            log.warning("log %s: torn tail at offset %d (%s): truncating %d bytes", path, stop, why,
                        len(data) - stop)
        seg = Segment(path, first, first - 1, stop)
        keep = True
        for off, rec in records:
            if rec.seq != seg.last_seq + 1:
                raise LogError(f"{path}: offset {off}: record seq {rec.seq}, expected {seg.last_seq + 1}")
            if rec.seq == self._snap_seq and rec.term != self._snap_term:
                log.warning("log %s: record seq %d has term %d but the snapshot says term %d: dropping it "
                            "and every later record", path, rec.seq, rec.term, self._snap_term)
                seg.size, keep = off, False
                break
            seg.note(rec.seq, off)
            seg.last_seq = rec.seq
            if rec.seq <= state.last_seq:
                continue  # covered by the snapshot
            try:
                state.apply(rec)
            except StateError as e:
                raise LogError(f"{path}: offset {off}: {e}") from e
            self._last_term, self._last_seq = rec.term, rec.seq
        if seg.size < len(data):
            self._cut_file(path, seg.size)
        self._segments.append(seg)
        return keep

    def _cut_file(self, path: Path, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _drop_covered_segments(self) -> None:
        """Delete segments whose records are all covered by the snapshot."""
        dropped = False
        while self._segments and self._segments[0].last_seq <= self._snap_seq:
            seg = self._segments.pop(0)
            if not self._segments:
                self._close_fd()
            seg.path.unlink(missing_ok=True)
            dropped = True
        if dropped and self.fsync:
            fsync_dir(self.directory)

    # -- positions ------------------------------------------------------------------------

    @property
    def last_position(self) -> tuple[int, int]:
        """(term, seq) of the last record, or of the snapshot if no record follows it."""
        return self._last_term, self._last_seq

    @property
    def first_seq(self) -> int:
        """The first seq still available to :meth:`read` (after compaction)."""
        for seg in self._segments:
            if seg.last_seq >= seg.first_seq:
                return seg.first_seq
        return self._last_seq + 1

    @property
    def snapshot_position(self) -> tuple[int, int]:
        """(term, seq) of the newest snapshot ((0, 0) if none)."""
        return self._snap_term, self._snap_seq

    def term_at(self, seq: int) -> int | None:
        """The term of record ``seq`` (0 for seq 0, None past the end); Compacted if not kept."""
        if seq == 0:
            return 0
        if seq == self._snap_seq:
            return self._snap_term
        if seq > self._last_seq:
            return None
        return self.read(seq, 1)[0].term

    # -- appending ------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> None:
        """Write ``records`` (contiguous seqs after ``last_position``) durably, then return."""
        self._check_writable()
        if not records:
            return
        expect, term = self._last_seq + 1, self._last_term
        for rec in records:
            if rec.seq != expect:
                raise LogError(f"{self.directory}: append seq {rec.seq}, expected {expect}")
            if rec.term < term:
                raise LogError(f"{self.directory}: append seq {rec.seq} with term {rec.term} < {term}")
            expect, term = expect + 1, rec.term
        frames = [encode_record(r) for r in records]
        buf = b"".join(frames)
        seg = self._segments[-1] if self._segments else None
        if seg is None or (seg.size > 0 and seg.size + len(buf) > self.segment_bytes):
            seg = self._roll(records[0].seq)
        fd = self._fd
        if fd is None:
            raise LogError(f"{self.directory}: no segment open for appending")
        try:
            write_all(fd, buf)
        except OSError as e:
            self._undo_write(fd, seg, e)
            raise _os_error(e, f"{seg.path}: append") from e
        self._failpoint("log.after_write_before_fsync")
        if self.fsync:
            try:
                os.fsync(fd)
            except OSError as e:
                # After a failed fsync nothing is known about what reached the disk.
                self._broken = f"fsync failed: {e}"
                raise _os_error(e, f"{seg.path}: fsync") from e
        self._failpoint("log.after_fsync")
        off = seg.size
        for rec, frame in zip(records, frames):
            seg.note(rec.seq, off)
            off += len(frame)
        seg.size = off
        seg.last_seq = records[-1].seq
        self._last_term, self._last_seq = records[-1].term, records[-1].seq
        self._remember(records, [len(f) for f in frames])

    def _remember(self, records: Sequence[Record], sizes: list[int]) -> None:
        if self._recent and self._recent[-1].seq != records[0].seq - 1:
            self._forget_recent()
        self._recent.extend(records)
        self._recent_sizes.extend(sizes)
        self._recent_bytes += sum(sizes)
        while self._recent and (len(self._recent) > RECENT_RECORDS or self._recent_bytes > RECENT_BYTES):
            self._recent.popleft()
            self._recent_bytes -= self._recent_sizes.popleft()

    def _forget_recent(self) -> None:
        self._recent.clear()
        self._recent_sizes.clear()
        self._recent_bytes = 0

    def _failpoint(self, name: str) -> None:
        try:
            failpoint(name)
        except FailpointHit:
            self._broken = f"failpoint {name} hit"  # as after a crash: reopen to continue
            raise

    def _check_writable(self) -> None:
        if not self._opened:
            raise LogError(f"{self.directory}: log is not open")
        if self._broken is not None:
            raise LogError(f"{self.directory}: log is unusable until reopened ({self._broken})")

    def _undo_write(self, fd: int, seg: Segment, e: OSError) -> None:
        try:
            os.ftruncate(fd, seg.size)
        except OSError as e2:
            self._broken = f"write failed ({e}) and could not be undone ({e2})"

    def _roll(self, first_seq: int) -> Segment:
        path = segment_path(self.directory, first_seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as e:
            raise _os_error(e, f"{path}: create segment") from e
        try:
            if self.fsync:
                fsync_dir(self.directory)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise _os_error(e, f"{self.directory}: fsync") from e
        self._close_fd()
        self._fd = fd
        seg = Segment(path, first_seq, first_seq - 1, 0)
        self._segments.append(seg)
        return seg

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading --------------------------------------------------------------------------

    def read(self, from_seq: int, limit: int = 1000) -> list[Record]:
        """Up to ``limit`` records from ``from_seq`` on; [] past the end; Compacted below first_seq."""
        if from_seq < 1 or from_seq < self.first_seq:
            raise Compacted(from_seq, self.first_seq)
        out: list[Record] = []
        if from_seq > self._last_seq or limit <= 0:
            return out
        recent = self._recent
        if recent and recent[0].seq <= from_seq:
            # deque indexing walks from the nearer end: reads near the tail (the usual) stay cheap
            start = from_seq - recent[0].seq
            return [recent[i] for i in range(start, min(len(recent), start + limit))]
        i = bisect.bisect_right([s.first_seq for s in self._segments], from_seq) - 1
        seq = from_seq
        while i < len(self._segments) and len(out) < limit and seq <= self._last_seq:
            seg = self._segments[i]
            if seg.last_seq >= seq:
                out.extend(self._read_segment(seg, seq, limit - len(out)))
                seq = out[-1].seq + 1
            i += 1
        return out

    def _read_segment(self, seg: Segment, from_seq: int, limit: int) -> list[Record]:
        k = (from_seq - seg.first_seq) // INDEX_STRIDE
        off, seq = seg.index[k], seg.first_seq + k * INDEX_STRIDE
        out: list[Record] = []
        try:
            with open(seg.path, "rb") as f:
                f.seek(off)
                while seq <= seg.last_seq and len(out) < limit and off < seg.size:
                    header = f.read(HEADER.size)
                    length, crc = HEADER.unpack(header)
                    if seq < from_seq:
                        f.seek(length, os.SEEK_CUR)
                    else:
                        payload = f.read(length)
                        if zlib.crc32(payload) != crc:
                            raise LogError(f"{seg.path}: CRC mismatch at offset {off} (seq {seq})")
                        out.append(Record.from_dict(json.loads(payload)))
                    off += HEADER.size + length
                    seq += 1
        except OSError as e:
            raise _os_error(e, f"{seg.path}: read") from e
        except (struct.error, ValueError, StateError) as e:
            raise LogError(f"{seg.path}: unreadable frame at offset {off}: {e}") from e
        return out

    def state_at(self, seq: int) -> FabricState:
        """The state after record ``seq``, rebuilt from the snapshot and the records (O(state + records))."""
        if seq < self._snap_seq or seq > self._last_seq:
            raise LogError(f"{self.directory}: state at seq {seq} is outside {self._snap_seq}..{self._last_seq}")
        state = self.load_snapshot_state()
        while state.last_seq < seq:
            batch = self.read(state.last_seq + 1, min(1000, seq - state.last_seq))
            for rec in batch:
                try:
                    state.apply(rec)
                except StateError as e:
                    raise LogError(f"{self.directory}: replaying seq {rec.seq}: {e}") from e
        return state

    def load_snapshot(self) -> dict[str, Any] | None:
        """The newest snapshot as written (a ``FabricState.to_snapshot()`` dict), or None."""
        if self._snap_seq == 0:
            return None
        return self.load_snapshot_state().to_snapshot()

    def snapshot_payload(self) -> bytes:
        """The newest snapshot's bytes as stored (:func:`~fabricd.cluster.state.encode_snapshot` of
        the state at ``snapshot_position``; of the empty state if there is none), CRC-checked but
        not parsed: what the leader streams to a shadow that needs a snapshot."""
        if self._snap_seq == 0:
            return encode_snapshot(FabricState().to_snapshot())
        path = snapshot_path(self.directory, self._snap_seq)
        try:
            return self._snapshot_file_payload(path)
        except OSError as e:
            raise _os_error(e, f"{path}: read snapshot") from e

    def load_snapshot_state(self) -> FabricState:
        """The state stored in the newest snapshot (empty if none)."""
        if self._snap_seq == 0:
            return FabricState()
        path = snapshot_path(self.directory, self._snap_seq)
        try:
            return self._read_snapshot(path, self._snap_seq)
        except OSError as e:
            raise _os_error(e, f"{path}: read snapshot") from e

    # -- snapshots, truncation ------------------------------------------------------------

    def compact(self, state: FabricState) -> None:
        """Snapshot ``state`` (at ``state.last_seq``, which must be committed and durable here),
        then drop the segments it wholly covers."""
        self._check_writable()
        seq = state.last_seq
        if seq <= self._snap_seq:
            return
        if seq > self._last_seq:
            raise LogError(f"{self.directory}: cannot snapshot seq {seq} past the last record {self._last_seq}")
        self._write_snapshot(state.to_snapshot(), seq)
        self._snap_term, self._snap_seq = state.last_term, seq
        self._remove_snapshots_except(seq)
        self._drop_covered_segments()
        log.info("log %s: compacted through seq %d; records kept from seq %d", self.directory, seq, self.first_seq)

    def compact_upto(self, seq: int) -> None:
        """Snapshot the state at ``seq`` (e.g. the commit seq), rebuilt from disk."""
        if seq > self._snap_seq:
            self.compact(self.state_at(seq))

    def _write_snapshot(self, snapshot: dict[str, Any], seq: int) -> None:
        final = snapshot_path(self.directory, seq)
        tmp = final.with_name(final.name + ".tmp")
        frame = encode_frame(encode_snapshot(snapshot))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, frame)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            failpoint("log.snapshot_before_rename")
            os.rename(tmp, final)
            if self.fsync:
                fsync_dir(self.directory)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _os_error(e, f"{final}: write snapshot") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _remove_snapshots_except(self, keep: int) -> None:
        for s, p in snapshot_files(self.directory):
            if s != keep:
                p.unlink(missing_ok=True)
        for p in self.directory.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}.tmp"):
            p.unlink(missing_ok=True)

    def truncate_after(self, seq: int) -> None:
        """Drop every record after ``seq`` (durably). ``seq`` may not be below the snapshot.

        The state returned by :meth:`open` no longer matches; rebuild it with :meth:`state_at`.
        """
        self._check_writable()
        if seq >= self._last_seq:
            return
        if seq < self._snap_seq:
            raise LogError(f"{self.directory}: cannot truncate after seq {seq}: the snapshot covers "
                           f"seq {self._snap_seq}")
        new_term = self.term_at(seq) or 0
        try:
            while self._segments and self._segments[-1].first_seq > seq:
                seg = self._segments.pop()
                self._close_fd()
                seg.path.unlink()
            if self._segments:
                seg = self._segments[-1]
                cut = seg.offset_of(seq + 1)
                self._cut_file(seg.path, cut)
                seg.size, seg.last_seq = cut, seq
                del seg.index[(seq - seg.first_seq) // INDEX_STRIDE + 1:]
                if self._fd is None:
                    self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
            if self.fsync:
                fsync_dir(self.directory)
        except OSError as e:
            self._broken = f"truncate failed: {e}"
            raise _os_error(e, f"{self.directory}: truncate after seq {seq}") from e
        while self._recent and self._recent[-1].seq > seq:
            self._recent.pop()
            self._recent_bytes -= self._recent_sizes.pop()
        log.warning("log %s: truncated records %d..%d", self.directory, seq + 1, self._last_seq)
        self._last_term, self._last_seq = new_term, seq

    def install_snapshot(self, snapshot: dict[str, Any]) -> FabricState:
        """Replace everything with the leader's snapshot: persist it atomically, drop all segments."""
        self._check_writable()
        try:
            state = FabricState.from_snapshot(snapshot)
        except StateError as e:
            raise LogError(f"{self.directory}: refusing snapshot: {e}") from e
        self._write_snapshot(state.to_snapshot(), state.last_seq)
        self._remove_snapshots_except(state.last_seq)
        self._close_fd()
        try:
            for seg in self._segments:
                seg.path.unlink(missing_ok=True)
            if self.fsync:
                fsync_dir(self.directory)
        except OSError as e:
            self._broken = f"dropping segments failed: {e}"
            raise _os_error(e, f"{self.directory}: install snapshot") from e
        self._segments = []
        self._forget_recent()
        self._snap_term, self._snap_seq = state.last_term, state.last_seq
        self._last_term, self._last_seq = state.last_term, state.last_seq
        log.info("log %s: installed snapshot at seq %d (term %d)", self.directory, state.last_seq, state.last_term)
        return state

    def close(self) -> None:
        """Release the file descriptors. The log may be opened again."""
        self._close_fd()
        self._segments = []
        self._forget_recent()
        self._opened = False
