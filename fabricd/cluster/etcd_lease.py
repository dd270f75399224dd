"""The etcd lease backend: the same :class:`~fabricd.cluster.lease.LeaseBackend` as the built-in
election, with etcd v3 deciding who leads.

:class:`EtcdLease` is the decision logic and holds no socket: it reads the
:class:`~fabricd.cluster.etcd_session.Observation` s of its session (a worker thread that does
every etcd call, see :mod:`fabricd.cluster.etcd_session`), turns them into the same actions the
built-in election returns (``BecameLeader``, ``SteppedDown``, ``LeaderChanged``), and tells the
session what it wants next (an :class:`~fabricd.cluster.etcd_session.Intent`). The daemon's loop
therefore never waits on etcd.

Term
    The leader's term is the *create revision* of the leader key ``<prefix>leader``. etcd's
    revision is one counter for the whole store and grows with every write, so a key created
    later has a larger create revision: terms grow across leaders, and each leadership (a key
    created once, deleted when its lease ends) has its own. Every existing fencing check keeps
    working unchanged: log records carry the term, the shadows reject appends of an older term
    than they have seen or hold, and a node's term never goes down — it is the largest create
    revision it observed, saved in the term store (the same ``term.json``) before it acts on it.
    A node leads a term only if that term is above every term it saw before; a key whose
    revision is not (an etcd whose data was wiped, a switch from the built-in backend with its
    own terms) is deleted and created again, which raises the revision, and logged.

Lease validity (the built-in ``renew_deadline_s`` semantics)
    The session keeps an etcd lease of ``ceil(lease_duration_s)`` seconds alive and the leader
    key is attached to it. A cycle that started at (monotonic) ``t``, renewed the lease and read
    the key back as ours proves the key exists until at least ``t + ttl``; the leader relies on
    it only until ``t + renew_deadline_s`` (< ``lease_duration_s`` <= ttl). When etcd cannot be
    reached the observations stop and the first ``tick`` or ``is_leader`` past that instant
    steps down — before etcd could give the key to anyone else.

Resign / release
    ``resign`` deletes the leader key with a transaction on its create revision (never a newer
    leader's key) and does not try to lead for ``lease_duration_s``. ``release`` (a clean
    shutdown) revokes the lease: the leader key and the node's published log position go at
    once and another daemon leads within one ``retry_period_s``.

Lease messages from peers are not used with this backend; one arriving means a peer runs the
built-in election, which is a configuration error, logged once and counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from .etcd_session import EtcdSession, Intent, Observation
from .lease import FOLLOWER, LEADER, LeaseView
from .lease_messages import Action, BecameLeader, LeaderChanged, LeaseConfig, LeaseMessage, SteppedDown
from .term_store import TermStore, TermStoreError

__all__ = ["EtcdLease", "lease_ttl_s"]

log = logging.getLogger(__name__)

#: How long ``release`` waits for the session to revoke the lease (a shutdown, not the loop).
RELEASE_WAIT_S = 1.0


def lease_ttl_s(config: LeaseConfig) -> int:
    """The etcd lease TTL for ``config``: whole seconds, at least ``lease_duration_s``."""
    return max(1, math.ceil(config.lease_duration_s))


class EtcdLease(LeaseView):
    """One daemon's view of the etcd lease. ``session`` does the etcd calls; this class only
    reads its observations and sets its intent (see the module docstring)."""

    def __init__(self, node_id: str, voters: Sequence[str], config: LeaseConfig, store: TermStore,
                 session: EtcdSession, log_position: Callable[[], tuple[int, int]], now: float) -> None:
        self._node_id = node_id
        self._is_voter = node_id in voters
        self._config = config
        self._store = store
        self._session = session
        self._log_position = log_position
        term, _ = store.load()
        self._term = term
        self._role = FOLLOWER
        self._leader: str | None = None
        self._leader_seen_at = now
        self._announced: tuple[int, str | None] = (term, None)
        self._lease_expires_at: float | None = None
        self._led: int = 0                  # the term led last (never led again once stepped down)
        self._hold_until = now
        self._drop_term = 0
        self._release = 0
        self._now = now
        self._store_error: str | None = None
        self._etcd_error: str | None = None
        self._counters = {"etcd_errors": 0, "terms_refused": 0, "peer_lease_messages": 0, "behind": 0}
        self._push_intent(now)

    # --- read-only view ------------------------------------------------------------------------


    def status(self, now: float | None = None) -> dict[str, Any]:
        at = self._now if now is None else max(now, self._now)
        expires = self._lease_expires_at if self._role == LEADER else None
        return {
            "backend": "etcd",
            "node_id": self._node_id,
            "voter": self._is_voter,
            "role": self._role,
            "term": self._term,
            "leader": self._leader,
            "is_leader": expires is not None and at < expires,
            "lease_expires_at": expires,
            "lease_remaining_s": None if expires is None else max(0.0, expires - at),
            "etcd_endpoint": self._session.endpoint,
            "etcd_error": self._etcd_error,
            "session_failure": self._session.failure,
            "store_error": self._store_error,
            **self._counters,
        }

    # --- inputs --------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Take the session's observations, expire the lease when due, update the intent."""
        now = self._clock(now)
        out: list[Action] = []
        for obs in self._session.observations():
            self._on_observation(obs, now, out)
        self._expire(now, out)
        self._push_intent(now)
        self._announce(out)
        return out

    def on_message(self, msg: LeaseMessage, now: float) -> list[Action]:
        """Peers' lease messages are not used with etcd: a peer that sends them runs the built-in
        election, which must not be mixed with this backend."""
        self._counters["peer_lease_messages"] += 1
        if self._counters["peer_lease_messages"] in (1, 100) or self._counters["peer_lease_messages"] % 10_000 == 0:
            log.error("lease: %s uses the etcd lease backend but got a %s from a peer that runs the built-in "
                      "one: every daemon of a cluster must use the same [cluster] lease_backend",
                      self._node_id, type(msg).__name__)
        return []

    def resign(self, now: float, reason: str) -> list[Action]:
        """Stop leading now, delete the leader key (if it is still ours) and do not try to lead
        again for ``lease_duration_s``."""
        now = self._clock(now)
        out: list[Action] = []
        if self._role == LEADER:
            self._step_down(now, reason, out)
        self._hold_until = now + self._config.lease_duration_s
        self._push_intent(now)
        self._announce(out)
        return out

    def release(self, now: float, reason: str) -> list[Action]:
        """Stop leading now and revoke the etcd lease, so another daemon leads at once (a clean
        shutdown). Waits up to ``RELEASE_WAIT_S`` for the revoke; the lease expires anyway."""
        now = self._clock(now)
        out: list[Action] = []
        was_leader = self._role == LEADER
        if was_leader:
            self._step_down(now, reason, out)
        self._hold_until = now + self._config.lease_duration_s
        self._release += 1
        self._push_intent(now)
        self._announce(out)
        if was_leader and not self._session.wait_released(self._release, RELEASE_WAIT_S):
            log.warning("lease: %s could not revoke its etcd lease within %.1f s; it expires in etcd by itself",
                        self._node_id, RELEASE_WAIT_S)
        return out

    def close(self) -> None:
        """Stop the session thread (tests; a daemon's thread ends with the process)."""
        self._session.close()

    # --- internals -----------------------------------------------------------------------------


    def _may_lead(self, now: float) -> bool:
        return self._is_voter and now >= self._hold_until and self._store_error is None

    def _push_intent(self, now: float) -> None:
        self._session.set_intent(Intent(want_lead=self._may_lead(now), position=tuple(self._log_position()),
                                        drop_term=self._drop_term, release=self._release,
                                        lease_allowed=self._release == 0 or now >= self._hold_until))

    def _on_observation(self, obs: Observation, now: float, out: list[Action]) -> None:
        if obs.error is not None:
            self._counters["etcd_errors"] += 1
            if self._etcd_error is None:
                log.warning("lease: %s cannot reach etcd: %s", self._node_id, obs.error)
            self._etcd_error = obs.error
            return
        if self._etcd_error is not None:
            log.info("lease: %s reaches etcd again", self._node_id)
            self._etcd_error = None
        if obs.behind:
            self._counters["behind"] += 1
        if obs.released < self._release:
            return  # seen before the release was done: it may still show the revoked key as ours
        rev = obs.create_revision
        if obs.holder is None:
            if self._role == LEADER:
                self._step_down(now, "the leader key is gone from etcd", out)
            self._leader = None
            return
        if obs.ours:
            if self._role == LEADER:
                if rev == self._led:
                    self._lease_expires_at = max(self._lease_expires_at or 0.0,
                                                 obs.started_at + self._config.renew_deadline_s)
                    return
                self._step_down(now, f"leader key of revision {rev} is not the term {self._led} it leads", out)
            if rev > self._term and self._may_lead(now) and self._save(rev, now):
                self._become_leader(rev, obs.started_at, now, out)
                return
            if rev <= self._term and rev != self._led:
                self._counters["terms_refused"] += 1
                log.error("lease: %s holds the etcd leader key created at revision %d, not above its term %d "
                          "(etcd data reset, or terms of another backend): deleting it to get a larger one",
                          self._node_id, rev, self._term)
            self._drop_term = rev  # not leading it: let it go, so that a key with a valid term can be made
            self._leader = None
            return
        if self._role == LEADER:
            self._step_down(now, f"etcd names {obs.holder} leader (revision {rev})", out)
        if rev > self._term and not self._save(rev, now):
            self._leader = None
            return
        if rev >= self._term and obs.holder != self._node_id:
            self._leader, self._leader_seen_at = obs.holder, obs.started_at
        else:   # a key from an older term, or one of this node's previous leases: nobody to follow
            self._leader = None

    def _save(self, term: int, now: float) -> bool:
        """Persist ``term`` (this node's term never goes down); False when the store fails."""
        try:
            self._store.save(term, None)
        except TermStoreError as e:
            if self._store_error is None:
                log.error("lease: %s cannot persist term %d (%s): it neither leads nor follows a newer "
                          "term until the term store works again", self._node_id, term, e)
            self._store_error = e.reason
            return False
        if self._store_error is not None:
            log.warning("lease: %s: the term store works again", self._node_id)
            self._store_error = None
        if term > self._term:
            log.info("lease: %s moves from term %d to %d", self._node_id, self._term, term)
        self._term = term
        return True

    def _become_leader(self, term: int, started_at: float, now: float, out: list[Action]) -> None:
        log.info("lease: %s leads term %d (etcd create revision)", self._node_id, term)
        self._role = LEADER
        self._led = term
        self._leader, self._leader_seen_at = self._node_id, now
        self._lease_expires_at = started_at + self._config.renew_deadline_s
        out.append(BecameLeader(term))

    def _expire(self, now: float, out: list[Action]) -> None:
        if self._role == LEADER and (self._lease_expires_at is None or now >= self._lease_expires_at):
            self._step_down(now, "etcd lease not renewed within renew_deadline_s", out)
        if (self._role == FOLLOWER and self._leader is not None
                and now >= self._leader_seen_at + self._config.lease_duration_s):
            self._leader = None
        if self._store_error is not None and now >= self._hold_until:
            self._hold_until = now + self._config.lease_duration_s
            self._save(self._term, now)    # a probe: clears the error once the disk has room

    def _step_down(self, now: float, reason: str, out: list[Action]) -> None:
        log.warning("lease: %s steps down from term %d: %s", self._node_id, self._led, reason)
        out.append(SteppedDown(self._led, reason))
        self._role = FOLLOWER
        self._lease_expires_at = None
        self._leader = None
        self._drop_term = self._led
        self._hold_until = max(self._hold_until, now + self._config.retry_period_s)

    def _announce(self, out: list[Action]) -> None:
        term, leader = self._announced
        if self._leader != leader or (self._leader is not None and self._term != term):
            out.append(LeaderChanged(self._term, self._leader))
            self._announced = (self._term, self._leader)
