"""Snapshots stream in bounded chunks carried in payload frames: a state far larger than a message
header reaches a fresh shadow through the real encode → frames → decode path; bad chunks are
refused without a crash; a transfer restarts cleanly when a newer one begins."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from fabric_client import protocol
from fabric_client.errors import ProtocolError
from fabricd.cluster.log import CheckpointLog
from fabricd.cluster.replication import (
    LogAck,
    ReplicationTracker,
    Send,
    ShadowReplica,
    SnapshotAck,
    SnapshotChunk,
    SnapshotRequest,
)
from fabricd.cluster.snapshot_transfer import CHUNK_BYTES, SnapshotAssembly
from fabricd.cluster.state import FabricState, Record, encode_snapshot
from fabricd.cluster.wire import from_peer, to_peer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def big_state(dp_size: int = 8192, mp_size: int = 8, term: int = 1) -> FabricState:
    """A job whose every trainer rank declared its host: a snapshot of ~2.5 MiB."""
    st = FabricState()

    def add(kind: str, data: dict) -> None:
        st.apply(Record(term, st.last_seq + 1, kind, data))

    add("job_submitted", {"job": "j", "spec_toml": "t", "spec_origin": "o", "fingerprint": "f",
                          "dp_size": dp_size})
    for dp in range(dp_size):
        for mp in range(mp_size):
            add("trainer_host", {"job": "j", "dp_rank": dp, "mp_rank": mp, "host": f"gpu-{dp // 8:05d}",
                                 "declared_ms": 1_700_000_000_000 + dp})
    return st


def leader_log(tmp: Path, state: FabricState) -> CheckpointLog:
    """A leader's log whose snapshot is ``state`` (as after compaction)."""
    log = CheckpointLog(tmp / "leader", fsync=False)
    log.open()
    log.install_snapshot(state.to_snapshot())
    return log


def fresh_replica(tmp: Path, name: str = "a") -> ShadowReplica:
    log = CheckpointLog(tmp / name, fsync=False)
    return ShadowReplica(name, log, log.open())


def over_the_wire(sender: str, msg: object) -> object:
    """The daemon's path: to_peer → protocol.encode → (bytes on a socket) → protocol.decode → from_peer."""
    frames = protocol.encode(*to_peer(sender, msg))
    assert len(frames[0]) <= protocol.MAX_HEADER_BYTES
    if isinstance(msg, SnapshotChunk):
        assert len(frames[0]) < 1024, "a chunk's header holds no snapshot data"
        assert len(frames) == 2 and len(frames[1]) <= CHUNK_BYTES
    envelope, payload = protocol.decode([bytes(f) for f in frames])
    return from_peer(envelope, payload)


class Wire:
    """A leader's tracker and shadows exchanging messages through real frames, in order."""

    def __init__(self, tracker: ReplicationTracker, replicas: dict[str, ShadowReplica]) -> None:
        self.tracker, self.replicas = tracker, replicas
        self.queue: list[tuple[str, object]] = []
        self.drop = lambda to, msg: False
        self.now = 0.0
        self.max_held = 0

    def send(self, actions: list, sender: str) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.queue.append((a.to, over_the_wire(sender, a.msg)))

    def pump(self) -> None:
        while self.queue:
            to, msg = self.queue.pop(0)
            if self.drop(to, msg):
                continue
            if to == self.tracker.leader:
                self.send(self.tracker.on_message(msg, self.now), to)
            elif to in self.replicas:
                self.send(self.replicas[to].on_message(msg, self.now), to)
                held = self.replicas[to].snapshot_bytes_held
                self.max_held = max(self.max_held, held)

    def tick(self, dt: float = 0.5) -> None:
        self.now += dt
        self.send(self.tracker.tick(self.now), self.tracker.leader)
        self.pump()


