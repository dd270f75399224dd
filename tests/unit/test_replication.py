"""Leader-to-shadow log replication over an in-memory network, with real logs on disk."""

from __future__ import annotations

import json
import random
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import pytest

from fabric_client import protocol
from fabric_client.errors import ProtocolError
from fabricd.cluster.log import CheckpointLog, LogError
from fabricd.cluster.replication import (
    Committed,
    HigherTerm,
    LogAck,
    LogAppend,
    ReplicationTracker,
    Send,
    ShadowReplica,
    SnapshotAck,
    SnapshotChunk,
    SnapshotRequest,
)
from fabricd.cluster.state import FabricState, Record, encode_snapshot
from fabricd.cluster.wire import from_peer, to_peer
from fabricd.failpoints import FailpointHit, configure

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def make_records(state: FabricState, term: int, n: int) -> list[Record]:
    """n valid records after ``state`` (applied to it), as a leader would decide them."""
    out = []
    for _ in range(n):
        seq = state.last_seq + 1
        if "j" not in state.jobs:
            rec = Record(term, seq, "job_submitted", {"job": "j", "spec_toml": "t", "spec_origin": "o",
                                                      "fingerprint": "f", "dp_size": 4})
        elif seq % 5 == 0:
            rec = Record(term, seq, "sample_skipped", {"job": "j", "source": "s", "sample_id": seq, "piece": 0,
                                                       "step": seq, "reason": ""})
        else:
            rec = Record(term, seq, "trainer_progress", {"job": "j", "dp_rank": seq % 4, "mp_rank": 0,
                                                         "next_step": seq})
        state.apply(rec)
        out.append(rec)
    return out


