"""The etcd side of the etcd lease backend: one worker thread that talks to etcd.

The daemon's loop must never wait on etcd, so every HTTP call happens here. The loop (through
:class:`~fabricd.cluster.etcd_lease.EtcdLease`) sets an :class:`Intent` — may this node lead, its
log position, a leader key to drop, a lease to revoke — and reads back :class:`Observation` s,
one per cycle. A cycle runs every ``period_s`` (sooner when the intent changes) and does:

1. revoke the lease if a release was asked (every key of this node goes with it);
2. drop this node's leader key if a resign asked for it (a transaction that compares the key's
   create revision, so a newer leader's key is never touched);
3. keep this node's etcd lease alive (grant a new one when there is none or etcd forgot it);
4. publish the node's log position under ``<prefix>nodes/<node>``, attached to that lease;
5. read ``<prefix>leader``; if it is absent, the intent allows leading, and this node's log is
   at least as up to date as the published positions of a majority of the voters (itself
   included: Raft's voting rule, so the new leader holds every committed record), create it in
   one transaction — only if it is still absent and no position changed since they were read —
   attached to the lease.

The observation carries the monotonic time the cycle *started*: the keepalive in it was sent
after that instant, so etcd keeps the lease (and the leader key attached to it) at least
``ttl`` seconds past it. Any failed call ends the cycle with an observation that says why.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .etcd_gateway import EtcdError, EtcdGateway, KeyValue, prefix_end

__all__ = ["Intent", "Observation", "EtcdSession", "position_of", "up_to_date"]

log = logging.getLogger(__name__)

#: Observations kept for the loop at most; each is a whole view, so dropping old ones loses nothing.
MAX_OBSERVATIONS = 16
LEADER_KEY = "leader"
NODES_DIR = "nodes/"


@dataclass(frozen=True)
class Intent:
    """What the lease asks of the session; the loop replaces it as a whole."""

    want_lead: bool = False            # create the leader key when it is absent
    position: tuple[int, int] = (0, 0)  # this node's (last log term, last log seq)
    drop_term: int = 0                 # delete our leader key if its create revision is this
    release: int = 0                   # grows by one per release: revoke the lease
    lease_allowed: bool = True         # False after a release, until this node may lead again


@dataclass(frozen=True)
class Observation:
    """One cycle's view of etcd."""

    started_at: float                  # monotonic time the cycle started (before its keepalive)
    holder: str | None = None          # the node named by the leader key, None when absent
    create_revision: int = 0           # the leader key's create revision (the term), 0 when absent
    ours: bool = False                 # the leader key is attached to this node's live lease
    behind: bool = False               # this node did not try: a majority's logs are ahead of it
    released: int = 0                  # the last release done
    error: str | None = None           # why the cycle failed (nothing else in it is meaningful)


def position_of(kv: KeyValue) -> tuple[int, int] | None:
    """The (term, seq) a node published, or None for a value that is not one."""
    try:
        data = json.loads(kv.value)
        term, seq = data["term"], data["seq"]
    except (ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (term, seq)):
        return None
    return term, seq


def up_to_date(own: tuple[int, int], node: str, published: dict[str, tuple[int, int]],
               voters: Sequence[str]) -> bool:
    """True when ``own`` is at least as up to date as the logs of a majority of ``voters``
    (this ``node`` counts when it is a voter): a voter that published nothing counts against."""
    majority = len(voters) // 2 + 1
    behind_me = sum(1 for v in voters if v == node or (v in published and published[v] <= own))
    return behind_me >= majority


