"""Log replication from the leader to its shadows: the Clone pattern, with acknowledgements.

Two pure state machines, no sockets: messages and the time go in, actions come out. The
daemon maps the messages to the wire and carries out the actions.

- :class:`ReplicationTracker` (leader, one per term) streams new records to every shadow, at
  most ``window`` records unacknowledged per shadow, resends to shadows that fall silent, sends
  heartbeats that carry the commit point, and falls back to a snapshot for a shadow that lags
  behind what the log still holds. A snapshot streams in chunks of at most ``CHUNK_BYTES``
  (at most ``snapshot_window`` chunks unacknowledged), cut from bytes encoded once per
  snapshot position (see :mod:`~fabricd.cluster.snapshot_transfer`), so its size is bounded by
  nothing but the log's frame limit. ``commit_seq`` is the highest seq that the leader holds
  durably and ``required_acks`` shadows acknowledged as durable.
- :class:`ShadowReplica` (every other daemon) accepts appends in order, writes them to its own
  :class:`~fabricd.cluster.log.CheckpointLog` *before* acknowledging, rejects anything stamped
  with an older term (counted: the fencing rule), truncates a conflicting uncommitted tail left
  by an older leader, and installs a snapshot when it is too far behind: it reassembles the
  chunks in order, acknowledges each (``SnapshotAck``), checks the checksum of the whole, and
  restarts cleanly when a newer transfer (new term, leader or snapshot) begins.

Consistency is Raft's log matching rule: an append names the (seq, term) of the record just
before its records (``prev_seq``/``prev_term``), and a shadow accepts it only if its own log
holds that record. Two logs that agree at a (seq, term) therefore agree on everything before.

For the commit point to be safe across leader changes, ``required_acks`` must make the leader
plus its acks a majority of the voters, and a new leader only counts acks for records of its own
term: records inherited from older terms commit when the first record of the new term does, so
a new leader should append one record on taking office (e.g. ``member_seen`` of itself).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Union

from fabricd.cluster.log import CheckpointLog, Compacted, LogError
from fabricd.cluster.snapshot_transfer import CHUNK_BYTES, EncodedSnapshot, SnapshotAssembly
from fabricd.cluster.state import FabricState, Record, StateError, decode_snapshot
from fabricd.cluster.lease import Send  # one 'send to a peer' action for the whole cluster layer
from fabricd.cluster.replication_messages import (  # re-exported: the messages are part of this API
    MESSAGE_TYPES,
    LogAck,
    LogAppend,
    Message,
    ReplicationError,
    SnapshotAck,
    SnapshotChunk,
    SnapshotRequest,
)

__all__ = [
    "Action",
    "Committed",
    "HigherTerm",
    "LogAck",
    "LogAppend",
    "LogReader",
    "MESSAGE_TYPES",
    "Message",
    "ReplicationError",
    "ReplicationTracker",
    "Send",
    "ShadowReplica",
    "SnapshotAck",
    "SnapshotChunk",
    "SnapshotRequest",
]

log = logging.getLogger(__name__)


# -- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Committed:
    """Every record up to ``seq`` is committed (durable on the leader and the required shadows)."""

    seq: int


@dataclass(frozen=True)
class HigherTerm:
    """A peer answered with a newer term than this leader's: it must step down."""

    term: int
    source: str


Action = Union[Send, Committed, HigherTerm]


class LogReader(Protocol):
    """What the tracker reads from the leader's log (a :class:`CheckpointLog` is one)."""

    @property
    def first_seq(self) -> int: ...
    @property
    def last_position(self) -> tuple[int, int]: ...
    def read(self, from_seq: int, limit: int = 1000) -> list[Record]: ...
    def term_at(self, seq: int) -> int | None: ...
    @property
    def snapshot_position(self) -> tuple[int, int]: ...
    def snapshot_payload(self) -> bytes: ...


# -- leader side ------------------------------------------------------------------------------

_PROBE, _REPLICATE, _SNAPSHOT = "probe", "replicate", "snapshot"