class Net:
    """One leader and N shadows; messages queue in order and are delivered by ``pump``."""

    def __init__(self, tmp: Path, shadows: Sequence[str] = ("a", "b", "c"), *, required_acks: int = 2,
                 window: int = 256, term: int = 1, leader: str = "L", leader_log: CheckpointLog | None = None,
                 leader_state: FabricState | None = None, replicas: dict[str, ShadowReplica] | None = None,
                 segment_bytes: int = 4096) -> None:
        self.tmp = tmp
        self.now = 0.0
        if leader_log is None:
            leader_log = CheckpointLog(tmp / leader, fsync=False, segment_bytes=segment_bytes)
            leader_state = leader_log.open()
        self.leader, self.log, self.state, self.term = leader, leader_log, leader_state, term
        self.replicas = dict(replicas or {})
        for name in shadows:
            if name not in self.replicas:
                log = CheckpointLog(tmp / name, fsync=False, segment_bytes=segment_bytes)
                self.replicas[name] = ShadowReplica(name, log, log.open())
        self.tracker = ReplicationTracker(leader, term, list(shadows), required_acks, self.log, window=window,
                                          clock_now=self.now, heartbeat_s=0.5, resend_s=2.0)
        self.queue: deque[tuple[str, object]] = deque()
        self.down: set[str] = set()  # messages to these nodes are lost
        self.drop: Callable[[str, object], bool] = lambda to, msg: False
        self.commits: list[int] = []
        self.max_commit = 0
        self.sent_records: dict[str, int] = {}
        self.delivered = 0

    def append(self, n: int, batch: int = 1) -> None:
        for _ in range(0, n, batch):
            recs = make_records(self.state, self.term, batch)
            self.log.append(recs)
            self.dispatch(self.tracker.on_appended(recs[-1].seq))

    def dispatch(self, actions: list, source: str | None = None) -> None:
        """Carry out actions of the leader (source None) or of a shadow."""
        for a in actions:
            if isinstance(a, Send):
                if isinstance(a.msg, LogAppend):
                    assert len(a.msg.records) <= self.tracker.window
                    self.sent_records[a.to] = self.sent_records.get(a.to, 0) + len(a.msg.records)
                # Everything crosses the wire as dicts.
                self.queue.append((a.to, _over_the_wire(a.msg)))
            elif isinstance(a, Committed) and source is None:
                assert a.seq == self.tracker.commit_seq
                self.check_commit(a.seq)
                self.commits.append(a.seq)
                self.max_commit = max(self.max_commit, a.seq)
            elif isinstance(a, Committed):  # a shadow learns no commit point a leader did not announce
                assert a.seq == self.replicas[source].commit_seq <= self.max_commit

    def pump(self, limit: int = 100_000) -> None:
        """Deliver queued messages in order, checking the invariants after each one."""
        while self.queue and limit:
            limit -= 1
            to, msg = self.queue.popleft()
            if to in self.down or self.drop(to, msg):
                continue
            self.delivered += 1
            if to == self.leader:
                self.dispatch(self.tracker.on_message(msg, self.now))
            else:
                self.dispatch(self.replicas[to].on_message(msg, self.now), to)
            self.check_prefixes()
            assert all(v <= self.tracker.window for v in self.tracker.in_flight().values())

    def tick(self, dt: float = 0.5, rounds: int = 1) -> None:
        for _ in range(rounds):
            self.now += dt
            self.dispatch(self.tracker.tick(self.now))
            self.pump()

    def settle(self, rounds: int = 40) -> None:
        self.pump()
        for _ in range(rounds):
            if self.converged():
                return
            self.tick()
        assert self.converged(), self.describe()

    def converged(self) -> bool:
        last = self.log.last_position[1]
        return all(r.log.last_position[1] == last and r.commit_seq == self.tracker.commit_seq
                   for n, r in self.replicas.items() if n not in self.down) and self.tracker.commit_seq == last

    def describe(self) -> str:
        return (f"leader {self.log.last_position} commit {self.tracker.commit_seq} "
                f"positions {self.tracker.shadow_positions()} "
                f"shadows { {n: (r.log.last_position, r.commit_seq) for n, r in self.replicas.items()} }")

    def records_of(self, log: CheckpointLog) -> dict[int, Record]:
        first, last = log.first_seq, log.last_position[1]
        return {r.seq: r for r in log.read(first, last - first + 1)} if last >= first else {}

    def check_prefixes(self) -> None:
        """Every shadow's records agree with the leader's wherever the leader's are committed,
        and no shadow's log is longer than what some leader wrote."""
        mine = self.records_of(self.log)
        commit = self.tracker.commit_seq
        for name, rep in self.replicas.items():
            theirs = self.records_of(rep.log)
            for seq in range(max(rep.log.first_seq, self.log.first_seq), min(commit, rep.commit_seq) + 1):
                assert theirs[seq] == mine[seq], f"{name} differs from the leader at committed seq {seq}"
            assert rep.state.last_seq == rep.log.last_position[1]

    def check_commit(self, seq: int) -> None:
        held = [n for n, r in self.replicas.items() if r.log.last_position[1] >= seq]
        assert len(held) >= self.tracker.required_acks, f"seq {seq} committed but held only by {held}"


def assert_identical(net: Net, names: Sequence[str] | None = None) -> None:
    leader_records = net.records_of(net.log)
    for name in names or net.replicas:
        rep = net.replicas[name]
        assert rep.state == net.state, name
        theirs = net.records_of(rep.log)
        assert {s: r for s, r in theirs.items() if s in leader_records} == \
            {s: r for s, r in leader_records.items() if s in theirs}, name
        assert rep.log.last_position == net.log.last_position, name
        # The log on disk gives the same state back.
        rep.log.close()
        assert rep.log.open() == net.state, name


