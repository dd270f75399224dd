"""The lease: which daemon leads, in which term, and until when it provably does.

:class:`LeaseElection` is a pure state machine (no sockets, threads, sleeps or clock reads):
the owner feeds it the time (``time.monotonic()``) and the lease messages that arrived, and it
returns actions — messages to send and leadership changes. It combines a Raft-style election
(terms, one persisted vote per term, a candidate whose log is behind is refused), etcd's
pre-vote (a node only raises the term once a majority would vote for it) and Kubernetes
leader-election timing (``lease_duration`` / ``renew_deadline`` / ``retry_period``).

Protocol
    A follower that has granted nothing (no renew acked, no vote given) for
    ``lease_duration_s`` + jitter in [0, ``retry_period_s``) sends a *pre-vote*
    (``VoteRequest(term+1, pre_vote=True)``) without touching its term or store. A voter grants a
    pre-vote iff it granted nothing for ``lease_duration_s``, the candidate's log is at least as
    up to date as its own and the requested term is above its own. With a majority of pre-votes
    the node saves (term+1, itself) and asks for real votes. A voter grants a real vote iff it did
    not vote for another node in that term, the candidate's log is at least as up to date, and it
    did not grant a lease or vote to a *different* node within ``lease_duration_s`` (lease
    stickiness); the vote is saved before the reply is returned. The winner sends ``LeaseRenew``
    every ``retry_period_s``; voters ack any renew whose term is not older than theirs.

Release (a clean shutdown)
    A leader that stops on purpose steps down first and then sends ``LeaseRelease(term,
    itself)``. A voter that receives it for its current term forgets its grant to that node (its
    stickiness ends: the lease it granted is over, since the leader no longer claims it) and
    campaigns after a jitter rather than a lease, so a shadow leads at once. A release of an
    older term is rejected like any stale message; one from a node the voter did not grant to
    changes no grant. A renew reordered after the release only re-grants to the old leader,
    which delays the election and never overlaps two leases.

Lease validity
    Renew ``r`` is sent at leader time ``t_s(r)``. Once a majority (the leader counts itself)
    acked it, the lease is valid until ``t_s(r) + renew_deadline_s``; right after the election it
    is valid until (time the real VoteRequests were sent) + ``renew_deadline_s``, the votes being
    grants. :meth:`LeaseElection.is_leader` is true only before that instant, and the first
    ``tick``/``on_message`` at or past it steps down — a leader that was SIGSTOPped past its lease
    sees ``is_leader() == False`` at its very first call after waking.

Timing argument (why two leases never overlap)
    A voter that granted at its local time ``t_v`` (it acked renew ``r``, so ``t_v`` is after
    the send, ``t_v >= t_s``) refuses votes to every other candidate until its clock reads
    ``t_v + lease_duration``. Any later leader needs a majority of votes, and every majority
    shares a voter with the majority that acked ``r``; so that later leader cannot exist before
    the shared voter's refusal ends, ``lease_duration / rate_v`` real seconds after the grant. The
    old leader stops claiming the lease ``renew_deadline / rate_l`` real seconds after the send.
    The leases are disjoint if ``lease_duration / rate_v > renew_deadline / rate_l``, which holds
    whenever the clock rates differ by less than ``(lease_duration - renew_deadline) /
    lease_duration`` of the voter's rate (35% with the defaults). Message delay only makes the
    voter's window start later, which is on the safe side; clock *offsets* do not matter because
    each node only compares its own monotonic readings. The same argument covers the first lease
    after an election (votes are grants made after the VoteRequest was sent) and the leader's own
    vote (it records a grant to itself at each renew it sends). A node that restarts does not
    know whom it granted before the crash, so it refuses every vote and pre-vote for
    ``lease_duration_s`` after start. Two leaders in one term are impossible because a vote is
    persisted before it is sent and a voter votes once per term.

Fencing
    Every message carries a term. A message with a higher term makes this node adopt it (saved,
    with no vote) and, if it was leading or campaigning, step down; a message with an older term
    is rejected and counted in ``status()["stale_rejected"]``. Pre-vote requests never change the
    receiver's term.

Store failures (a full or read-only disk)
    A :class:`~fabricd.cluster.term_store.TermStoreError` does not escape ``tick`` /
    ``on_message``: the save that failed aborts its handler, so nothing that depended on it is
    sent (no vote, no VoteRequest, no ack in a term that is not persisted); a leader steps down,
    a candidate returns to follower, and the actions produced before the failure are returned.
    The node stays a follower — it cannot vote or lead without persisting its term — and does
    not campaign for ``lease_duration_s`` after a failure. ``status()["store_error"]`` says why
    until a save succeeds again; while it is set, ``tick`` re-saves the current term every
    ``lease_duration_s`` as a probe, so the node recovers by itself once the disk has room. The
    failure is logged once, then at most every ``STORE_ERROR_LOG_EVERY_S``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fabricd.cluster.lease_messages import (
    Action,
    BecameLeader,
    LeaderChanged,
    LeaseAck,
    LeaseConfig,
    LeaseMessage,
    LeaseRelease,
    LeaseRenew,
    Send,
    SteppedDown,
    VoteReply,
    VoteRequest,
)
from fabricd.cluster.term_store import TermStore, TermStoreError

logger = logging.getLogger(__name__)

__all__ = [
    "FOLLOWER", "PRE_CANDIDATE", "CANDIDATE", "LEADER",
    "LeaseConfig",
    "VoteRequest", "VoteReply", "LeaseRenew", "LeaseAck", "LeaseRelease", "LeaseMessage",
    "Send", "BecameLeader", "SteppedDown", "LeaderChanged", "Action",
    "LeaseBackend", "LeaseElection",
]

FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"
#: Seconds between repeated log lines about a term store that keeps failing.
STORE_ERROR_LOG_EVERY_S = 60.0


class _StoreFailed(Exception):
    """A save failed (already recorded): abort the handler, send nothing that depended on it."""


class LeaseBackend(Protocol):
    """What the daemon needs from a lease, whoever implements it (this election, or etcd)."""

    @property
    def term(self) -> int:
        """The current term: the fencing token of everything the leader issues."""
        ...

    @property
    def leader(self) -> str | None:
        """The leader this node believes in, or None."""
        ...

    def tick(self, now: float) -> list[Action]:
        """Advance to monotonic time ``now``; called at least every ``retry_period_s``."""
        ...

    def on_message(self, msg: LeaseMessage, now: float) -> list[Action]:
        """Handle one lease message that arrived at ``now``."""
        ...

    def is_leader(self, now: float) -> bool:
        """True only while this node provably holds the lease at ``now``."""
        ...

    def resign(self, now: float, reason: str) -> list[Action]:
        """Give the lease up at once (e.g. the log disk is full)."""
        ...

    def release(self, now: float, reason: str) -> list[Action]:
        """Give the lease up at once and tell the voters, so another node leads without waiting
        out the lease (a clean shutdown)."""
        ...

    def status(self) -> dict[str, Any]:
        """A JSON-typed summary for operators (role, term, leader, lease remaining, counters)."""
        ...


class LeaseView:
    """What both lease backends expose the same way: identity, role, term, leader, whether this
    node leads now, and a clock that never goes backwards. Subclasses set ``_node_id``,
    ``_role``, ``_term``, ``_leader``, ``_lease_expires_at`` and ``_now``."""

    _node_id: str
    _role: str
    _term: int
    _leader: str | None
    _lease_expires_at: float | None
    _now: float

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def role(self) -> str:
        """``follower``, ``pre_candidate``, ``candidate`` or ``leader``."""
        return self._role

    @property
    def term(self) -> int:
        return self._term

    @property
    def leader(self) -> str | None:
        return self._leader

    def is_leader(self, now: float) -> bool:
        """True iff this node leads and ``now`` is before the lease's proven expiry."""
        now = self._clock(now)
        return self._role == LEADER and self._lease_expires_at is not None and now < self._lease_expires_at

    def _clock(self, now: float) -> float:
        """``now``, or the latest time seen if it went backwards."""
        if now > self._now:
            self._now = now
        return self._now


