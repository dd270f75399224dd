"""The checkpoint log: durability, torn tails, corruption, compaction, disk full."""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from pathlib import Path

import pytest

from fabricd.cluster.log import CheckpointLog, Compacted, LogError, LogFull, encode_frame
from fabricd.cluster.state import FabricState, Record
from fabricd.failpoints import FailpointHit, configure

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Leader:
    """Writes valid records the way the leader does: apply, then append."""

    def __init__(self, log: CheckpointLog, state: FabricState, term: int = 1) -> None:
        self.log, self.state, self.term = log, state, term

    def make(self, n: int, job: str = "j") -> list[Record]:
        recs = []
        for _ in range(n):
            seq = self.state.last_seq + 1
            if job not in self.state.jobs:
                rec = Record(self.term, seq, "job_submitted", {"job": job, "spec_toml": "x", "spec_origin": "f",
                                                               "fingerprint": "fp", "dp_size": 8})
            else:
                rec = Record(self.term, seq, "trainer_progress",
                             {"job": job, "dp_rank": seq % 8, "mp_rank": 0, "next_step": seq})
            self.state.apply(rec)
            recs.append(rec)
        return recs

    def write(self, n: int, batch: int = 1, job: str = "j") -> None:
        for _ in range(0, n, batch):
            self.log.append(self.make(batch, job))


def opened(path: Path, **kw) -> tuple[CheckpointLog, FabricState]:
    log = CheckpointLog(path, fsync=kw.pop("fsync", True), **kw)
    return log, log.open()


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("segment-*.log"))


def frame_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        out.append(off)
        off += 8 + struct.unpack_from(">I", data, off)[0]
    return out


@pytest.fixture(autouse=True)
def _no_failpoints():
    configure(None)
    yield
    configure(None)


def test_append_and_reopen_round_trip(tmp_path: Path) -> None:
    log, state = opened(tmp_path)
    assert state == FabricState() and log.last_position == (0, 0) and log.first_seq == 1
    w = Leader(log, state)
    w.write(30, batch=3)
    w.term = 2
    w.write(5)
    written = log.read(1, 100)
    log.close()
    log2, state2 = opened(tmp_path)
    assert state2 == w.state
    assert log2.last_position == (2, 35)
    assert log2.read(1, 100) == written
    assert [r.seq for r in written] == list(range(1, 36))
    assert log2.read(34, 100) == written[33:] and log2.read(36) == [] and log2.read(5, 2) == written[4:6]
    assert log2.term_at(0) == 0 and log2.term_at(30) == 1 and log2.term_at(31) == 2 and log2.term_at(36) is None


def test_append_refuses_out_of_order_records(tmp_path: Path) -> None:
    log, state = opened(tmp_path)
    w = Leader(log, state, term=3)
    w.write(2)
    with pytest.raises(LogError, match="expected 3"):
        log.append([Record(3, 4, "member_seen", {"node": "a", "endpoint": "e"})])
    with pytest.raises(LogError, match="term 2 < 3"):
        log.append([Record(2, 3, "member_seen", {"node": "a", "endpoint": "e"})])


def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    log, state = opened(tmp_path, segment_bytes=600)
    w = Leader(log, state)
    w.write(200, batch=2)
    assert len(segments(tmp_path)) > 10
    every = log.read(1, 1000)
    assert [r.seq for r in every] == list(range(1, 201))
    assert [r.seq for r in log.read(137, 10)] == list(range(137, 147))
    log.close()
    log2, state2 = opened(tmp_path, segment_bytes=600)
    assert state2 == w.state and log2.read(1, 1000) == every


