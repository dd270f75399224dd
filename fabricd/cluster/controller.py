"""The cluster side of one daemon: lease, membership, checkpoint log and its replication.

No sockets: the daemon feeds it peer messages and the time, and sends the ``(peer, message)``
pairs it returns. It owns the durable state (``FabricState`` in the checkpoint log) and is the
only writer of it: the leader proposes records (job submitted, role assigned, sample skipped,
trainer progress), followers take them from the leader through :class:`ShadowReplica`, which
rejects anything from an older term (fencing).

Every daemon is a replica; ``required_acks`` of them must hold a record before it is
committed. The daemon acts on ``state`` level-triggered (which jobs exist, which roles are
assigned to it), so a replica that installs a snapshot after a gap needs no special path.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config import NodeConfig
from .lease import BecameLeader, LeaderChanged, LeaseBackend, Send, SteppedDown
from .lease_backends import make_lease
from .log import CheckpointLog, LogError, LogFull
from .membership import MemberBeat, Membership
from .replication import Committed, HigherTerm, ReplicationTracker, ShadowReplica
from .replication import LogAck, LogAppend, SnapshotAck, SnapshotChunk, SnapshotRequest
from .state import FabricState, Record
from .term_store import FileTermStore

__all__ = ["ClusterController", "NotLeader"]

log = logging.getLogger(__name__)

COMPACT_EVERY = 2000  # committed records between snapshots
SYNC_SLACK_S = 0.5  # one replication heartbeat (ReplicationTracker.heartbeat_s): appends arrive this often


class NotLeader(Exception):
    """A decision was asked of a daemon that does not hold the lease."""

    def __init__(self, leader: str | None, endpoint: str | None) -> None:
        self.leader, self.endpoint = leader, endpoint
        super().__init__(f"not the leader; the leader is {leader or 'unknown'}"
                         + (f" at {endpoint}" if endpoint else ""))


class ClusterController:
    """Lease + membership + log + replication for the daemon ``cfg.node_id``."""

    def __init__(self, cfg: NodeConfig, *, now: float, cpus: int = 0) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.cpus = cpus  # this node's logical CPUs, in every beat (0: not reported)
        self.node = cfg.node_id
        self.incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.peers = [p.node_id for p in c.peers if p.node_id != self.node]
        self.log = CheckpointLog(Path(cfg.state_dir) / "log")
        self.state: FabricState = self.log.open()
        self.lease: LeaseBackend = make_lease(cfg, FileTermStore(Path(cfg.state_dir) / "term.json"),
                                              log_position=lambda: self.log.last_position, now=now)
        self.members = Membership(self.node, [p.node_id for p in c.peers], heartbeat_s=cfg.heartbeat_s,
                                  missed_beats=c.missed_beats)
        self.replica = ShadowReplica(self.node, self.log, self.state)
        self.tracker: ReplicationTracker | None = None
        self.commit_seq = 0 if len(c.peers) > 1 else self.state.last_seq
        self.leader_since: float | None = None
        self.started_at = now
        self.counters = {"stale_term_rejected": 0, "log_full": 0, "elections_won": 0, "step_downs": 0,
                         "leader_changes": 0}
        self._next_beat = now
        self._last_compact = self.state.last_seq

    # -- queries --------------------------------------------------------------------------------

    def is_leader(self, now: float) -> bool:
        return self.tracker is not None and self.lease.is_leader(now)

    @property
    def term(self) -> int:
        return self.lease.term

    @property
    def leader(self) -> str | None:
        return self.lease.leader

    def leader_endpoint(self) -> str | None:
        leader = self.lease.leader
        return self.cfg.cluster.peer(leader).control if leader else None

    def in_touch(self, now: float) -> bool:
        """Whether this daemon's copy of the state is current enough to answer from: it leads, or
        an append from its leader within ``lease_duration_s`` (plus one replication heartbeat)
        found it holding everything the leader had committed. A daemon cut off by a partition, or
        catching up after one, is not: it must not hand out plans or constructor endpoints from a
        state that may lack a newer role move or skip record."""
        if self.is_leader(now) or not self.peers:
            return True
        synced = self.replica.synced_at
        return synced is not None and now - synced <= self.cfg.cluster.lease_duration_s + SYNC_SLACK_S

    def settled(self, now: float) -> bool:
        """True once this daemon has run long enough to have heard every live member's beat."""
        return not self.peers or now - self.started_at >= self.members.timeout_s

    # -- time and messages ----------------------------------------------------------------------

    def tick(self, now: float, *, telemetry: Callable[[], dict], roles: Callable[[], dict]) -> list[tuple[str, Any]]:
        """Advance the lease and replication to ``now``; beat when due (``telemetry()`` and
        ``roles()`` are only called then: they cost a psutil sweep)."""
        out = self._lease_actions(self.lease.tick(now), now)
        if self.tracker is not None:
            out += self._repl_actions(self.tracker.tick(now), now)
        if now >= self._next_beat:
            self._next_beat = now + self.cfg.heartbeat_s
            telemetry, roles = telemetry(), roles()
            beat = MemberBeat(node=self.node, incarnation=self.incarnation, term=self.lease.term,
                              leader=self.lease.leader or "", telemetry=telemetry, roles=roles, cpus=self.cpus)
            self.members.on_beat(self.node, incarnation=self.incarnation, term=beat.term, leader=beat.leader,
                                 telemetry=telemetry, roles=roles, now=now, cpus=self.cpus)
            out += [(p, beat) for p in self.peers]
        self._maybe_compact()
        return out

    def on_peer(self, msg: Any, now: float) -> list[tuple[str, Any]]:
        if isinstance(msg, MemberBeat):
            if self.members.on_beat(msg.node, incarnation=msg.incarnation, term=msg.term, leader=msg.leader or None,
                                    telemetry=msg.telemetry, roles=msg.roles, now=now, cpus=msg.cpus):
                log.warning("member %s restarted (incarnation %s)", msg.node, msg.incarnation)
            return []
        if isinstance(msg, (LogAppend, SnapshotChunk)):
            if msg.term < self.lease.term:
                # fencing by the term this node has seen anywhere (it is persisted by the lease), not
                # only by what the replica saw: a fresh replica after a step-down, or a message queued
                # by a partitioned old leader and delivered after the heal, must not rewrite the log
                self.counters["stale_term_rejected"] += 1
                return []
            before = self.replica.counters.get("stale_term_rejected", 0)
            actions = self.replica.on_message(msg, now)
            self.counters["stale_term_rejected"] += self.replica.counters.get("stale_term_rejected", 0) - before
            self.state = self.replica.state
            self.commit_seq = max(self.commit_seq, self.replica.commit_seq)
            return self._repl_actions(actions, now)
        if isinstance(msg, (LogAck, SnapshotAck, SnapshotRequest)):
            if self.tracker is None:
                return []
            return self._repl_actions(self.tracker.on_message(msg, now), now)
        return self._lease_actions(self.lease.on_message(msg, now), now)

    def release_lease(self, now: float) -> list[tuple[str, Any]]:
        """Stop leading now and tell the peers, so a shadow takes over without waiting out the
        lease (a clean shutdown); nothing when this daemon does not lead."""
        return self._lease_actions(self.lease.release(now, "shutting down: lease released"), now)

    # -- decisions (leader only) ----------------------------------------------------------------

    def propose(self, entries: Iterable[tuple[str, dict]], now: float) -> list[tuple[str, Any]]:
        """Append records (kind, data) as leader: applied, fsync'd, then replicated.

        Raises NotLeader when this daemon cannot prove it holds the lease, LogFull (after
        resigning the lease) when the log cannot be written, StateError for an invalid record.
        """
        if not self.is_leader(now):
            raise NotLeader(self.lease.leader, self.leader_endpoint())
        term, seq = self.lease.term, self.state.last_seq
        records = []
        # applied as validated (each apply is all-or-nothing); should a later record or the log
        # write fail, the state is rebuilt from the log: O(state) only then, not on every proposal
        try:
            for kind, data in entries:
                seq += 1
                rec = Record(term=term, seq=seq, kind=kind, data=data)
                self.state.apply(rec)
                records.append(rec)
            if records:
                self.log.append(records)
        except LogFull:
            self._undo(records)
            self.counters["log_full"] += 1
            log.error("checkpoint log is full: stepping down rather than run unlogged")
            out = self._lease_actions(self.lease.resign(now, "checkpoint log disk full"), now)
            raise LogFull(f"log full; resigned the lease ({len(out)} messages pending)") from None
        except BaseException:
            self._undo(records)
            raise
        if not records:
            return []
        out = self._repl_actions(self.tracker.on_appended(seq, now), now)
        self.commit_seq = max(self.commit_seq, self.tracker.commit_seq)
        return out

    # -- internals ------------------------------------------------------------------------------

    def _undo(self, applied: list[Record]) -> None:
        """Take back records applied to the state but not logged: the state is the log's again."""
        if applied:
            self.state = self.log.state_at(self.log.last_position[1])
            self.replica.state = self.state

    def _lease_actions(self, actions: list, now: float) -> list[tuple[str, Any]]:
        out = []
        for a in actions:
            if isinstance(a, Send):
                out.append((a.to, a.msg))
            elif isinstance(a, BecameLeader):
                out += self._become_leader(a.term, now)
            elif isinstance(a, SteppedDown):
                self.counters["step_downs"] += 1
                self.tracker, self.leader_since = None, None
                self.replica = ShadowReplica(self.node, self.log, self.state)
            elif isinstance(a, LeaderChanged):
                self.counters["leader_changes"] += 1
                log.info("leader is now %s (term %d)", a.leader, a.term)
        return out

    def _become_leader(self, term: int, now: float) -> list[tuple[str, Any]]:
        self.counters["elections_won"] += 1
        self.leader_since = now
        required = min(self.cfg.cluster.required_acks, len(self.peers))
        self.tracker = ReplicationTracker(self.node, term, self.peers, required, self.log, clock_now=now)
        log.info("%s leads term %d from log position %s", self.node, term, self.log.last_position)
        # a record of its own term lets earlier records commit (Raft's rule)
        return self.propose([("member_seen", {"node": self.node, "endpoint": self.cfg.cluster.peer(self.node).control})],
                            now)

    def _repl_actions(self, actions: list, now: float) -> list[tuple[str, Any]]:
        out = []
        for a in actions:
            if isinstance(a, Send):
                out.append((a.to, a.msg))
            elif isinstance(a, Committed):
                self.commit_seq = max(self.commit_seq, a.seq)
            elif isinstance(a, HigherTerm):
                log.warning("shadow %s is in term %d; stepping down", a.source, a.term)
                out += self._lease_actions(self.lease.resign(now, f"higher term {a.term} at {a.source}"), now)
        return out

    def _maybe_compact(self) -> None:
        if self.commit_seq - self._last_compact >= COMPACT_EVERY:
            try:
                self.log.compact_upto(self.commit_seq)
                self._last_compact = self.commit_seq
            except LogError as e:
                log.error("log compaction failed: %s", e)

    def status(self, now: float) -> dict[str, Any]:
        """Lease, log, replicas, members, counters; ``degraded`` says why this daemon cannot vote
        or lead (its term store fails: a full or read-only disk; the etcd lease backend cannot
        reach etcd), else None."""
        lease = self.lease.status(now)
        store_error, etcd_error = lease.get("store_error"), lease.get("etcd_error")
        return {
            "degraded": f"term store: {store_error}" if store_error else f"etcd: {etcd_error}" if etcd_error else None,
            "lease": lease,
            "log": {"last": list(self.log.last_position), "first_seq": self.log.first_seq,
                    "commit_seq": self.commit_seq},
            "replicas": self.tracker.shadow_positions() if self.tracker is not None else {},
            "in_touch": self.in_touch(now),
            "members": self.members.status(now),
            "counters": dict(self.counters),
        }