@dataclass
class _Peer:
    name: str
    next_seq: int
    match_seq: int = 0
    mode: str = _PROBE
    last_sent: float = -math.inf
    last_heard: float = 0.0
    probe_out: bool = False  # a probe (or snapshot) awaits its answer
    snapshot: EncodedSnapshot | None = None  # the snapshot being streamed (mode _SNAPSHOT)
    snap_acked: int = 0  # bytes of it the shadow acknowledged
    snap_sent: int = 0  # bytes of it sent


class ReplicationTracker:
    """Leader side, one per term: who holds what, what to send next, what is committed."""

    def __init__(self, leader: str, term: int, shadows: Sequence[str], required_acks: int, log: LogReader, *,
                 window: int = 256, clock_now: float, heartbeat_s: float = 0.5, resend_s: float = 2.0,
                 max_batch: int = 256, chunk_bytes: int = CHUNK_BYTES, snapshot_window: int = 4) -> None:
        if len(set(shadows)) != len(shadows) or leader in shadows:
            raise ValueError(f"shadows = {list(shadows)!r} must be distinct and exclude the leader {leader!r}")
        if not 0 <= required_acks <= len(shadows):
            raise ValueError(f"required_acks = {required_acks!r} must be within 0..{len(shadows)} (shadows)")
        if window < 1 or max_batch < 1 or snapshot_window < 1:
            raise ValueError(f"window = {window!r}, max_batch = {max_batch!r} and snapshot_window = "
                             f"{snapshot_window!r} must be >= 1")
        if not 1 <= chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes = {chunk_bytes!r} must be within 1..{CHUNK_BYTES}")
        self.leader = leader
        self.term = term
        self.required_acks = required_acks
        self.window = window
        self.max_batch = max_batch
        self.heartbeat_s = heartbeat_s
        self.resend_s = resend_s
        self.chunk_bytes = chunk_bytes
        self.snapshot_window = snapshot_window
        self._log = log
        self._encoded: EncodedSnapshot | None = None  # the newest snapshot, encoded once
        self._local_seq = log.last_position[1]
        self._own_term_committed = False
        self.commit_seq = self._local_seq if required_acks == 0 else 0
        self._now = clock_now
        self._peers = {s: _Peer(s, self._local_seq + 1, last_heard=clock_now) for s in shadows}
        self.counters: Counter[str] = Counter()

    # -- inputs ---------------------------------------------------------------------------

    def on_appended(self, seq: int, now: float | None = None) -> list[Action]:
        """Records up to ``seq`` are durable in the leader's log: stream them out.

        ``now`` defaults to the latest time seen by ``tick``/``on_message``.
        """
        if now is not None:
            self._now = max(self._now, now)
        self._local_seq = max(self._local_seq, seq)
        actions = self._advance_commit()
        for peer in self._peers.values():
            if peer.mode == _REPLICATE and peer.next_seq <= self._local_seq and self._credit(peer) > 0:
                actions += self._send_append(peer, self._now)
            elif peer.mode == _PROBE and not peer.probe_out:
                actions += self._send_append(peer, self._now)
        return actions

    def on_message(self, msg: Message, now: float) -> list[Action]:
        """A LogAck, SnapshotAck or SnapshotRequest from a shadow."""
        self._now = max(self._now, now)
        if not isinstance(msg, (LogAck, SnapshotAck, SnapshotRequest)):
            self.counters["unexpected_message"] += 1
            return []
        peer = self._peers.get(msg.shadow)
        if peer is None:
            self.counters["unknown_shadow"] += 1
            return []
        if msg.term > self.term:
            self.counters["higher_term"] += 1
            return [HigherTerm(msg.term, msg.shadow)]
        if msg.term < self.term:
            self.counters["stale_term"] += 1
            return []
        peer.last_heard = now
        if isinstance(msg, SnapshotRequest):
            self.counters["snapshot_requests"] += 1
            return self._send_snapshot(peer, now)
        if isinstance(msg, SnapshotAck):
            return self._on_snapshot_ack(peer, msg, now)
        if not msg.ok:
            return self._on_reject(peer, msg.seq, now)
        seq = min(msg.seq, self._local_seq)
        raised = seq > peer.match_seq
        peer.match_seq = max(peer.match_seq, seq)
        if peer.mode != _REPLICATE:
            peer.mode, peer.probe_out, peer.snapshot = _REPLICATE, False, None
            peer.next_seq = peer.match_seq + 1
        peer.next_seq = max(peer.next_seq, peer.match_seq + 1)
        # only an ack that raised a match past the commit point can move it: heartbeat acks from
        # many shadows then cost O(1) each, not a pass over every shadow
        actions = self._advance_commit() if raised and seq > self.commit_seq else []
        if peer.next_seq <= self._local_seq and self._credit(peer) > 0:
            actions += self._send_append(peer, now)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Resend to silent shadows, probe unknown ones, heartbeat the rest."""
        self._now = max(self._now, now)
        actions: list[Action] = []
        for peer in self._peers.values():
            since_sent = now - peer.last_sent
            if peer.mode == _SNAPSHOT:
                if since_sent >= self.resend_s and now - peer.last_heard >= self.resend_s:
                    # chunks in flight and no answer: assume they were lost; resend from the acked offset
                    actions += self._resend_snapshot(peer, now)
            elif peer.mode == _PROBE:
                if not peer.probe_out or since_sent >= self.resend_s:
                    actions += self._send_append(peer, now)
            elif peer.next_seq - 1 > peer.match_seq and now - peer.last_heard >= self.resend_s \
                    and since_sent >= self.resend_s:
                # Records in flight and no answer: assume they were lost; resend (at most a window).
                self.counters["resends"] += 1
                peer.next_seq = peer.match_seq + 1
                actions += self._send_append(peer, now)
            elif since_sent >= self.heartbeat_s:
                actions += self._send_append(peer, now)
        return actions

    # -- queries --------------------------------------------------------------------------

    def shadow_positions(self) -> dict[str, int]:
        """Shadow -> highest seq it acknowledged as durable and matching."""
        return {name: p.match_seq for name, p in self._peers.items()}

    def in_flight(self) -> dict[str, int]:
        """Shadow -> records sent but not yet acknowledged (never above ``window``)."""
        return {name: max(0, p.next_seq - 1 - p.match_seq) if p.mode == _REPLICATE else 0
                for name, p in self._peers.items()}

    # -- internals ------------------------------------------------------------------------

    def _credit(self, peer: _Peer) -> int:
        return self.window - (peer.next_seq - 1 - peer.match_seq)

    def _advance_commit(self) -> list[Action]:
        if self.required_acks == 0:
            candidate = self._local_seq
        else:
            matches = sorted((p.match_seq for p in self._peers.values()), reverse=True)
            candidate = min(self._local_seq, matches[self.required_acks - 1])
        if candidate <= self.commit_seq:
            return []
        if self.required_acks and not self._own_term_committed:
            # Only a record of this term commits by counting acks (and with it all before it).
            if self._log.term_at(candidate) != self.term:
                return []
            self._own_term_committed = True
        self.commit_seq = candidate
        return [Committed(candidate)]

    def _on_reject(self, peer: _Peer, hint: int, now: float) -> list[Action]:
        self.counters["rejected"] += 1
        if peer.mode == _SNAPSHOT:
            return []  # an answer to an append sent before the snapshot
        if hint < peer.match_seq:
            # the shadow no longer holds what it acknowledged (it lost its log, a fresh disk):
            # start over from what it holds now (commit_seq never goes back, so this is safe)
            self.counters["shadow_regressed"] += 1
            peer.match_seq = hint
        peer.mode, peer.probe_out = _PROBE, False
        peer.next_seq = max(peer.match_seq + 1, min(peer.next_seq, hint + 1))
        return self._send_append(peer, now)

    def _send_append(self, peer: _Peer, now: float) -> list[Action]:
        if peer.next_seq < self._log.first_seq:
            return self._send_snapshot(peer, now)
        prev = peer.next_seq - 1
        try:
            prev_term = self._log.term_at(prev)
        except Compacted:
            return self._send_snapshot(peer, now)
        if prev_term is None:  # the shadow claims more than we hold: restart from our end
            peer.next_seq, prev = self._local_seq + 1, self._local_seq
            prev_term = self._log.term_at(prev) or 0
        count = min(self.max_batch, self._local_seq - prev, self._credit(peer) if peer.mode == _REPLICATE
                    else self.window)
        records = self._log.read(peer.next_seq, count) if count > 0 else []
        msg = LogAppend(term=self.term, leader=self.leader, prev_seq=prev, records=[r.to_dict() for r in records],
                        commit_seq=self.commit_seq, prev_term=prev_term)
        peer.last_sent = now
        if peer.mode == _REPLICATE:
            peer.next_seq += len(records)
        else:
            peer.probe_out = True
        self.counters["records_sent"] += len(records)
        return [Send(peer.name, msg)]

    def _snapshot(self) -> EncodedSnapshot:
        """The log's newest snapshot, encoded once per snapshot position and shared by every send."""
        term, seq = self._log.snapshot_position
        if self._encoded is None or (self._encoded.seq, self._encoded.term) != (seq, term):
            self._encoded = EncodedSnapshot.of(seq, term, self._log.snapshot_payload())
            self.counters["snapshots_encoded"] += 1
        return self._encoded

    def _send_snapshot(self, peer: _Peer, now: float) -> list[Action]:
        """Start streaming the newest snapshot to ``peer`` (from its first byte)."""
        peer.snapshot = self._snapshot()
        peer.mode, peer.probe_out = _SNAPSHOT, True
        peer.snap_acked = peer.snap_sent = 0
        peer.last_heard = now  # the resend timer runs from the start of the transfer
        self.counters["snapshots_sent"] += 1
        return self._send_chunks(peer, now)

    def _resend_snapshot(self, peer: _Peer, now: float) -> list[Action]:
        """Chunks in flight and no answer: resend from the acknowledged offset (the last chunk if
        all were acknowledged but no LogAck came); a newer snapshot instead if none was taken."""
        self.counters["snapshot_resends"] += 1
        snap = peer.snapshot
        if snap is None or (peer.snap_acked == 0 and self._log.snapshot_position != (snap.term, snap.seq)):
            return self._send_snapshot(peer, now)
        last_chunk = (snap.total - 1) // self.chunk_bytes * self.chunk_bytes
        peer.snap_sent = min(peer.snap_acked, last_chunk)
        return self._send_chunks(peer, now)

    def _on_snapshot_ack(self, peer: _Peer, msg: SnapshotAck, now: float) -> list[Action]:
        snap = peer.snapshot
        if peer.mode != _SNAPSHOT or snap is None or msg.seq != snap.seq or msg.received > snap.total:
            self.counters["stale_snapshot_acks"] += 1
            return []
        if msg.received < peer.snap_acked:
            self.counters["snapshot_restarts"] += 1  # the shadow dropped what it held: resend from there
            peer.snap_sent = msg.received
        peer.snap_acked = msg.received
        peer.snap_sent = max(peer.snap_sent, peer.snap_acked)
        return self._send_chunks(peer, now)

    def _send_chunks(self, peer: _Peer, now: float) -> list[Action]:
        """Chunks from ``snap_sent`` on, at most ``snapshot_window`` unacknowledged."""
        snap = peer.snapshot
        if snap is None:
            return []
        out: list[Action] = []
        limit = peer.snap_acked + self.snapshot_window * self.chunk_bytes
        while peer.snap_sent < min(snap.total, limit):
            data = snap.chunk(peer.snap_sent, self.chunk_bytes)
            out.append(Send(peer.name, SnapshotChunk(term=self.term, leader=self.leader, seq=snap.seq,
                                                     commit_seq=self.commit_seq, offset=peer.snap_sent,
                                                     total=snap.total, checksum=snap.checksum, data=data)))
            peer.snap_sent += len(data)
        if out:
            peer.last_sent = now
            self.counters["snapshot_chunks_sent"] += len(out)
        return out