@pytest.mark.parametrize("damage", ["cut_mid_frame", "cut_mid_header", "bad_last_crc", "garbage_tail"])
def test_torn_tail_is_truncated_with_a_warning(tmp_path: Path, caplog, damage: str) -> None:
    log, state = opened(tmp_path)
    w = Leader(log, state)
    w.write(10)
    log.close()
    seg = segments(tmp_path)[-1]
    last = frame_offsets(seg)[-1]
    data = seg.read_bytes()
    if damage == "cut_mid_frame":
        data = data[:-5]
    elif damage == "cut_mid_header":
        data = data[:last + 3]
    elif damage == "bad_last_crc":
        data = data[:last + 4] + bytes([data[last + 4] ^ 0xFF]) + data[last + 5:]
    else:
        data = data + b"\x00\x00\x01\x00" + b"\x07" * 40  # a frame whose bytes never all arrived
        last = len(seg.read_bytes())
    seg.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="fabricd.cluster.log"):
        log2, state2 = opened(tmp_path)
    assert any("torn tail" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    expect = 10 if damage == "garbage_tail" else 9
    assert log2.last_position == (1, expect) and state2.last_seq == expect
    assert seg.stat().st_size == last
    Leader(log2, state2).write(3)
    log2.close()
    log3, state3 = opened(tmp_path)
    assert log3.last_position == (1, expect + 3)
    assert [r.seq for r in log3.read(1, 100)] == list(range(1, expect + 4))


def test_corruption_in_the_middle_is_fatal_and_names_file_and_offset(tmp_path: Path) -> None:
    log, state = opened(tmp_path)
    Leader(log, state).write(10)
    log.close()
    seg = segments(tmp_path)[-1]
    off = frame_offsets(seg)[4]
    data = bytearray(seg.read_bytes())
    data[off + 12] ^= 0x01  # one flipped bit inside record 5's payload
    seg.write_bytes(bytes(data))
    with pytest.raises(LogError) as exc:
        opened(tmp_path)
    assert str(seg) in str(exc.value) and f"offset {off}" in str(exc.value)
    assert len(seg.read_bytes()) == len(data)  # nothing was cut


def test_corruption_with_a_broken_length_in_the_middle_is_still_found(tmp_path: Path) -> None:
    log, state = opened(tmp_path)
    Leader(log, state).write(10)
    log.close()
    seg = segments(tmp_path)[-1]
    off = frame_offsets(seg)[3]
    data = bytearray(seg.read_bytes())
    data[off:off + 4] = b"\xff\xff\xff\x00"
    seg.write_bytes(bytes(data))
    with pytest.raises(LogError, match=f"offset {off}"):
        opened(tmp_path)


def test_corruption_in_an_earlier_segment_is_fatal(tmp_path: Path) -> None:
    log, state = opened(tmp_path, segment_bytes=300)
    Leader(log, state).write(20)
    log.close()
    first = segments(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-3])
    with pytest.raises(LogError, match="later segments"):
        opened(tmp_path, segment_bytes=300)


def test_compaction_keeps_the_state_and_drops_covered_segments(tmp_path: Path) -> None:
    log, state = opened(tmp_path, segment_bytes=500)
    w = Leader(log, state)
    w.write(100, batch=4)
    before = len(segments(tmp_path))
    log.compact(w.state)
    assert log.snapshot_position == (1, 100)
    assert len(segments(tmp_path)) < before
    assert len(list(tmp_path.glob("snapshot-*.snap"))) == 1
    first = log.first_seq
    assert first > 1
    with pytest.raises(Compacted) as exc:
        log.read(first - 1)
    assert (exc.value.from_seq, exc.value.first_seq) == (first - 1, first)
    w.write(20, batch=5)
    assert log.read(101, 100)[0].seq == 101
    log.close()
    log2, state2 = opened(tmp_path, segment_bytes=500)
    assert state2 == w.state and log2.last_position == (1, 120)
    assert log2.load_snapshot() is not None and log2.load_snapshot()["last_seq"] == 100
    with pytest.raises(Compacted):
        log2.read(1)


def test_compact_upto_builds_the_committed_state_from_disk(tmp_path: Path) -> None:
    log, state = opened(tmp_path, segment_bytes=400)
    w = Leader(log, state)
    w.write(40)
    at_25 = log.state_at(25)
    log.compact_upto(25)
    assert log.snapshot_position == (1, 25)
    assert FabricState.from_snapshot(log.load_snapshot()) == at_25
    assert log.state_at(40) == w.state
    log.close()
    assert opened(tmp_path, segment_bytes=400)[1] == w.state


def test_crash_before_snapshot_rename_leaves_the_old_snapshot_usable(tmp_path: Path) -> None:
    log, state = opened(tmp_path, segment_bytes=400)
    w = Leader(log, state)
    w.write(50)
    log.compact(w.state)
    w.write(30)
    configure("log.snapshot_before_rename=raise")
    with pytest.raises(FailpointHit):
        log.compact(w.state)
    configure(None)
    log.close()
    log2, state2 = opened(tmp_path, segment_bytes=400)
    assert log2.snapshot_position == (1, 50)
    assert state2 == w.state and log2.last_position == (1, 80)
    assert log2.read(51, 100)[0].seq == 51
    log2.compact(state2)  # the next compaction succeeds and clears the leftover temp file
    assert [p.name for p in tmp_path.glob("snapshot-*")] == [f"snapshot-{80:020d}.snap"]