class EtcdSession:
    """The worker thread of one daemon's etcd lease (see the module docstring)."""

    def __init__(self, gateway: EtcdGateway, *, prefix: str, node_id: str, voters: Sequence[str],
                 ttl_s: int, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._gw = gateway
        self.node_id = node_id
        self.voters = tuple(voters)
        self.leader_key = prefix + LEADER_KEY
        self.nodes_prefix = prefix + NODES_DIR
        self.ttl_s = ttl_s
        self.period_s = period_s
        self._clock = clock
        self._intent = Intent()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observations: deque[Observation] = deque(maxlen=MAX_OBSERVATIONS)
        self._thread: threading.Thread | None = None
        self._lease = 0
        self._published: tuple[int, int] | None = None
        self._released = 0
        self._dropped = 0
        self._released_cv = threading.Condition(self._lock)
        self.failure: str | None = None     # an unexpected exception in the thread (logged)

    # --- the loop's side -----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The etcd endpoint the next call goes to."""
        return self._gw.endpoint

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"etcd-lease-{self.node_id}", daemon=True)
        self._thread.start()

    def set_intent(self, intent: Intent) -> None:
        """Replace the intent; a change other than the log position (which moves with every
        record) starts the next cycle at once."""
        with self._lock:
            urgent = replace(intent, position=self._intent.position) != self._intent
            self._intent = intent
        if urgent:
            self._wake.set()

    def observations(self) -> list[Observation]:
        """The observations since the last call, oldest first."""
        with self._lock:
            out = list(self._observations)
            self._observations.clear()
        return out

    def wait_released(self, release: int, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for release number ``release`` to be done (a shutdown)."""
        with self._released_cv:
            return self._released_cv.wait_for(lambda: self._released >= release, timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._gw.close()

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            obs = self.run_cycle()
            with self._lock:
                self._observations.append(obs)
            self._wake.wait(max(0.0, self.period_s - (self._clock() - started)))
            self._wake.clear()

    def run_cycle(self) -> Observation:
        """One cycle (see the module docstring); never raises."""
        started = self._clock()
        with self._lock:
            intent = self._intent
        try:
            return self._cycle(started, intent)
        except EtcdError as e:
            return Observation(started_at=started, released=self._released, error=str(e))
        except Exception as e:  # a bug: logged (once per kind) and shown in status; the next cycle tries again
            failure = f"{type(e).__name__}: {e}"
            if failure != self.failure:
                log.exception("etcd lease session of %s failed", self.node_id)
            self.failure = failure
            return Observation(started_at=started, released=self._released, error=self.failure)

    def _cycle(self, started: float, intent: Intent) -> Observation:
        if intent.release > self._released:
            if self._lease:
                self._gw.revoke(self._lease)
                self._lease, self._published = 0, None
            with self._released_cv:
                self._released = intent.release
                self._released_cv.notify_all()
        if intent.drop_term and intent.drop_term != self._dropped:
            self._gw.delete_if_created(self.leader_key, intent.drop_term)
            self._dropped = intent.drop_term
        if not intent.lease_allowed:
            if self._lease:  # a release asked while it held a lease granted since: let it go
                self._gw.revoke(self._lease)
                self._lease, self._published = 0, None
            return self._view(started, self._read_leader())
        self._keep_lease()
        if intent.position != self._published:
            self._gw.put(self.nodes_prefix + self.node_id,
                         json.dumps({"term": intent.position[0], "seq": intent.position[1]}), self._lease)
            self._published = intent.position
        kv = self._read_leader()
        behind = False
        if kv is None and intent.want_lead:
            revision, kvs = self._gw.range(self.nodes_prefix, prefix_end(self.nodes_prefix))
            published = {kv.key[len(self.nodes_prefix):]: p for kv in kvs if (p := position_of(kv)) is not None}
            published[self.node_id] = intent.position
            if up_to_date(intent.position, self.node_id, published, self.voters):
                _, kv = self._gw.create(self.leader_key, self.node_id, self._lease,
                                        unchanged_since=(self.nodes_prefix, prefix_end(self.nodes_prefix), revision))
            else:
                behind = True
        return self._view(started, kv, behind=behind)

    def _keep_lease(self) -> None:
        if self._lease and self._gw.keepalive(self._lease) > 0:
            return
        if self._lease:
            log.warning("etcd lease of %s expired in etcd; granting a new one", self.node_id)
        self._lease, _ = self._gw.grant(self.ttl_s)
        self._published = None

    def _read_leader(self) -> KeyValue | None:
        _, kvs = self._gw.range(self.leader_key)
        return kvs[0] if kvs else None

    def _view(self, started: float, kv: KeyValue | None, *, behind: bool = False) -> Observation:
        if kv is None:
            return Observation(started_at=started, behind=behind, released=self._released)
        return Observation(started_at=started, holder=kv.value, create_revision=kv.create_revision,
                           ours=bool(self._lease) and kv.lease == self._lease and kv.value == self.node_id,
                           behind=behind, released=self._released)