def test_all_shadows_converge_to_the_leaders_log(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.append(10)
    net.pump()
    net.append(60, batch=6)
    net.settle()
    assert net.tracker.commit_seq == 70 and net.commits == sorted(set(net.commits))
    assert net.tracker.shadow_positions() == {"a": 70, "b": 70, "c": 70}
    assert_identical(net)


def test_required_acks_zero_commits_on_the_leaders_own_fsync(tmp_path: Path) -> None:
    net = Net(tmp_path, shadows=(), required_acks=0)
    net.append(3)
    assert net.tracker.commit_seq == 3 and net.commits == [1, 2, 3]


def test_commit_only_advances_with_the_required_acks(tmp_path: Path) -> None:
    net = Net(tmp_path, required_acks=2)
    net.append(5)
    net.settle()
    assert net.tracker.commit_seq == 5
    net.down = {"b", "c"}
    net.append(5)
    net.tick(rounds=6)
    assert net.tracker.commit_seq == 5  # only "a" acknowledged 6..10
    assert net.tracker.shadow_positions()["a"] == 10
    net.down = {"c"}
    net.tick(rounds=6)
    assert net.tracker.commit_seq == 10
    assert net.replicas["b"].commit_seq == 10 and net.replicas["c"].commit_seq == 5
    net.down = set()
    net.settle()
    assert_identical(net)


def test_a_shadow_that_missed_messages_catches_up_by_snapshot(tmp_path: Path) -> None:
    net = Net(tmp_path, required_acks=1, segment_bytes=600)
    net.append(5)
    net.settle()
    net.down = {"c"}
    net.append(100, batch=4)
    net.tick(rounds=3)
    net.log.compact_upto(net.tracker.commit_seq)  # the records "c" misses are compacted away
    assert net.log.first_seq > 6
    net.append(7)
    net.down = set()
    net.settle()
    assert net.replicas["c"].counters["snapshots_installed"] == 1
    assert net.replicas["c"].counters["gaps"] >= 1
    assert net.tracker.counters["snapshots_sent"] == 1
    assert net.replicas["a"].counters["snapshots_installed"] == 0
    assert_identical(net)


def test_a_shadow_that_misses_messages_without_compaction_backs_up(tmp_path: Path) -> None:
    net = Net(tmp_path, required_acks=1)
    net.append(3)
    net.settle()
    lost = {"n": 0}

    def drop_some(to: str, msg) -> bool:  # every other append to "b" is lost
        if to == "b" and isinstance(msg, LogAppend) and msg.records:
            lost["n"] += 1
            return lost["n"] % 2 == 1
        return False

    net.drop = drop_some
    for _ in range(10):
        net.append(3)
        net.pump()
    net.drop = lambda to, msg: False
    net.settle()
    assert lost["n"] > 1 and net.replicas["b"].counters["gaps"] >= 1
    assert net.tracker.counters["snapshots_sent"] == 0
    assert_identical(net)


def test_snapshot_request_is_answered(tmp_path: Path) -> None:
    net = Net(tmp_path, shadows=("a",), required_acks=1)
    net.append(20)
    net.settle()
    net.log.compact_upto(15)
    rep = net.replicas["a"]
    assert rep.request_snapshot() == [Send("L", SnapshotRequest(term=1, shadow="a"))]
    net.dispatch(rep.request_snapshot())
    net.pump()
    assert net.tracker.counters["snapshot_requests"] == 1
    assert rep.counters["snapshots_installed"] == 0  # it already held seq 15: nothing to replace
    net.append(2)
    net.settle()
    assert_identical(net)


def test_window_bounds_records_in_flight(tmp_path: Path) -> None:
    net = Net(tmp_path, shadows=("a", "slow"), required_acks=1, window=4)
    net.append(2)
    net.settle()
    base = net.sent_records.get("slow", 0)
    net.down = {"slow"}
    net.append(50)
    net.pump()
    assert net.sent_records["slow"] - base == 4  # a window, then nothing until acks come
    assert net.tracker.in_flight()["slow"] == 4
    net.tick(dt=2.5)  # silent past the resend timeout: at most one window again
    assert net.sent_records["slow"] - base == 8
    assert net.tracker.counters["resends"] == 1
    assert net.tracker.commit_seq == 52  # "a" alone satisfies required_acks
    net.down = set()
    net.settle()
    assert_identical(net)


def test_stale_term_appends_are_rejected_and_counted(tmp_path: Path) -> None:
    net = Net(tmp_path, shadows=("a",), required_acks=1, term=2)
    net.append(3)
    net.settle()
    rep = net.replicas["a"]
    before = rep.log.last_position
    old = LogAppend(term=1, leader="old", prev_seq=3, records=[Record(1, 4, "member_seen", {
        "node": "x", "endpoint": "e"}).to_dict()], commit_seq=4, prev_term=2)
    actions = rep.on_message(old, 9.0)
    assert actions == [Send("old", LogAck(term=2, shadow="a", seq=3, ok=False))]
    assert rep.counters["stale_term_rejected"] == 1 and rep.log.last_position == before
    data = encode_snapshot(FabricState().to_snapshot())
    stale_snap = SnapshotChunk(term=1, leader="old", seq=0, commit_seq=1, offset=0, total=len(data),
                               checksum=zlib.crc32(data), data=data)
    assert rep.on_message(stale_snap, 9.0)[0].msg.ok is False
    assert rep.counters["stale_term_rejected"] == 2
    # The old leader's tracker, seeing the newer term, is told to step down.
    old_tracker = ReplicationTracker("old", 1, ["a"], 1, net.log, clock_now=0.0)
    assert old_tracker.on_message(actions[0].msg, 9.0) == [HigherTerm(2, "a")]


def test_new_leader_truncates_a_conflicting_uncommitted_tail(tmp_path: Path) -> None:
    # Term 1: leader L replicates 1..5 to a and b, then 6..9 reach only "a" and are never committed.
    net = Net(tmp_path, shadows=("a", "b"), required_acks=2)
    net.append(5)
    net.settle()
    net.down = {"b"}
    net.append(4)
    net.pump()
    assert net.replicas["a"].log.last_position == (1, 9) and net.tracker.commit_seq == 5
    # Term 2: "b" takes over with 1..5 and writes 6..7 before its tracker starts.
    b = net.replicas.pop("b")
    b.log.append(make_records(b.state, 2, 2))
    net2 = Net(tmp_path, shadows=("a",), required_acks=1, term=2, leader="b", leader_log=b.log,
               leader_state=b.state, replicas={"a": net.replicas["a"]})
    net2.tick(rounds=3)
    a = net2.replicas["a"]
    # a's seq 7 and 6 are term 1, b's are term 2: it backs up to 5, then a cuts 6..9.
    assert a.counters["mismatches"] == 2 and a.counters["truncations"] == 1
    assert [r.term for r in a.log.read(1, 100)] == [1] * 5 + [2] * 2
    assert net2.tracker.commit_seq == 7  # 7 is a term-2 record: it commits, and 1..6 with it
    net2.append(1)
    net2.settle()
    assert net2.tracker.commit_seq == 8
    assert_identical(net2)


def test_new_leader_commits_old_records_only_with_one_of_its_own(tmp_path: Path) -> None:
    net = Net(tmp_path, shadows=("a",), required_acks=1)
    net.append(4)
    net.pump()  # acks delivered; then a new term begins over the same logs
    net2 = Net(tmp_path, shadows=("a",), required_acks=1, term=2, leader_log=net.log, leader_state=net.state,
               replicas=net.replicas)
    net2.tick(rounds=4)
    assert net2.tracker.shadow_positions()["a"] == 4 and net2.tracker.commit_seq == 0
    net2.append(1)
    net2.settle()
    assert net2.tracker.commit_seq == 5


def test_shadow_restart_resumes_from_its_durable_log(tmp_path: Path) -> None:
    net = Net(tmp_path, required_acks=2)
    net.append(20, batch=4)
    net.settle()
    old = net.replicas["b"]
    old.log.close()
    log = CheckpointLog(tmp_path / "b", fsync=False, segment_bytes=4096)
    net.replicas["b"] = ShadowReplica("b", log, log.open())
    net.append(10, batch=2)
    net.settle()
    assert net.replicas["b"].counters["snapshots_installed"] == 0
    assert_identical(net)


@pytest.mark.parametrize("seed", range(6))
def test_random_loss_and_compaction_converge(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    net = Net(tmp_path, shadows=("a", "b", "c", "d"), required_acks=2, window=8, segment_bytes=700)
    net.drop = lambda to, msg: rng.random() < 0.2
    for _ in range(60):
        r = rng.random()
        if r < 0.5:
            net.append(rng.randint(1, 5))
        elif r < 0.6:
            net.log.compact_upto(net.tracker.commit_seq)
        elif r < 0.65:
            name = rng.choice(sorted(net.replicas))
            rep = net.replicas[name]
            rep.log.compact_upto(rep.commit_seq)
        elif r < 0.7:
            net.down = {rng.choice(sorted(net.replicas))}
        elif r < 0.75:
            net.down = set()
        net.tick(dt=rng.choice([0.1, 0.5, 2.5]))
    commits = net.commits
    assert commits == sorted(commits)
    net.drop = lambda to, msg: False
    net.down = set()
    net.settle(rounds=60)
    assert_identical(net)


def test_messages_round_trip_and_malformed_ones_are_refused() -> None:
    msgs = [LogAppend(1, "L", 0, [], 0, 0), LogAck(1, "a", 3, True), SnapshotRequest(2, "a"),
            SnapshotChunk(2, "L", 0, 0, 0, 3, 7, b"abc"), SnapshotAck(2, "a", 0, 3)]
    for m in msgs:
        assert _over_the_wire(m) == m
    ack = {"term": 1, "shadow": "a", "seq": 3, "ok": True}
    for kind, body in [("log_ack", {**ack, "ok": "yes"}), ("log_ack", {**ack, "seq": -1}),
                       ("log_ack", {**ack, "seq": 2**70}), ("log_ack", {"term": 1, "shadow": "a", "seq": 3}),
                       ("nope", ack), ("log_append", None)]:
        with pytest.raises(ProtocolError):
            from_peer(protocol.PeerMessage(sender="a", kind=kind, body=msgspec.Raw(json.dumps(body).encode())))
    chunk, payload = to_peer("L", msgs[3])
    with pytest.raises(ProtocolError, match="payload frames"):
        from_peer(chunk, [])  # the data frame is missing


def _over_the_wire(msg):
    """``msg`` encoded and decoded as the daemons do (envelope header + payload frames)."""
    envelope, payload = protocol.decode(protocol.encode(*to_peer("x", msg)))
    return from_peer(envelope, payload)


def test_tracker_configuration_is_checked(tmp_path: Path) -> None:
    log = CheckpointLog(tmp_path, fsync=False)
    log.open()
    with pytest.raises(ValueError, match="required_acks"):
        ReplicationTracker("L", 1, ["a"], 2, log, clock_now=0.0)
    with pytest.raises(ValueError, match="exclude the leader"):
        ReplicationTracker("L", 1, ["a", "L"], 1, log, clock_now=0.0)


class Failover(Net):
    """Five daemons; leaders crash and are replaced the way the lease elects them: a candidate
    wins only if its log is at least as up to date as a majority's (itself included)."""

    NODES = ("n0", "n1", "n2", "n3", "n4")

    def __init__(self, tmp: Path, rng: random.Random) -> None:
        super().__init__(tmp, shadows=self.NODES[1:], required_acks=2, window=8, leader="n0", segment_bytes=700)
        self.rng = rng
        self.committed: dict[int, Record] = {}
        self.elections = 0

    def dispatch(self, actions: list, source: str | None = None) -> None:
        for a in actions:
            if isinstance(a, Committed) and source is None:
                start = max(self.commits[-1] + 1 if self.commits else 1, self.log.first_seq)
                for rec in self.log.read(start, a.seq - start + 1):
                    assert self.committed.setdefault(rec.seq, rec) == rec, f"committed seq {rec.seq} changed"
        super().dispatch(actions, source)

    def elect(self) -> None:
        """The leader crashes; some up-to-date shadow takes over in a higher term."""
        old = self.leader
        self.replicas[old] = ShadowReplica(old, self.log, self.state)
        up = [n for n in self.NODES if n != old and n not in self.down]
        pos = {n: self.replicas[n].log.last_position for n in self.NODES}
        majority = len(self.NODES) // 2 + 1
        eligible = [n for n in up if sum(pos[n] >= pos[v] for v in up + [old]) >= majority]
        new = self.rng.choice(eligible)
        rep = self.replicas.pop(new)
        term = max([self.term] + [r.highest_term for r in self.replicas.values()] + [rep.highest_term]) + 1
        self.leader, self.log, self.state, self.term = new, rep.log, rep.state, term
        self.tracker = ReplicationTracker(new, term, [n for n in self.NODES if n != new], 2, self.log, window=8,
                                          clock_now=self.now, heartbeat_s=0.5, resend_s=2.0)
        self.commits = []
        self.elections += 1
        for seq, rec in self.committed.items():  # leader completeness
            if seq >= self.log.first_seq:
                assert self.log.read(seq, 1) == [rec], f"new leader {new} lost committed seq {seq}"
            else:
                assert self.log.snapshot_position[1] >= seq
        self.down = {old} if self.rng.random() < 0.5 else set()
        self.append(1)  # a record of the new term, so that inherited records can commit

    def check_commit(self, seq: int) -> None:
        pass  # checked by leader completeness at every election instead


@pytest.mark.parametrize("seed", range(8))
def test_failovers_keep_every_committed_record(tmp_path: Path, seed: int) -> None:
    rng = random.Random(1000 + seed)
    net = Failover(tmp_path, rng)
    net.drop = lambda to, msg: rng.random() < 0.15
    for _ in range(80):
        r = rng.random()
        if r < 0.45:
            net.append(rng.randint(1, 4))
            if rng.random() < 0.5:
                net.pump(limit=rng.randint(0, 6))  # leave messages in flight across elections
                continue
        elif r < 0.53:
            net.elect()
        elif r < 0.6:
            net.log.compact_upto(net.tracker.commit_seq)
        elif r < 0.66:
            rep = net.replicas[rng.choice(sorted(net.replicas))]
            rep.log.compact_upto(rep.commit_seq)
        elif r < 0.72:
            net.down = {rng.choice(sorted(net.replicas))}
        elif r < 0.78:
            net.down = set()
        net.tick(dt=rng.choice([0.1, 0.5, 2.5]))
    net.drop = lambda to, msg: False
    net.down = set()
    net.settle(rounds=80)
    assert net.elections >= 2
    assert_identical(net)


def test_shadow_acknowledges_only_after_its_append_is_durable(tmp_path: Path) -> None:
    net = Net(tmp_path, shadows=("a",), required_acks=1)
    net.append(2)
    net.settle()
    configure("log.after_write_before_fsync=raise@2")  # hit 1: the leader's append; hit 2: the shadow's
    try:
        net.append(1)
        with pytest.raises(FailpointHit):
            net.pump()
    finally:
        configure(None)
    assert net.tracker.shadow_positions()["a"] == 2 and net.tracker.commit_seq == 2
    rep = net.replicas["a"]
    with pytest.raises(LogError, match="unusable"):
        rep.on_message(LogAppend(1, "L", 2, [], 2, 1), net.now)
    rep.log.close()  # the daemon rebuilds the replica from its log, as after a crash
    log = CheckpointLog(tmp_path / "a", fsync=False, segment_bytes=4096)
    net.replicas["a"] = ShadowReplica("a", log, log.open())
    net.settle()
    assert_identical(net)


def test_a_replica_is_synced_only_by_an_append_it_holds_everything_committed_of(tmp_path: Path) -> None:
    """``synced_at``: the time of the last append after which the replica held every record the
    leader had committed (what ``ClusterController.in_touch`` trusts a follower's state by)."""
    log = CheckpointLog(tmp_path / "a")
    rep = ShadowReplica("a", log, log.open())
    assert rep.synced_at is None
    rec = [Record(1, s, "member_seen", {"node": f"n{s}", "endpoint": "e"}).to_dict() for s in (1, 2, 3)]
    # the leader has committed up to 3, the replica gets 1..2: behind, not synced
    rep.on_message(LogAppend(term=1, leader="L", prev_seq=0, records=rec[:2], commit_seq=3, prev_term=0), 5.0)
    assert rep.synced_at is None
    # a gap (prev_seq past what it holds) is refused: not synced either
    rep.on_message(LogAppend(term=1, leader="L", prev_seq=5, records=[], commit_seq=5, prev_term=1), 6.0)
    assert rep.synced_at is None
    # the rest arrives: it holds everything committed
    rep.on_message(LogAppend(term=1, leader="L", prev_seq=2, records=rec[2:], commit_seq=3, prev_term=1), 7.0)
    assert rep.synced_at == 7.0
    # a heartbeat append with nothing new keeps it synced
    rep.on_message(LogAppend(term=1, leader="L", prev_seq=3, records=[], commit_seq=3, prev_term=1), 8.5)
    assert rep.synced_at == 8.5
    log.close()