def test_corrupt_newest_snapshot_falls_back_to_an_older_one(tmp_path: Path, caplog) -> None:
    log, state = opened(tmp_path, segment_bytes=100_000)
    w = Leader(log, state)
    w.write(20)
    log.compact(w.state)
    snap = tmp_path / f"snapshot-{20:020d}.snap"
    good = snap.read_bytes()
    w.write(10)
    log.close()
    # A later snapshot that is damaged is ignored (with a warning); the records still cover it.
    (tmp_path / f"snapshot-{25:020d}.snap").write_bytes(good[:-4] + b"XXXX")
    with caplog.at_level(logging.WARNING, logger="fabricd.cluster.log"):
        log2, state2 = opened(tmp_path)
    assert state2 == w.state and log2.snapshot_position == (1, 20)
    assert any("unusable snapshot" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_raises_log_full_and_leaves_the_log_intact(tmp_path: Path, monkeypatch, code: int) -> None:
    log, state = opened(tmp_path)
    w = Leader(log, state)
    w.write(5)
    size = segments(tmp_path)[-1].stat().st_size
    real_write = os.write

    def full_after_some_bytes(fd: int, data) -> int:
        if fd == log._fd:
            real_write(fd, bytes(data[:7]))  # a partial write, then the disk is full
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_after_some_bytes)
    recs = w.make(3)
    with pytest.raises(LogFull, match="disk full"):
        log.append(recs)
    monkeypatch.setattr(os, "write", real_write)
    assert log.last_position == (1, 5)
    assert segments(tmp_path)[-1].stat().st_size == size
    log.append(recs)  # space came back: the same records go in cleanly
    log.close()
    assert opened(tmp_path)[1] == w.state


def test_disk_full_when_creating_a_segment_or_snapshot(tmp_path: Path, monkeypatch) -> None:
    log, state = opened(tmp_path, segment_bytes=200)
    w = Leader(log, state)
    w.write(3)
    real_write = os.write

    def full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(LogFull):
        log.compact(w.state)
    assert not list(tmp_path.glob("snapshot-*"))
    monkeypatch.setattr(os, "write", real_write)
    log.compact(w.state)
    assert log.snapshot_position == (1, 3)


def test_append_cost_does_not_grow_with_the_state(tmp_path: Path, monkeypatch) -> None:
    written: list[int] = []
    fsyncs: list[int] = []
    real_write, real_fsync = os.write, os.fsync

    def counting_write(fd: int, data) -> int:
        written.append(len(data))
        return real_write(fd, data)

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    costs = []
    for n_jobs in (1, 2000):
        log, state = opened(tmp_path / str(n_jobs), segment_bytes=1 << 30)
        w = Leader(log, state)
        log.append([r for i in range(n_jobs) for r in w.make(1, job=f"job{i:05d}")])
        monkeypatch.setattr(os, "write", counting_write)
        monkeypatch.setattr(os, "fsync", counting_fsync)
        written.clear()
        fsyncs.clear()
        rec = Record(1, w.state.last_seq + 1, "trainer_progress",
                     {"job": "job00000", "dp_rank": 3, "mp_rank": 0, "next_step": 7})
        w.state.apply(rec)
        log.append([rec])
        monkeypatch.setattr(os, "write", real_write)
        monkeypatch.setattr(os, "fsync", real_fsync)
        frame = encode_frame(json.dumps(rec.to_dict(), separators=(",", ":"), sort_keys=True).encode())
        assert sum(written) == len(frame)  # exactly the record's own frame, nothing about the state
        costs.append((sum(written) - len(str(rec.seq)), len(fsyncs)))
        log.close()
    assert costs[0] == costs[1]
    assert costs[0][1] == 1