def test_a_snapshot_over_2_mib_reaches_a_fresh_shadow_through_frames(tmp_path: Path) -> None:
    state = big_state()
    size = len(encode_snapshot(state.to_snapshot()))
    assert size > 2 << 20
    log = leader_log(tmp_path, state)
    rep = fresh_replica(tmp_path)
    tracker = ReplicationTracker("L", 1, ["a"], 1, log, clock_now=0.0)
    wire = Wire(tracker, {"a": rep})
    for _ in range(10):
        wire.tick()
    assert rep.counters["snapshots_installed"] == 1
    assert rep.state == state and rep.log.snapshot_position == (1, state.last_seq)
    assert tracker.shadow_positions() == {"a": state.last_seq}
    chunks = -(-size // CHUNK_BYTES)
    assert tracker.counters["snapshot_chunks_sent"] == chunks
    assert tracker.counters["snapshots_encoded"] == 1
    assert wire.max_held <= size and rep.snapshot_bytes_held == 0  # memory released after install
    rep.log.close()
    assert rep.log.open() == state  # durable


def test_lost_chunks_are_resent_from_the_acknowledged_offset_and_encoded_once(tmp_path: Path) -> None:
    state = big_state(dp_size=2048)
    size = len(encode_snapshot(state.to_snapshot()))
    log = leader_log(tmp_path, state)
    rep = fresh_replica(tmp_path)
    tracker = ReplicationTracker("L", 1, ["a"], 1, log, clock_now=0.0, chunk_bytes=64 << 10, snapshot_window=2)
    wire = Wire(tracker, {"a": rep})
    lost = []

    def lose_every_third_chunk(to: str, msg: object) -> bool:
        if isinstance(msg, SnapshotChunk) and msg.offset not in [m.offset for m in lost]:
            if len(lost) < 3 and msg.offset // (64 << 10) % 3 == 1:
                lost.append(msg)
                return True
        return False

    wire.drop = lose_every_third_chunk
    for _ in range(40):
        wire.tick()
        if rep.counters["snapshots_installed"]:
            break
    assert len(lost) == 3 and rep.counters["snapshot_chunks_gap"] >= 1
    assert rep.state == state and tracker.counters["snapshot_resends"] >= 1
    assert tracker.counters["snapshots_encoded"] == 1  # every resend cut from the same bytes
    assert tracker.counters["snapshot_chunks_sent"] > -(-size // (64 << 10))


def test_a_newer_transfer_restarts_the_assembly_and_an_older_one_is_dropped(tmp_path: Path) -> None:
    old, new = big_state(dp_size=512, term=1), big_state(dp_size=600, term=2)
    rep = fresh_replica(tmp_path)
    old_t = ReplicationTracker("L1", 1, ["a"], 1, leader_log(tmp_path / "1", old), clock_now=0.0,
                               chunk_bytes=16 << 10)
    first = [a.msg for a in old_t.on_message(over_the_wire("a", _request(1)), 0.0)]
    assert len(first) == 4  # a window of chunks
    rep.on_message(over_the_wire("L1", first[0]), 0.0)
    rep.on_message(over_the_wire("L1", first[1]), 0.0)
    assert rep.snapshot_bytes_held == 32 << 10
    # a new leader (term 2) starts its own snapshot: the half-received one is dropped
    new_t = ReplicationTracker("L2", 2, ["a"], 1, leader_log(tmp_path / "2", new), clock_now=1.0,
                               chunk_bytes=16 << 10)
    wire = Wire(new_t, {"a": rep})
    wire.now = 1.0
    wire.send(new_t.on_message(over_the_wire("a", _request(2)), 1.0), "L2")
    wire.queue.insert(1, ("a", over_the_wire("L1", first[2])))  # the old leader's chunk, delivered late
    for _ in range(20):
        wire.tick()
    assert rep.state == new and rep.counters["snapshots_installed"] == 1
    assert rep.counters["stale_term_rejected"] == 1


def test_a_newer_snapshot_of_the_same_leader_restarts_the_transfer() -> None:
    asm = SnapshotAssembly(max_chunk=4)
    a, b = b"0123456789", b"abcdefghijkl"
    assert asm.add(1, "L", 5, len(a), zlib.crc32(a), 0, a[:4]).status == "accepted"
    assert asm.add(1, "L", 9, len(b), zlib.crc32(b), 0, b[:4]).status == "accepted"  # newer seq: restart
    assert asm.received == 4 and asm.key[2] == 9
    assert asm.add(1, "L", 5, len(a), zlib.crc32(a), 4, a[4:8]).status == "stale"
    assert asm.add(1, "L", 9, len(b), zlib.crc32(b), 4, b[4:8]).status == "accepted"
    got = asm.add(1, "L", 9, len(b), zlib.crc32(b), 8, b[8:])
    assert (got.status, got.data) == ("complete", b) and asm.received == 0


@pytest.mark.parametrize("total, checksum, offset, data, why", [
    (0, 1, 0, b"x", "total"),
    ((1 << 20) + 1, 1, 0, b"x", "total"),
    (10, -1, 0, b"x", "checksum"),
    (10, 1 << 32, 0, b"x", "checksum"),
    (10, 1, 0, b"", "chunk of 0"),
    (100, 1, 0, b"x" * 65, "chunk of 65"),
    (10, 1, 8, b"xyz", "outside"),
    (10, 1, -1, b"x", "outside"),
])
def test_chunks_out_of_bounds_are_refused(total, checksum, offset, data, why) -> None:
    asm = SnapshotAssembly(max_bytes=1 << 20, max_chunk=64)
    got = asm.add(1, "L", 1, total, checksum, offset, data)
    assert got.status == "invalid" and why in got.reason and asm.received == 0


def test_gaps_duplicates_and_a_bad_checksum_never_install_and_restart_cleanly(tmp_path: Path) -> None:
    state = big_state(dp_size=64)
    data = encode_snapshot(state.to_snapshot())
    rep = fresh_replica(tmp_path)

    def chunk(offset: int, piece: bytes, checksum: int = zlib.crc32(data), total: int = len(data)) -> SnapshotChunk:
        return SnapshotChunk(term=1, leader="L", seq=state.last_seq, commit_seq=state.last_seq, offset=offset,
                             total=total, checksum=checksum, data=piece)

    def acked(actions: list) -> int:
        return [a.msg.received for a in actions if isinstance(a.msg, SnapshotAck)][0]

    step = 1000
    assert acked(rep.on_message(chunk(0, data[:step]), 0.0)) == step
    assert acked(rep.on_message(chunk(2 * step, data[2 * step:3 * step]), 0.0)) == step  # a gap: refused
    assert acked(rep.on_message(chunk(0, data[:step]), 0.0)) == step  # a duplicate
    assert rep.on_message(chunk(0, data[:step], total=1 << 30), 0.0) == []  # too big: dropped
    assert rep.snapshot_bytes_held == step  # the transfer in progress is untouched
    # the whole, with a checksum that does not match: nothing installed, the transfer restarts at 0
    wrong = zlib.crc32(data) ^ 1
    actions = []
    for off in range(0, len(data), step):
        actions = rep.on_message(chunk(off, data[off:off + step], checksum=wrong), 0.0)
    assert acked(actions) == 0 and rep.counters["snapshot_chunks_corrupt"] == 1
    assert rep.counters["snapshots_installed"] == 0 and rep.state == FabricState()
    # and the right one goes in
    for off in range(0, len(data), step):
        actions = rep.on_message(chunk(off, data[off:off + step]), 0.0)
    assert rep.counters["snapshots_installed"] == 1 and rep.state == state
    assert LogAck(term=1, shadow="a", seq=state.last_seq, ok=True) in [a.msg for a in actions if isinstance(a, Send)]
    # a resend of the last chunk (its LogAck was lost) is answered again, not installed twice
    last = (len(data) - 1) // step * step
    again = rep.on_message(chunk(last, data[last:]), 0.0)
    assert LogAck(term=1, shadow="a", seq=state.last_seq, ok=True) in [a.msg for a in again]
    assert rep.counters["snapshots_installed"] == 1


def test_a_snapshot_that_is_not_a_state_is_dropped(tmp_path: Path) -> None:
    rep = fresh_replica(tmp_path)
    for data in (b"not json", b'{"version": 1}', encode_snapshot(FabricState(last_seq=3).to_snapshot())):
        actions = rep.on_message(SnapshotChunk(term=1, leader="L", seq=4, commit_seq=4, offset=0, total=len(data),
                                               checksum=zlib.crc32(data), data=data), 0.0)
        assert actions == []
    assert rep.counters["malformed"] == 3 and rep.counters["snapshots_installed"] == 0


@pytest.mark.parametrize("payload, body_extra", [
    ([], {}),  # the chunk's data frame is missing
    ([b"ab", b"cd"], {}),  # one frame too many
    ([b"ab"], {"data": "ab"}),  # data in the header
])
def test_chunk_frames_that_do_not_fit_are_protocol_errors(payload, body_extra) -> None:
    body = {"term": 1, "leader": "L", "seq": 1, "commit_seq": 1, "offset": 0, "total": 2, "checksum": 3,
            **body_extra}
    with pytest.raises(ProtocolError):
        from_peer(protocol.PeerMessage(sender="L", kind="snapshot_chunk", body=body), payload)


def test_messages_without_payload_refuse_payload_frames() -> None:
    envelope, payload = to_peer("a", SnapshotAck(term=1, shadow="a", seq=2, received=3))
    assert payload == []
    with pytest.raises(ProtocolError):
        from_peer(envelope, [b"extra"])


def _request(term: int) -> SnapshotRequest:
    return SnapshotRequest(term=term, shadow="a")


def test_a_shadow_that_lost_its_disk_catches_up_by_snapshot(tmp_path: Path) -> None:
    from .test_replication import Net, assert_identical

    net = Net(tmp_path, shadows=("a", "b"), required_acks=1, segment_bytes=600)
    net.append(60, batch=4)
    net.settle()
    net.log.compact_upto(net.tracker.commit_seq)
    fresh = CheckpointLog(tmp_path / "a-new-disk", fsync=False)
    net.replicas["a"] = ShadowReplica("a", fresh, fresh.open())  # acknowledged 61 records, now holds none
    net.append(3)
    net.settle()
    assert net.tracker.counters["shadow_regressed"] == 1
    assert net.replicas["a"].counters["snapshots_installed"] == 1
    assert_identical(net)