class LeaseElection(LeaseView):
    """One daemon's view of the lease. Feed it time and messages; it returns actions.

    ``voters`` are the configured voter ids; ``node_id`` need not be one (a non-voter follows
    and acks but never campaigns or votes). ``log_position()`` returns this node's
    (last log term, last log seq), compared lexicographically with a candidate's. ``now`` is the
    caller's ``time.monotonic()``; times that go backwards are treated as the latest time seen.
    """

    def __init__(self, node_id: str, voters: Sequence[str], config: LeaseConfig, store: TermStore,
                 log_position: Callable[[], tuple[int, int]], now: float,
                 rng: random.Random | None = None) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"lease: node_id = {node_id!r}: must be a non-empty string")
        voters = tuple(voters)
        if not voters:
            raise ValueError("lease: voters = (): at least one voter is needed")
        bad = [v for v in voters if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"lease: voters = {list(voters)!r}: {bad[0]!r} is not a non-empty string")
        if len(set(voters)) != len(voters):
            raise ValueError(f"lease: voters = {list(voters)!r}: duplicate voter ids")
        self._node_id = node_id
        self._voters = voters
        self._voter_set = frozenset(voters)
        self._others = tuple(v for v in voters if v != node_id)
        self._is_voter = node_id in self._voter_set
        self._alone = voters == (node_id,)
        self._majority = len(voters) // 2 + 1
        self._config = config
        self._store = store
        self._log_position = log_position
        self._rng = rng if rng is not None else random.Random()

        term, voted_for = store.load()
        self._term = term
        self._voted_for = voted_for
        self._role = FOLLOWER
        self._leader: str | None = None
        self._leader_seen_at = now
        self._announced: tuple[int, str | None] = (term, None)
        self._now = now
        self._pending: list[Action] = []

        # The last grant (renew acked, vote given, or own renew/vote) and to whom. After a start
        # we do not know whom we granted before a crash: holder None blocks everyone for a lease.
        self._granted_at: float | None = None if self._alone else now
        self._grant_holder: str | None = None
        self._next_campaign_at = now + self._jitter()

        # campaign (pre-vote or vote)
        self._phase_deadline = now
        self._grants: set[str] = set()
        self._refusals: set[str] = set()
        self._votes_sent_at = now

        # leadership
        self._lease_expires_at: float | None = None
        self._renew_id = 0
        self._renews: dict[int, tuple[float, set[str]]] = {}
        self._next_renew_at = now

        self._hold_until = now  # no campaign before this (set by resign, or a store failure)
        self._store_error: str | None = None
        self._store_error_logged_at: float | None = None
        self._store_probe_at = now
        self._stale_rejected = 0
        self._pre_votes_started = 0
        self._elections_started = 0
        if not self._alone:
            self._next_campaign_at += config.lease_duration_s

    # --- read-only view ------------------------------------------------------------------------

    @property
    def voted_for(self) -> str | None:
        return self._voted_for

    def lease_expires_at(self) -> float | None:
        """The monotonic time the current lease ends (leader only, else None)."""
        return self._lease_expires_at if self._role == LEADER else None

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Role, term, leader, vote, lease and counters, as of ``now`` (default: latest time seen)."""
        at = self._now if now is None else max(now, self._now)
        expires = self.lease_expires_at()
        return {
            "node_id": self._node_id,
            "voter": self._is_voter,
            "voters": list(self._voters),
            "role": self._role,
            "term": self._term,
            "leader": self._leader,
            "voted_for": self._voted_for,
            "is_leader": self._role == LEADER and expires is not None and at < expires,
            "lease_expires_at": expires,
            "lease_remaining_s": None if expires is None else max(0.0, expires - at),
            "granted_to": self._grant_holder,
            "last_grant_age_s": None if self._granted_at is None else at - self._granted_at,
            "stale_rejected": self._stale_rejected,
            "pre_votes_started": self._pre_votes_started,
            "elections_started": self._elections_started,
            "store_error": self._store_error,
        }

    # --- inputs --------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Advance time: expire the lease or a campaign, renew, or start a campaign when due."""
        return self._run(now, self._on_tick, None)

    def on_message(self, msg: LeaseMessage, now: float) -> list[Action]:
        """Handle one lease message received at ``now``."""
        if isinstance(msg, VoteRequest):
            handler = self._on_vote_request
        elif isinstance(msg, VoteReply):
            handler = self._on_vote_reply
        elif isinstance(msg, LeaseRenew):
            handler = self._on_renew
        elif isinstance(msg, LeaseAck):
            handler = self._on_ack
        elif isinstance(msg, LeaseRelease):
            handler = self._on_release
        else:
            raise TypeError(f"lease: not a lease message: {type(msg).__name__}")
        return self._run(now, handler, msg)

    def resign(self, now: float, reason: str) -> list[Action]:
        """Give the lease up now (e.g. the log disk is full) and campaign again only after a lease."""
        return self._run(now, self._on_resign, reason)

    def _on_resign(self, reason: str, now: float, out: list[Action]) -> None:
        if self._role == LEADER:
            self._step_down(now, reason, out)
        self._hold_until = now + self._config.lease_duration_s
        self._next_campaign_at = self._hold_until + self._jitter()

    def release(self, now: float, reason: str) -> list[Action]:
        """Step down now and send ``LeaseRelease`` to the other voters: they forget their grant
        to this node and campaign after a jitter instead of a lease. This node campaigns again
        only after a lease (it is going away); it may still vote for a successor. Safe because
        it stopped claiming the lease before the release left. Not leading: nothing is sent."""
        return self._run(now, self._on_release_own, reason)

    def _on_release_own(self, reason: str, now: float, out: list[Action]) -> None:
        if self._role == LEADER:
            term = self._term
            self._step_down(now, reason, out)
            release = LeaseRelease(term=term, leader=self._node_id)
            out.extend(Send(v, release) for v in self._others)
            if self._grant_holder == self._node_id:
                self._granted_at, self._grant_holder = None, None
        self._hold_until = now + self._config.lease_duration_s
        self._next_campaign_at = self._hold_until + self._jitter()

    def _run(self, now: float, handler: Callable[..., None], msg: Any) -> list[Action]:
        now = self._clock(now)
        out, self._pending = self._pending, []
        try:
            self._expire(now, out)
            if msg is None:
                handler(now, out)
            else:
                handler(msg, now, out)
        except _StoreFailed:
            if self._role == LEADER:
                self._step_down(now, f"term store failure: {self._store_error}", out)
            elif self._role != FOLLOWER:
                self._to_follower(now)
        except BaseException:
            if self._role == LEADER:
                self._step_down(now, "error while leading (term store failure?)", out)
            elif self._role != FOLLOWER:
                self._to_follower(now)
            self._announce(out)
            self._pending = out
            raise
        self._announce(out)
        return out

    # --- time ----------------------------------------------------------------------------------

    def _jitter(self) -> float:
        return self._rng.random() * self._config.retry_period_s

    def _expire(self, now: float, out: list[Action]) -> None:
        if self._role == LEADER:
            if self._lease_expires_at is None or now >= self._lease_expires_at:
                self._step_down(now, "lease expired", out)
        elif self._role in (PRE_CANDIDATE, CANDIDATE) and now >= self._phase_deadline:
            logger.info("lease: %s %s timed out in term %d", self._node_id,
                        "pre-vote" if self._role == PRE_CANDIDATE else "election", self._term)
            self._to_follower(now)
        if (self._role == FOLLOWER and self._leader is not None
                and now >= self._leader_seen_at + self._config.lease_duration_s):
            self._leader = None

    def _save(self, term: int, voted_for: str | None, now: float) -> None:
        """Persist (term, voted_for), or record why not and raise _StoreFailed."""
        try:
            self._store.save(term, voted_for)
        except TermStoreError as e:
            first = self._store_error is None
            self._store_error = e.reason
            self._store_probe_at = now + self._config.lease_duration_s
            self._hold_until = max(self._hold_until, now + self._config.lease_duration_s)
            self._next_campaign_at = max(self._next_campaign_at, self._hold_until + self._jitter())
            if first or self._store_error_logged_at is None or now - self._store_error_logged_at >= STORE_ERROR_LOG_EVERY_S:
                self._store_error_logged_at = now
                logger.error("lease: %s cannot persist its term (%s): it stays a follower and neither votes nor "
                             "leads until the term store works again", self._node_id, e)
            raise _StoreFailed() from e
        if self._store_error is not None:
            logger.warning("lease: %s: the term store works again (%s was the last error)",
                           self._node_id, self._store_error)
            self._store_error = None
            self._store_error_logged_at = None

    def _on_tick(self, now: float, out: list[Action]) -> None:
        if self._store_error is not None and now >= self._store_probe_at:
            self._save(self._term, self._voted_for, now)   # a probe: clears the error once the disk has room
        if self._role == LEADER:
            if now >= self._next_renew_at:
                self._send_renew(now, out)
        elif self._role == FOLLOWER and self._is_voter and now >= self._hold_until and (
                self._alone or now >= self._next_campaign_at):
            self._start_pre_vote(now, out)

    # --- grants --------------------------------------------------------------------------------

    def _record_grant(self, holder: str, now: float) -> None:
        self._granted_at = now
        self._grant_holder = holder
        self._next_campaign_at = now + self._config.lease_duration_s + self._jitter()

    def _granted_recently(self, now: float) -> bool:
        return self._granted_at is not None and now - self._granted_at < self._config.lease_duration_s

    def _log_ok(self, msg: VoteRequest) -> bool:
        return (msg.last_log_term, msg.last_log_seq) >= tuple(self._log_position())

    # --- campaigning ---------------------------------------------------------------------------

    def _request(self, pre_vote: bool) -> VoteRequest:
        last_term, last_seq = self._log_position()
        term = self._term + 1 if pre_vote else self._term
        return VoteRequest(term=term, candidate=self._node_id, last_log_term=last_term,
                           last_log_seq=last_seq, pre_vote=pre_vote)

    def _start_pre_vote(self, now: float, out: list[Action]) -> None:
        self._pre_votes_started += 1
        self._role = PRE_CANDIDATE
        self._leader = None
        self._phase_deadline = now + self._config.renew_deadline_s
        self._grants = {self._node_id}
        self._refusals = set()
        request = self._request(pre_vote=True)
        out.extend(Send(v, request) for v in self._others)
        self._tally(now, out)

    def _start_election(self, now: float, out: list[Action]) -> None:
        term = self._term + 1
        self._save(term, self._node_id, now)           # durable before any VoteRequest leaves
        self._term, self._voted_for = term, self._node_id
        self._elections_started += 1
        logger.info("lease: %s campaigns in term %d", self._node_id, term)
        self._role = CANDIDATE
        self._record_grant(self._node_id, now)
        self._votes_sent_at = now
        self._phase_deadline = now + self._config.renew_deadline_s
        self._grants = {self._node_id}
        self._refusals = set()
        request = self._request(pre_vote=False)
        out.extend(Send(v, request) for v in self._others)
        self._tally(now, out)

    def _tally(self, now: float, out: list[Action]) -> None:
        if len(self._grants) >= self._majority:
            if self._role == PRE_CANDIDATE:
                self._start_election(now, out)
            else:
                self._become_leader(now, out)
        elif len(self._refusals) > len(self._voters) - self._majority:
            self._to_follower(now)

    def _become_leader(self, now: float, out: list[Action]) -> None:
        logger.info("lease: %s leads term %d", self._node_id, self._term)
        self._role = LEADER
        self._leader = self._node_id
        self._leader_seen_at = now
        self._lease_expires_at = self._votes_sent_at + self._config.renew_deadline_s
        self._renews = {}
        out.append(BecameLeader(self._term))
        self._send_renew(now, out)

    def _send_renew(self, now: float, out: list[Action]) -> None:
        self._renew_id += 1
        rid = self._renew_id
        self._record_grant(self._node_id, now)          # the leader's own ack
        deadline = self._config.renew_deadline_s
        self._renews = {r: v for r, v in self._renews.items() if v[0] + deadline > now}
        self._renews[rid] = (now, {self._node_id})
        self._next_renew_at = now + self._config.retry_period_s
        renew = LeaseRenew(term=self._term, leader=self._node_id, renew_id=rid)
        out.extend(Send(v, renew) for v in self._others)
        self._count_acks(rid)

    def _count_acks(self, rid: int) -> None:
        sent_at, ackers = self._renews[rid]
        if len(ackers) >= self._majority and self._lease_expires_at is not None:
            self._lease_expires_at = max(self._lease_expires_at, sent_at + self._config.renew_deadline_s)

    # --- role changes --------------------------------------------------------------------------

    def _to_follower(self, now: float) -> None:
        self._role = FOLLOWER
        self._lease_expires_at = None
        self._renews = {}
        self._grants = set()
        self._refusals = set()
        self._next_campaign_at = max(self._next_campaign_at,
                                     now + self._config.retry_period_s + self._jitter())

    def _step_down(self, now: float, reason: str, out: list[Action]) -> None:
        logger.warning("lease: %s steps down from term %d: %s", self._node_id, self._term, reason)
        out.append(SteppedDown(self._term, reason))
        self._leader = None
        self._to_follower(now)

    def _adopt_term(self, term: int, now: float, why: str, out: list[Action]) -> None:
        self._save(term, None, now)                    # durable before anything in `term` is sent
        old = self._term
        logger.info("lease: %s moves from term %d to %d (%s)", self._node_id, old, term, why)
        if self._role == LEADER:
            out.append(SteppedDown(old, f"higher term {term} seen ({why})"))
        self._term, self._voted_for = term, None
        self._leader = None
        if self._role != FOLLOWER:
            self._to_follower(now)

    def _announce(self, out: list[Action]) -> None:
        term, leader = self._announced
        if self._leader != leader or (self._leader is not None and self._term != term):
            out.append(LeaderChanged(self._term, self._leader))
            self._announced = (self._term, self._leader)

    # --- message handlers ----------------------------------------------------------------------

    def _on_vote_request(self, msg: VoteRequest, now: float, out: list[Action]) -> None:
        if msg.candidate == self._node_id:
            return
        if msg.pre_vote:
            granted = (self._is_voter and msg.candidate in self._voter_set and self._role != LEADER
                       and msg.term > self._term
                       and not self._granted_recently(now) and self._log_ok(msg))
            out.append(Send(msg.candidate, VoteReply(self._term, self._node_id, granted, True)))
            return
        if msg.term < self._term:
            self._stale_rejected += 1
            out.append(Send(msg.candidate, VoteReply(self._term, self._node_id, False, False)))
            return
        if msg.candidate not in self._voter_set:
            logger.warning("lease: %s refuses a vote to non-voter %r", self._node_id, msg.candidate)
            out.append(Send(msg.candidate, VoteReply(self._term, self._node_id, False, False)))
            return
        if msg.term > self._term:
            self._adopt_term(msg.term, now, f"vote request from {msg.candidate}", out)
        sticky = self._granted_recently(now) and self._grant_holder != msg.candidate
        granted = (self._is_voter and self._voted_for in (None, msg.candidate) and not sticky and self._log_ok(msg))
        if granted:
            if self._voted_for != msg.candidate:
                self._save(self._term, msg.candidate, now)    # durable before the reply
                self._voted_for = msg.candidate
            self._record_grant(msg.candidate, now)
            if self._role == PRE_CANDIDATE:
                self._to_follower(now)
        out.append(Send(msg.candidate, VoteReply(self._term, self._node_id, granted, False)))

    def _on_vote_reply(self, msg: VoteReply, now: float, out: list[Action]) -> None:
        if msg.voter not in self._voter_set or msg.voter == self._node_id:
            return
        if msg.term > self._term and not (msg.pre_vote and msg.granted):
            self._adopt_term(msg.term, now, f"vote reply from {msg.voter}", out)
            return
        if msg.pre_vote:
            if self._role != PRE_CANDIDATE:
                return
        elif msg.term < self._term:
            self._stale_rejected += 1
            return
        elif self._role != CANDIDATE:
            return
        (self._grants if msg.granted else self._refusals).add(msg.voter)
        self._tally(now, out)

    def _on_renew(self, msg: LeaseRenew, now: float, out: list[Action]) -> None:
        if msg.leader == self._node_id:
            return
        if msg.term < self._term:
            self._stale_rejected += 1
            out.append(Send(msg.leader, LeaseAck(self._term, self._node_id, msg.renew_id, False)))
            return
        if msg.leader not in self._voter_set:
            logger.warning("lease: %s refuses a renew from non-voter %r", self._node_id, msg.leader)
            out.append(Send(msg.leader, LeaseAck(self._term, self._node_id, msg.renew_id, False)))
            return
        if msg.term > self._term:
            self._adopt_term(msg.term, now, f"renew from {msg.leader}", out)
        elif self._role == LEADER:
            logger.error("lease: %s and %s both lead term %d; refusing the renew",
                         self._node_id, msg.leader, self._term)
            out.append(Send(msg.leader, LeaseAck(self._term, self._node_id, msg.renew_id, False)))
            return
        if self._role != FOLLOWER:
            self._to_follower(now)
        self._leader = msg.leader
        self._leader_seen_at = now
        self._record_grant(msg.leader, now)
        out.append(Send(msg.leader, LeaseAck(self._term, self._node_id, msg.renew_id, True)))

    def _on_release(self, msg: LeaseRelease, now: float, out: list[Action]) -> None:
        if msg.leader == self._node_id or msg.leader not in self._voter_set:
            return
        if msg.term < self._term:
            self._stale_rejected += 1
            return
        if msg.term > self._term:
            self._adopt_term(msg.term, now, f"lease release from {msg.leader}", out)
        if self._leader == msg.leader:
            self._leader = None
        if self._grant_holder == msg.leader:       # the lease it was granted is over: no stickiness
            self._granted_at, self._grant_holder = None, None
        if self._role == FOLLOWER and not self._granted_recently(now):
            self._next_campaign_at = min(self._next_campaign_at, now + self._jitter())

    def _on_ack(self, msg: LeaseAck, now: float, out: list[Action]) -> None:
        if msg.voter not in self._voter_set or msg.voter == self._node_id:
            return
        if msg.term > self._term:
            self._adopt_term(msg.term, now, f"lease ack from {msg.voter}", out)
            return
        if msg.term < self._term:
            self._stale_rejected += 1
            return
        if self._role != LEADER or not msg.ok or msg.renew_id not in self._renews:
            return
        self._renews[msg.renew_id][1].add(msg.voter)
        self._count_acks(msg.renew_id)