def test_truncate_after_drops_the_tail_durably(tmp_path: Path) -> None:
    log, state = opened(tmp_path, segment_bytes=300)
    w = Leader(log, state)
    w.write(30)
    keep = log.read(1, 12)
    log.truncate_after(12)
    assert log.last_position == (1, 12)
    assert log.read(1, 100) == keep
    w2 = Leader(log, log.state_at(12), term=2)
    w2.write(4)
    log.close()
    log2, state2 = opened(tmp_path, segment_bytes=300)
    assert state2 == w2.state and log2.last_position == (2, 16)
    assert [r.term for r in log2.read(1, 100)] == [1] * 12 + [2] * 4
    log2.compact(log2.state_at(14))
    with pytest.raises(LogError, match="snapshot"):
        log2.truncate_after(13)


def test_install_snapshot_replaces_everything(tmp_path: Path) -> None:
    leader_log, leader_state = opened(tmp_path / "leader")
    w = Leader(leader_log, leader_state, term=4)
    w.write(40)
    snap = w.state.to_snapshot()
    shadow_log, shadow_state = opened(tmp_path / "shadow", segment_bytes=300)
    Leader(shadow_log, shadow_state, term=1).write(10)
    got = shadow_log.install_snapshot(snap)
    assert got == w.state and shadow_log.last_position == (4, 40) and shadow_log.first_seq == 41
    assert not segments(tmp_path / "shadow")
    Leader(shadow_log, got, term=4).write(2)
    shadow_log.close()
    log2, state2 = opened(tmp_path / "shadow")
    assert state2.last_seq == 42 and log2.snapshot_position == (4, 40)


def test_crash_during_install_drops_the_divergent_tail(tmp_path: Path, caplog) -> None:
    # A shadow holds 1..10, with 6..10 from an old leader (term 1); the leader's snapshot says
    # seq 8 is term 2. If the shadow died after writing the snapshot but before deleting its
    # segments, open must not replay the divergent 9..10 on top of the snapshot.
    shadow_log, shadow_state = opened(tmp_path / "shadow")
    Leader(shadow_log, shadow_state, term=1).write(10)
    shadow_log.close()
    leader_log, leader_state = opened(tmp_path / "leader")
    lw = Leader(leader_log, leader_state, term=1)
    lw.write(5)
    lw.term = 2
    lw.write(3)
    leader_log.compact(lw.state)
    leader_log.close()
    snap = next((tmp_path / "leader").glob("snapshot-*.snap"))
    (tmp_path / "shadow" / snap.name).write_bytes(snap.read_bytes())
    with caplog.at_level(logging.WARNING, logger="fabricd.cluster.log"):
        log2, state2 = opened(tmp_path / "shadow")
    assert state2 == lw.state and log2.last_position == (2, 8)
    assert any("every later record" in r.getMessage() for r in caplog.records)


def test_failpoint_between_write_and_fsync_needs_a_reopen(tmp_path: Path) -> None:
    log, state = opened(tmp_path)
    w = Leader(log, state)
    w.write(3)
    configure("log.after_write_before_fsync=raise")
    with pytest.raises(FailpointHit):
        log.append(w.make(2))
    configure(None)
    with pytest.raises(LogError, match="reopened"):
        log.append(w.make(1))
    log.close()
    log2, _ = opened(tmp_path)  # the written (unsynced) frames survived this "crash"
    assert log2.last_position == (1, 5)


@pytest.mark.parametrize("cut", [63, 64, 65, 128, 129, 200])
def test_reads_and_truncation_across_index_strides(tmp_path: Path, cut: int) -> None:
    log, state = opened(tmp_path, fsync=False, segment_bytes=9000)
    w = Leader(log, state)
    w.write(260, batch=13)
    every = log.read(1, 1000)
    for start in (1, 63, 64, 65, 127, 128, 129, 200, 260):
        assert log.read(start, 70) == every[start - 1:start + 69]
    log.truncate_after(cut)
    assert log.read(1, 1000) == every[:cut]
    assert log.read(cut, 10) == [every[cut - 1]]
    w2 = Leader(log, log.state_at(cut), term=2)
    w2.write(70, batch=7)
    tail = log.read(cut + 1, 1000)
    assert [r.seq for r in tail] == list(range(cut + 1, cut + 71)) and {r.term for r in tail} == {2}
    log.close()
    log2, state2 = opened(tmp_path, segment_bytes=9000)
    assert state2 == w2.state and log2.read(1, 1000) == every[:cut] + tail
