"""The lease election, driven by a fake clock over an in-memory network.

The network delivers ``Send`` actions between ``LeaseElection`` objects with per-message delays,
drops, partitions and paused nodes (a paused node is neither ticked nor delivered to; messages
to it queue up as in a socket buffer). Each node may run its clock at its own rate and offset.
After every step the harness checks the safety properties: at most one node has
``is_leader(its local now)`` true, at most one node ever wins a given term, and every message a
node sends is covered by what its term store holds.
"""

from __future__ import annotations

import heapq
import json
import os
import random
from collections.abc import Callable, Sequence

import pytest

from fabricd.cluster import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    PRE_CANDIDATE,
    BecameLeader,
    FileTermStore,
    LeaderChanged,
    LeaseAck,
    LeaseBackend,
    LeaseConfig,
    LeaseElection,
    LeaseRenew,
    MemoryTermStore,
    Send,
    SteppedDown,
    TermStoreError,
    VoteReply,
    VoteRequest,
)

pytestmark = [pytest.mark.unit]

CFG = LeaseConfig()  # lease 2.0, renew deadline 1.3, retry 0.3
L = CFG.lease_duration_s


class JournalStore(MemoryTermStore):
    """A MemoryTermStore that can be told to fail, like a full disk."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def save(self, term: int, voted_for: str | None) -> None:
        if self.fail:
            raise TermStoreError("/fake/term.json", "No space left on device")
        super().save(term, voted_for)


class ScriptedRandom(random.Random):
    """Returns the scripted values from random() first, then a seeded sequence."""

    def __init__(self, values: Sequence[float], seed: int = 0) -> None:
        super().__init__(seed)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0) if self.values else super().random()


class Net:
    """N lease elections on a fake clock and a lossy, reordering, partitionable network."""

    def __init__(self, ids: Sequence[str], *, voters: Sequence[str] | None = None, seed: int = 0,
                 drift: float = 0.0, logs: dict[str, tuple[int, int]] | None = None,
                 rngs: dict[str, random.Random] | None = None, config: LeaseConfig = CFG) -> None:
        self.rng = random.Random(seed)
        self.t = 0.0
        self.ids = list(ids)
        self.voters = list(voters if voters is not None else ids)
        self.rates = {i: 1.0 + self.rng.uniform(-drift, drift) for i in ids}
        self.offsets = {i: self.rng.uniform(0, 1000) if drift else 0.0 for i in ids}
        self.logs = dict(logs or {i: (0, 0) for i in ids})
        self.stores = {i: JournalStore() for i in ids}
        rngs = rngs or {}
        self.nodes: dict[str, LeaseElection] = {}
        for k, i in enumerate(ids):
            self.nodes[i] = LeaseElection(
                i, self.voters, config, self.stores[i], self._log_of(i), self.local(i),
                rng=rngs.get(i, random.Random(seed * 1000 + k)))
        self.queue: list[tuple[float, int, str, str, object]] = []
        self.seq = 0
        self.paused: set[str] = set()
        self.blocked: set[tuple[str, str]] = set()
        self.drop_p = 0.0
        self.delay: Callable[[str, str], float] = lambda src, dst: 0.005
        self.check_paused = True
        self.winners: dict[int, str] = {}
        self.actions: dict[str, list[object]] = {i: [] for i in ids}
        self.max_leaders_seen = 0

    def _log_of(self, i: str) -> Callable[[], tuple[int, int]]:
        return lambda: self.logs[i]

    def local(self, i: str) -> float:
        return self.offsets[i] + self.rates[i] * self.t

    def partition(self, group: Sequence[str]) -> None:
        """Cut every link between `group` and the rest."""
        rest = [i for i in self.ids if i not in group]
        for a in group:
            for b in rest:
                self.blocked |= {(a, b), (b, a)}

    def heal(self) -> None:
        self.blocked.clear()
        self.drop_p = 0.0

    def apply(self, src: str, actions: list) -> None:
        node, store = self.nodes[src], self.stores[src]
        assert store.load()[0] == node.term, "term in memory differs from the term persisted"
        for a in actions:
            self.actions[src].append(a)
            if isinstance(a, BecameLeader):
                assert self.winners.setdefault(a.term, src) == src, f"two leaders in term {a.term}"
            if not isinstance(a, Send):
                continue
            msg = a.msg
            if isinstance(msg, VoteRequest) and not msg.pre_vote:
                assert store.load() == (msg.term, src), "VoteRequest sent before its term/vote was saved"
            if isinstance(msg, VoteReply) and msg.granted and not msg.pre_vote:
                assert store.load() == (msg.term, a.to), "vote sent before it was saved"
            if not (isinstance(msg, VoteRequest) and msg.pre_vote):
                assert msg.term <= store.load()[0]
            if (src, a.to) in self.blocked or self.rng.random() < self.drop_p:
                continue
            self.seq += 1
            heapq.heappush(self.queue, (self.t + self.delay(src, a.to), self.seq, src, a.to, msg))

    def deliver(self, dst: str, msg: object, src: str = "?") -> list:
        actions = self.nodes[dst].on_message(msg, self.local(dst))
        self.apply(dst, actions)
        return actions

    def step(self, dt: float = 0.01) -> None:
        self.t += dt
        held = []
        while self.queue and self.queue[0][0] <= self.t:
            item = heapq.heappop(self.queue)
            if item[3] in self.paused:
                held.append(item)
            else:
                self.deliver(item[3], item[4], item[2])
        for item in held:
            heapq.heappush(self.queue, item)
        for i in self.ids:
            if i not in self.paused:
                self.apply(i, self.nodes[i].tick(self.local(i)))
        self.check()

    def run(self, seconds: float, dt: float = 0.01, each: Callable[[], None] | None = None) -> None:
        end = self.t + seconds
        while self.t < end - 1e-9:
            self.step(dt)
            if each:
                each()

    def leaders_now(self) -> list[str]:
        return [i for i in self.ids
                if (self.check_paused or i not in self.paused) and self.nodes[i].is_leader(self.local(i))]

    def check(self) -> None:
        leaders = self.leaders_now()
        assert len(leaders) <= 1, f"t={self.t:.3f}: two nodes hold the lease: {leaders}"
        self.max_leaders_seen = max(self.max_leaders_seen, len(leaders))

    def settled_leader(self) -> str:
        """The one leader everybody agrees on (fails if there is none)."""
        leaders = self.leaders_now()
        assert len(leaders) == 1, f"t={self.t:.2f}: leaders {leaders}; " + str(
            {i: (n.role, n.term, n.leader) for i, n in self.nodes.items()})
        lead = leaders[0]
        term = self.nodes[lead].term
        for i in self.ids:
            assert self.nodes[i].leader == lead and self.nodes[i].term == term, (i, self.nodes[i].status())
        return lead


# --- configuration -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs", [
    dict(lease_duration_s=1.0, renew_deadline_s=1.3),          # deadline >= lease
    dict(renew_deadline_s=2.0),                                # deadline == lease
    dict(retry_period_s=1.3),                                  # retry == deadline
    dict(retry_period_s=0.0),
    dict(retry_period_s=-0.1),
    dict(lease_duration_s=float("nan")),
    dict(renew_deadline_s="1.3"),
])
def test_config_ordering_is_validated(kwargs) -> None:
    with pytest.raises(ValueError) as e:
        LeaseConfig(**kwargs)
    bad_key, bad_value = next(iter(kwargs.items()))
    assert bad_key in str(e.value) and repr(bad_value) in str(e.value)


@pytest.mark.timeout(30)
def test_config_defaults_and_custom_values_accepted() -> None:
    assert LeaseConfig() == LeaseConfig(2.0, 1.3, 0.3)
    LeaseConfig(lease_duration_s=10, renew_deadline_s=5, retry_period_s=1)


@pytest.mark.timeout(30)
def test_constructor_rejects_bad_voters() -> None:
    for voters in ([], ["a", "a"], ["a", ""]):
        with pytest.raises(ValueError):
            LeaseElection("a", voters, CFG, MemoryTermStore(), lambda: (0, 0), 0.0)


# --- elections ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_one_node_cluster_elects_itself_on_first_tick() -> None:
    store = MemoryTermStore()
    node = LeaseElection("solo", ["solo"], CFG, store, lambda: (0, 0), now=100.0)
    actions = node.tick(100.0)
    assert actions == [BecameLeader(1), LeaderChanged(1, "solo")]
    assert node.role == LEADER and node.is_leader(100.0) and node.leader == "solo"
    assert store.saves == [(1, "solo")]
    for k in range(1, 100):  # it keeps the lease as long as it ticks
        assert node.tick(100.0 + 0.1 * k) == []
        assert node.is_leader(100.0 + 0.1 * k)
    assert node.term == 1
    # paused past its lease: not leader at the first call, and re-elected in a new term
    assert not node.is_leader(200.0)
    actions = node.tick(200.0)
    assert actions[0] == SteppedDown(1, "lease expired")
    assert BecameLeader(2) in actions and node.is_leader(200.0)


@pytest.mark.timeout(30)
def test_lease_election_is_a_lease_backend() -> None:
    backend: LeaseBackend = LeaseElection("a", ["a"], CFG, MemoryTermStore(), lambda: (0, 0), 0.0)
    for name in ("tick", "on_message", "is_leader", "status", "term", "leader"):
        assert hasattr(backend, name)


@pytest.mark.timeout(30)
def test_three_nodes_elect_exactly_one_leader_and_keep_it() -> None:
    net = Net(["a", "b", "c"], seed=1)
    net.run(0.5 * L)
    assert net.leaders_now() == [] and all(n.term == 0 for n in net.nodes.values())
    net.run(2 * L)
    lead = net.settled_leader()
    term = net.nodes[lead].term
    assert term == 1 and net.winners == {1: lead}
    # stable: no more elections while the leader renews
    net.run(30.0, each=lambda: net.settled_leader())
    assert net.nodes[lead].term == term and net.winners == {1: lead}
    st = net.nodes[lead].status()
    assert st["role"] == LEADER and 0 < st["lease_remaining_s"] <= CFG.renew_deadline_s
    for i in net.ids:
        if i != lead:
            assert net.nodes[i].status()["role"] == FOLLOWER and net.nodes[i].voted_for in (lead, None)


@pytest.mark.timeout(30)
def test_five_nodes_with_two_dead_still_elect() -> None:
    net = Net(["a", "b", "c", "d", "e"], seed=2)
    net.paused |= {"d", "e"}
    net.check_paused = False
    net.run(3 * L)
    assert len(net.leaders_now()) == 1
    assert net.leaders_now()[0] in {"a", "b", "c"}


@pytest.mark.timeout(30)
def test_split_vote_resolves() -> None:
    # a and b campaign at the same instant (jitter 0); c hears a first, d hears b first: 2-2.
    ids = ["a", "b", "c", "d"]
    rngs = {"a": ScriptedRandom([0.0, 0.0], seed=1), "b": ScriptedRandom([0.0, 0.0], seed=2),
            "c": ScriptedRandom([0.29], seed=3), "d": ScriptedRandom([0.29], seed=4)}
    net = Net(ids, rngs=rngs, seed=3)
    slow = {("a", "d"), ("b", "c")}
    net.delay = lambda src, dst: 0.2 if (src, dst) in slow else 0.01
    net.run(L + 0.5)
    # both campaigned in term 1, got 2 of 4 votes, and gave up (a majority refused)
    assert net.nodes["a"].status()["elections_started"] == net.nodes["b"].status()["elections_started"] == 1
    assert net.nodes["a"].term == net.nodes["b"].term == 1
    assert net.nodes["a"].role == net.nodes["b"].role == FOLLOWER
    assert net.nodes["c"].voted_for == "a" and net.nodes["d"].voted_for == "b"
    assert net.leaders_now() == []
    net.run(10.0)
    lead = net.settled_leader()
    assert 1 not in net.winners and net.nodes[lead].term >= 2


@pytest.mark.timeout(120)  # ~5 s alone; 8 workers on 2 shared cores need the headroom
def test_randomized_runs_never_overlap_and_recover() -> None:
    """200 seeded runs of drops, delays, reordering, partitions, pauses and clock drift."""
    for seed in range(200):
        rng = random.Random(seed)
        n = rng.choice([3, 3, 4, 5])
        ids = [f"n{k}" for k in range(n)]
        net = Net(ids, seed=seed, drift=0.05)
        net.drop_p = rng.uniform(0.0, 0.3)
        net.delay = lambda src, dst: (rng.uniform(0.0, 0.05) if rng.random() < 0.95
                                      else rng.uniform(0.5, 3.0))
        resume_at: dict[str, float] = {}

        def chaos() -> None:
            for i, t in list(resume_at.items()):
                if net.t >= t:
                    net.paused.discard(i)
                    del resume_at[i]
            if rng.random() < 0.004:
                i = rng.choice(ids)
                net.paused.add(i)
                resume_at[i] = net.t + rng.uniform(0.2, 5.0)
            if rng.random() < 0.002:
                net.blocked.clear()
                net.partition(rng.sample(ids, rng.randint(1, n // 2)))
            elif rng.random() < 0.003:
                net.blocked.clear()

        net.run(25.0, dt=0.02, each=chaos)
        net.paused.clear()
        net.heal()
        net.delay = lambda src, dst: rng.uniform(0.0, 0.02)
        net.run(15.0, dt=0.02)
        net.settled_leader()


# --- pre-vote and lease stickiness -------------------------------------------------------------

@pytest.mark.timeout(30)
def test_partitioned_node_returning_does_not_raise_the_term_or_depose_the_leader() -> None:
    net = Net(["a", "b", "c"], seed=4)
    net.run(3 * L)
    lead = net.settled_leader()
    term = net.nodes[lead].term
    loner = next(i for i in net.ids if i != lead)
    elections_before = net.nodes[loner].status()["elections_started"]
    net.partition([loner])
    net.run(30.0, each=lambda: net.nodes[lead].is_leader(net.local(lead)) or pytest.fail("leader lost"))
    assert net.nodes[loner].term == term, "pre-votes must not raise the partitioned node's term"
    assert net.nodes[loner].status()["pre_votes_started"] > 10
    assert net.nodes[loner].status()["elections_started"] == elections_before
    assert net.nodes[loner].role in (FOLLOWER, PRE_CANDIDATE)
    net.heal()
    net.run(10.0, each=lambda: net.nodes[lead].is_leader(net.local(lead)) or pytest.fail("leader lost"))
    assert net.settled_leader() == lead
    assert all(n.term == term for n in net.nodes.values())
    assert set(net.winners) == {term}


@pytest.mark.timeout(30)
def test_voter_refuses_other_candidates_while_a_lease_it_granted_runs() -> None:
    store = MemoryTermStore(term=3)
    voter = LeaseElection("b", ["a", "b", "c"], CFG, store, lambda: (3, 7), now=0.0)
    voter.tick(L + 1)
    ack = voter.on_message(LeaseRenew(term=3, leader="a", renew_id=1), now=10.0)
    assert ack == [Send("a", LeaseAck(3, "b", 1, True)), LeaderChanged(3, "a")]
    # pre-vote from c: refused (granted recently), term untouched
    reply = voter.on_message(VoteRequest(4, "c", 3, 7, pre_vote=True), now=10.5)
    assert reply == [Send("c", VoteReply(3, "b", False, True))] and voter.term == 3
    # real vote from c in a higher term: the term is adopted but the vote refused (stickiness)
    reply = voter.on_message(VoteRequest(4, "c", 3, 7, pre_vote=False), now=11.0)
    assert Send("c", VoteReply(4, "b", False, False)) in reply
    assert store.load() == (4, None)
    # once the grant is older than the lease, c gets both
    assert voter.on_message(VoteRequest(5, "c", 3, 7, pre_vote=True), now=10.0 + L)[0].msg.granted
    reply = voter.on_message(VoteRequest(4, "c", 3, 7, pre_vote=False), now=10.0 + L)
    assert reply == [Send("c", VoteReply(4, "b", True, False))] and store.load() == (4, "c")
    # it voted for c in term 4: d is refused in term 4 even much later
    voter2 = LeaseElection("b", ["a", "b", "c", "d"], CFG, store, lambda: (3, 7), now=50.0)
    assert voter2.voted_for == "c"
    reply = voter2.on_message(VoteRequest(4, "d", 3, 7, pre_vote=False), now=60.0)
    assert reply == [Send("d", VoteReply(4, "b", False, False))]


@pytest.mark.timeout(30)
def test_restarted_voter_refuses_votes_for_a_lease_duration() -> None:
    voter = LeaseElection("b", ["a", "b", "c"], CFG, MemoryTermStore(term=2), lambda: (0, 0), now=5.0)
    assert not voter.on_message(VoteRequest(3, "c", 0, 0, pre_vote=False), now=5.0 + L - 0.01)[0].msg.granted
    assert voter.on_message(VoteRequest(4, "c", 0, 0, pre_vote=False), now=5.0 + L)[0].msg.granted


# --- paused leader and fencing -----------------------------------------------------------------

@pytest.mark.timeout(30)
def test_paused_leader_loses_the_lease_and_is_fenced() -> None:
    net = Net(["a", "b", "c"], seed=5)
    net.run(3 * L)
    old = net.settled_leader()
    old_term = net.nodes[old].term
    net.check_paused = False
    net.paused.add(old)            # SIGSTOP
    net.run(2 * L + 1.0)
    new = net.leaders_now()
    assert len(new) == 1 and new[0] != old
    new = new[0]
    assert net.nodes[new].term > old_term
    assert net.nodes[old].role == LEADER      # it has not run since the pause
    # a renew the old leader sent before the pause arrives late: voters reject it with their term
    for voter in net.ids:
        if voter != old:
            before = net.nodes[voter].status()["stale_rejected"]
            replies = net.deliver(voter, LeaseRenew(term=old_term, leader=old, renew_id=10_000))
            assert replies == [Send(old, LeaseAck(net.nodes[new].term, voter, 10_000, False))]
            assert net.nodes[voter].status()["stale_rejected"] == before + 1
            assert net.nodes[voter].leader == new
    # SIGCONT: its very first call says it is not leader
    net.paused.discard(old)
    net.check_paused = True
    assert not net.nodes[old].is_leader(net.local(old))
    net.step()
    assert SteppedDown(old_term, "lease expired") in net.actions[old]
    net.run(1.0)
    assert net.settled_leader() == new
    assert net.nodes[old].term == net.nodes[new].term and net.nodes[old].role == FOLLOWER


@pytest.mark.timeout(30)
def test_leader_steps_down_on_a_higher_term_while_its_lease_is_valid() -> None:
    store = MemoryTermStore()
    rng = ScriptedRandom([0.0])
    lead = LeaseElection("a", ["a", "b", "c"], CFG, store, lambda: (0, 0), now=0.0, rng=rng)
    sends = lead.tick(L)
    assert [s.msg for s in sends] == [VoteRequest(1, "a", 0, 0, True)] * 2
    assert lead.role == PRE_CANDIDATE and store.saves == []
    acts = lead.on_message(VoteReply(0, "b", True, True), now=L + 0.01)
    assert lead.role == CANDIDATE and store.saves == [(1, "a")]
    assert [s.msg for s in acts] == [VoteRequest(1, "a", 0, 0, False)] * 2
    acts = lead.on_message(VoteReply(1, "b", True, False), now=L + 0.02)
    assert acts[0] == BecameLeader(1) and lead.is_leader(L + 0.02)
    assert lead.lease_expires_at() == pytest.approx(L + 0.01 + CFG.renew_deadline_s)
    renews = [a for a in acts if isinstance(a, Send)]
    assert [r.msg for r in renews] == [LeaseRenew(1, "a", 1)] * 2
    # an ack from a majority for renew 1 extends the lease to its send time + renew deadline
    lead.on_message(LeaseAck(1, "c", 1, True), now=L + 0.05)
    assert lead.lease_expires_at() == pytest.approx(L + 0.02 + CFG.renew_deadline_s)
    # a stale-term ack is counted and ignored
    lead.on_message(LeaseAck(0, "c", 1, True), now=L + 0.06)
    assert lead.status()["stale_rejected"] == 1
    # b answers a renew with a higher term: a steps down immediately
    acts = lead.on_message(LeaseAck(7, "b", 1, False), now=L + 0.1)
    assert isinstance(acts[0], SteppedDown) and acts[0].term == 1 and "higher term" in acts[0].reason
    assert not lead.is_leader(L + 0.1) and lead.role == FOLLOWER and lead.term == 7
    assert store.load() == (7, None)
    assert acts[-1] == LeaderChanged(7, None)


@pytest.mark.timeout(30)
def test_is_leader_is_false_exactly_at_expiry() -> None:
    lead = LeaseElection("a", ["a"], CFG, MemoryTermStore(), lambda: (0, 0), now=0.0)
    lead.tick(0.0)
    exp = lead.lease_expires_at()
    assert exp == pytest.approx(CFG.renew_deadline_s)
    assert lead.is_leader(exp - 1e-6) and not lead.is_leader(exp)
    # time never goes backwards: an earlier `now` does not revive it
    assert not lead.is_leader(0.5)


@pytest.mark.timeout(30)
def test_non_voter_follows_but_never_campaigns() -> None:
    net = Net(["a", "b", "c", "x"], voters=["a", "b", "c"], seed=6)
    net.run(3 * L)
    leaders = net.leaders_now()
    assert len(leaders) == 1 and leaders[0] != "x"
    x = net.nodes["x"]
    net.run(20.0)
    assert x.status()["pre_votes_started"] == 0 and x.role == FOLLOWER
    # it refuses to vote, and its acks do not count
    reply = net.deliver("x", VoteRequest(99, "a", 9, 9, pre_vote=True))
    assert reply[0].msg.granted is False
    assert net.nodes[leaders[0]].status()["role"] == LEADER


# --- logs ----------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_log_behind_candidate_is_refused_by_pre_vote_and_vote() -> None:
    voter = LeaseElection("b", ["a", "b", "c"], CFG, MemoryTermStore(term=2), lambda: (2, 10), now=0.0)
    t = 10.0
    for log, ok in [((2, 9), False), ((1, 50), False), ((2, 10), True), ((3, 0), True)]:
        reply = voter.on_message(VoteRequest(3, "c", *log, pre_vote=True), now=t)
        assert reply[0].msg.granted is ok, log
    reply = voter.on_message(VoteRequest(3, "c", 2, 9, pre_vote=False), now=t)
    assert Send("c", VoteReply(3, "b", False, False)) in reply and voter.voted_for is None
    reply = voter.on_message(VoteRequest(3, "a", 2, 10, pre_vote=False), now=t)
    assert Send("a", VoteReply(3, "b", True, False)) in reply and voter.voted_for == "a"


@pytest.mark.timeout(30)
def test_log_behind_node_never_leads_even_when_it_campaigns_first() -> None:
    logs = {"a": (1, 10), "b": (1, 10), "c": (1, 5)}
    rngs = {"c": ScriptedRandom([0.0] * 5), "a": ScriptedRandom([0.2], 1), "b": ScriptedRandom([0.25], 2)}
    net = Net(["a", "b", "c"], logs=logs, rngs=rngs, seed=7)
    net.run(L + 0.1)
    assert net.nodes["c"].status()["pre_votes_started"] >= 1
    net.run(10.0)
    lead = net.settled_leader()
    assert lead in {"a", "b"} and "c" not in net.winners.values()
    assert net.nodes["c"].status()["elections_started"] == 0
    # the leader dies; c is still behind, so the other up-to-date node takes over
    net.check_paused = False
    net.paused.add(lead)
    net.run(10.0)
    (new,) = net.leaders_now()
    assert new not in {lead, "c"}


# --- persistence -----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_no_vote_request_leaves_when_the_term_cannot_be_saved() -> None:
    store = JournalStore()
    node = LeaseElection("a", ["a", "b", "c"], CFG, store, lambda: (0, 0), now=0.0, rng=ScriptedRandom([0.0]))
    node.tick(L)
    store.fail = True
    acts = node.on_message(VoteReply(0, "b", True, True), now=L + 0.01)
    assert not [a for a in acts if isinstance(a, Send) and isinstance(a.msg, VoteRequest)]
    assert node.term == 0 and node.voted_for is None and node.role == FOLLOWER
    assert node.status()["store_error"] == "No space left on device"
    assert node.tick(L + 0.02) == []   # nothing was pending: no VoteRequest(pre_vote=False) went out


@pytest.mark.timeout(30)
def test_no_vote_is_granted_when_it_cannot_be_saved() -> None:
    store = JournalStore()
    voter = LeaseElection("b", ["a", "b", "c"], CFG, store, lambda: (0, 0), now=0.0)
    store.fail = True
    assert voter.on_message(VoteRequest(1, "a", 0, 0, pre_vote=False), now=L + 1) == []
    assert voter.term == 0 and voter.voted_for is None
    store.fail = False
    assert not [a for a in voter.tick(L + 1.01) if isinstance(a, Send) and isinstance(a.msg, VoteReply)]


@pytest.mark.timeout(30)
def test_leader_whose_store_fails_steps_down_at_once() -> None:
    store2 = JournalStore()
    lead2 = LeaseElection("a", ["a", "b", "c"], CFG, store2, lambda: (0, 0), now=0.0, rng=ScriptedRandom([0.0]))
    lead2.tick(L)
    lead2.on_message(VoteReply(0, "b", True, True), now=L)
    lead2.on_message(VoteReply(1, "b", True, False), now=L)
    assert lead2.is_leader(L)
    store2.fail = True
    acts = lead2.on_message(LeaseAck(5, "c", 1, False), now=L + 0.1)
    assert acts[0] == SteppedDown(1, "term store failure: No space left on device")
    assert not lead2.is_leader(L + 0.1) and lead2.term == 1


@pytest.mark.timeout(30)
def test_term_and_vote_survive_a_restart(tmp_path) -> None:
    store = FileTermStore(tmp_path / "lease" / "term.json")
    voter = LeaseElection("b", ["a", "b", "c"], CFG, store, lambda: (0, 0), now=0.0)
    voter.on_message(VoteRequest(4, "a", 0, 0, pre_vote=False), now=L)
    assert store.load() == (4, "a")
    again = LeaseElection("b", ["a", "b", "c"], CFG, FileTermStore(tmp_path / "lease" / "term.json"),
                          lambda: (0, 0), now=100.0)
    assert (again.term, again.voted_for) == (4, "a")
    assert not again.on_message(VoteRequest(4, "c", 0, 0, pre_vote=False), now=200.0)[0].msg.granted


@pytest.mark.timeout(30)
def test_file_term_store_round_trip_and_missing_file(tmp_path) -> None:
    path = tmp_path / "term.json"
    store = FileTermStore(path)
    assert store.load() == (0, None)
    store.save(3, "node-a")
    assert store.load() == (3, "node-a")
    assert json.loads(path.read_text()) == {"term": 3, "version": 1, "voted_for": "node-a"}
    store.save(4, None)
    assert FileTermStore(path).load() == (4, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["term.json"]  # no temp files left
    with pytest.raises(ValueError):
        store.save(-1, None)


@pytest.mark.timeout(30)
def test_file_term_store_replaces_atomically(tmp_path, monkeypatch) -> None:
    path = tmp_path / "term.json"
    store = FileTermStore(path)
    store.save(3, "a")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store.save(4, "b")
    assert len(synced) == 2   # the temp file, then the directory

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(TermStoreError, match="term.json"):
        store.save(5, "c")
    assert store.load() == (4, "b")              # the old record is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["term.json"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content", [
    b"", b"{not json", b"\xff\xfe", b"[]", b'{"version": 1, "term": 3}',
    b'{"version": 2, "term": 3, "voted_for": null}', b'{"version": 1, "term": -1, "voted_for": null}',
    b'{"version": 1, "term": "3", "voted_for": null}', b'{"version": 1, "term": true, "voted_for": null}',
    b'{"version": 1, "term": 3, "voted_for": 7}',
])
def test_corrupt_term_file_is_a_clear_error(tmp_path, content) -> None:
    path = tmp_path / "term.json"
    path.write_bytes(content)
    with pytest.raises(TermStoreError) as e:
        FileTermStore(path).load()
    assert str(path) in str(e.value)
    with pytest.raises(TermStoreError):
        LeaseElection("a", ["a"], CFG, FileTermStore(path), lambda: (0, 0), now=0.0)


@pytest.mark.timeout(30)
def test_memory_store_counts_saves() -> None:
    store = MemoryTermStore()
    node = LeaseElection("a", ["a"], CFG, store, lambda: (0, 0), now=0.0)
    node.tick(0.0)
    assert store.save_count == 1 and store.load() == (1, "a")


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_resign_steps_down_and_holds_off_a_lease_duration():
    from fabricd.cluster.lease import LeaseConfig, LeaseElection, SteppedDown
    from fabricd.cluster.term_store import MemoryTermStore

    cfg = LeaseConfig()
    node = LeaseElection("a", ["a"], cfg, MemoryTermStore(), lambda: (0, 0), now=0.0)
    node.tick(0.0)
    assert node.is_leader(0.1)
    actions = node.resign(0.2, "log disk full")
    assert any(isinstance(a, SteppedDown) for a in actions) and not node.is_leader(0.2)
    node.tick(0.2 + cfg.lease_duration_s / 2)
    assert not node.is_leader(0.2 + cfg.lease_duration_s / 2)
    node.tick(0.3 + cfg.lease_duration_s)
    assert node.is_leader(0.3 + cfg.lease_duration_s)