# -- shadow side ------------------------------------------------------------------------------


class ShadowReplica:
    """Shadow side: keeps a durable copy of the leader's log and the state it describes.

    If the local log cannot be written (:class:`LogError`, e.g. :class:`LogFull`), the error
    propagates and the replica refuses further input: reopen the log and build a new replica.
    """

    def __init__(self, node: str, log: CheckpointLog, state: FabricState, *,
                 assembly: SnapshotAssembly | None = None) -> None:
        self.node = node
        self.log = log
        self.state = state
        self.highest_term = log.last_position[0]
        self.leader: str | None = None
        self.commit_seq = log.snapshot_position[1]
        self.counters: Counter[str] = Counter()
        self._failed: str | None = None
        self._assembly = assembly or SnapshotAssembly()
        self._done: tuple[int, str, int, int, int] | None = None  # the last transfer taken in full
        #: when (``now`` of the message) an append last showed this replica holding everything its
        #: leader had committed: a follower whose copy is that recent may answer from it
        self.synced_at: float | None = None

    @property
    def snapshot_bytes_held(self) -> int:
        """Bytes of a snapshot transfer in progress held in memory (at most its total)."""
        return self._assembly.received

    def on_message(self, msg: Message, now: float) -> list[Action]:
        """A LogAppend or SnapshotChunk from a leader."""
        if self._failed is not None:
            raise LogError(f"replica {self.node}: unusable after a log failure ({self._failed})")
        if not isinstance(msg, (LogAppend, SnapshotChunk)):
            self.counters["unexpected_message"] += 1
            return []
        if msg.term < self.highest_term:
            self.counters["stale_term_rejected"] += 1
            log.info("replica %s: rejected %s from %s with term %d < %d", self.node, type(msg).__name__,
                     msg.leader, msg.term, self.highest_term)
            return [self._ack(msg.leader, self.log.last_position[1], ok=False)]
        if msg.term > self.highest_term:
            self.highest_term = msg.term
        self.leader = msg.leader
        try:
            if isinstance(msg, SnapshotChunk):
                return self._on_snapshot(msg)
            return self._on_append(msg, now)
        except LogError as e:
            self._failed = str(e)
            raise

    def request_snapshot(self) -> list[Action]:
        """Ask the current leader (if known) for a snapshot, e.g. after losing the local log."""
        if self.leader is None:
            return []
        return [Send(self.leader, SnapshotRequest(term=self.highest_term, shadow=self.node))]

    def _ack(self, to: str, seq: int, *, ok: bool) -> Send:
        return Send(to, LogAck(term=self.highest_term, shadow=self.node, seq=seq, ok=ok))

    def _on_append(self, m: LogAppend, now: float) -> list[Action]:
        last = self.log.last_position[1]
        if m.prev_seq > last:
            self.counters["gaps"] += 1
            return [self._ack(m.leader, last, ok=False)]
        try:
            mine = self.log.term_at(m.prev_seq)
        except Compacted:
            mine = None  # inside our snapshot: committed, so it matches
        if mine is not None and mine != m.prev_term:
            self.counters["mismatches"] += 1
            return [self._ack(m.leader, m.prev_seq - 1, ok=False)]
        try:
            records = [Record.from_dict(r) for r in m.records]
        except StateError as e:
            self.counters["malformed"] += 1
            log.error("replica %s: dropped a malformed append from %s: %s", self.node, m.leader, e)
            return []
        for i, rec in enumerate(records):
            if rec.seq != m.prev_seq + 1 + i or rec.term > m.term:
                self.counters["malformed"] += 1
                log.error("replica %s: dropped an append from %s with record seq %d term %d out of place",
                          self.node, m.leader, rec.seq, rec.term)
                return []
        fresh = self._skip_known(records, m.leader)
        applied: list[Record] = []
        for rec in fresh:
            try:
                self.state.apply(rec)
            except StateError as e:
                self.counters["invalid_records"] += 1
                log.error("replica %s: leader %s sent a record this state refuses: %s", self.node, m.leader, e)
                break
            applied.append(rec)
        self.log.append(applied)  # durable before the ack below
        self.counters["records_appended"] += len(applied)
        verified = m.prev_seq + len(records) if len(applied) == len(fresh) else \
            (applied[-1].seq if applied else (fresh[0].seq - 1))
        actions: list[Action] = []
        commit = min(m.commit_seq, verified)
        if verified >= m.commit_seq:
            self.synced_at = now
        if commit > self.commit_seq:
            self.commit_seq = commit
            actions.append(Committed(commit))
        actions.append(self._ack(m.leader, verified, ok=True))
        return actions

    def _skip_known(self, records: list[Record], leader: str) -> list[Record]:
        """Drop records we already hold; cut our tail where it conflicts."""
        last = self.log.last_position[1]
        snap_seq = self.log.snapshot_position[1]
        overlap = [r for r in records if snap_seq < r.seq <= last]  # below snap_seq: committed, equal
        held = self.log.read(overlap[0].seq, len(overlap)) if overlap else []
        for theirs, mine in zip(overlap, held):
            if theirs.term == mine.term:
                continue
            cut = theirs.seq - 1
            if theirs.seq <= self.commit_seq:
                log.error("replica %s: leader %s conflicts with committed seq %d (term %d here, %d there)",
                          self.node, leader, theirs.seq, mine.term, theirs.term)
            log.warning("replica %s: dropping conflicting records %d..%d (term %d) for leader %s (term %d)",
                        self.node, theirs.seq, last, mine.term, leader, theirs.term)
            self.counters["truncations"] += 1
            self.log.truncate_after(cut)  # cut >= our snapshot's seq: overlap starts above it
            self.state = self.log.state_at(cut)
            return [r for r in records if r.seq > cut]
        return [r for r in records if r.seq > last]

    def _on_snapshot(self, m: SnapshotChunk) -> list[Action]:
        key = (m.term, m.leader, m.seq, m.total, m.checksum)
        if key == self._done:  # a resend of a transfer already taken: its LogAck was lost
            return [Send(m.leader, SnapshotAck(term=self.highest_term, shadow=self.node, seq=m.seq,
                                               received=m.total)),
                    self._ack(m.leader, m.seq, ok=True)]
        got = self._assembly.add(m.term, m.leader, m.seq, m.total, m.checksum, m.offset, m.data)
        self.counters[f"snapshot_chunks_{got.status}"] += 1
        if got.status in ("invalid", "corrupt"):
            log.error("replica %s: snapshot chunk from %s (seq %d, offset %d) refused: %s", self.node, m.leader,
                      m.seq, m.offset, got.reason)
        if got.status == "stale" or (got.status == "invalid" and self._assembly.key != key):
            return []  # not about the transfer in progress: nothing to acknowledge
        if got.status != "complete" or got.data is None:
            return [Send(m.leader, SnapshotAck(term=self.highest_term, shadow=self.node, seq=m.seq,
                                               received=got.received))]
        return self._install(m, got.data)

    def _install(self, m: SnapshotChunk, data: bytes) -> list[Action]:
        """A whole snapshot arrived with its checksum right: install it unless we hold it already."""
        try:
            snap_state = decode_snapshot(data)
            if snap_state.last_seq != m.seq:
                raise StateError(f"snapshot holds seq {snap_state.last_seq}, its chunks say {m.seq}")
        except StateError as e:
            self.counters["malformed"] += 1
            log.error("replica %s: dropped a malformed snapshot from %s: %s", self.node, m.leader, e)
            return []
        self._done = (m.term, m.leader, m.seq, m.total, m.checksum)
        last = self.log.last_position[1]
        have = False
        if m.seq <= last:
            try:
                have = self.log.term_at(m.seq) == snap_state.last_term
            except Compacted:
                have = True  # below our own snapshot: committed, so the same
        if not have:
            self.state = self.log.install_snapshot(snap_state.to_snapshot())
            self.counters["snapshots_installed"] += 1
        actions: list[Action] = [Send(m.leader, SnapshotAck(term=self.highest_term, shadow=self.node, seq=m.seq,
                                                            received=m.total))]
        if m.seq > self.commit_seq:
            self.commit_seq = m.seq
            actions.append(Committed(m.seq))
        actions.append(self._ack(m.leader, m.seq, ok=True))
        return actions
