"""A leader that shuts down cleanly releases the lease (``LeaseRelease``): a shadow is elected
without waiting out the lease, and two leases still never overlap. Driven by the fake clock and
in-memory network of test_lease (simulated time, no sleeping)."""

from __future__ import annotations

import random

import pytest

from fabric_client import protocol
from fabricd.cluster.lease import FOLLOWER, LeaseElection, LeaseRelease, LeaseRenew, Send, SteppedDown
from fabricd.cluster.term_store import MemoryTermStore
from fabricd.cluster.wire import from_peer, to_peer

from .test_lease import CFG, L, Net

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _elect(seed: int) -> tuple[Net, str]:
    net = Net(["a", "b", "c"], seed=seed)
    net.run(3 * L)
    lead = net.settled_leader()
    net.run(1.0)  # a few renews acked
    return net, lead


def _until_new_leader(net: Net, old: str, limit_s: float) -> float | None:
    """Simulated seconds until a node other than ``old`` holds the lease (None: not within limit)."""
    start = net.t
    while net.t - start < limit_s:
        net.step(0.01)
        leaders = net.leaders_now()
        if leaders and leaders[0] != old:
            return net.t - start
    return None


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_release_hands_over_before_the_lease_would_have_run_out(seed):
    # Without a release, a voter's grant to the old leader blocks every other candidate for a
    # lease duration after its last ack (at most one retry period before the step-down).
    bound = L - CFG.retry_period_s
    net, lead = _elect(seed)
    term = net.nodes[lead].term
    actions = net.nodes[lead].release(net.local(lead), "shutting down")
    net.apply(lead, actions)
    assert any(isinstance(a, SteppedDown) for a in actions) and not net.nodes[lead].is_leader(net.local(lead))
    sent = [a for a in actions if isinstance(a, Send)]
    assert {a.to for a in sent} == set(net.ids) - {lead}
    assert all(a.msg == LeaseRelease(term=term, leader=lead) for a in sent)
    net.paused.add(lead)  # it is going away: it no longer ticks nor hears anything
    took = _until_new_leader(net, lead, bound)
    assert took is not None and took < bound, f"no new leader {bound:.2f}s after the release"
    new = net.leaders_now()[0]
    assert net.nodes[new].term == term + 1 and net.winners[term + 1] == new


@pytest.mark.parametrize("seed", [1, 2])
def test_without_the_release_the_shadows_wait_out_the_lease(seed):
    """The comparison that makes the test above meaningful: resign alone (no message) leaves the
    followers' grants standing, so nobody leads within the same bound."""
    bound = L - CFG.retry_period_s
    net, lead = _elect(seed)
    net.apply(lead, net.nodes[lead].resign(net.local(lead), "no release"))
    net.paused.add(lead)
    assert _until_new_leader(net, lead, bound) is None
    assert _until_new_leader(net, lead, 3 * L) is not None  # but it recovers after the lease


def test_release_when_not_leading_sends_nothing():
    node = LeaseElection("b", ["a", "b", "c"], CFG, MemoryTermStore(), lambda: (0, 0), now=0.0)
    assert node.release(1.0, "shutting down") == []
    assert node.role == FOLLOWER


def test_release_only_ends_the_grant_to_its_sender():
    node = LeaseElection("c", ["a", "b", "c"], CFG, MemoryTermStore(), lambda: (0, 0), now=0.0)
    node.on_message(LeaseRenew(term=0, leader="a", renew_id=1), 5.0)
    assert node.status()["granted_to"] == "a"
    # a release from another node, or from an older term, changes nothing
    node.on_message(LeaseRelease(term=0, leader="b"), 5.1)
    assert node.status()["granted_to"] == "a" and node.leader == "a"
    node.on_message(LeaseRenew(term=3, leader="a", renew_id=2), 5.2)  # term 3 now
    before = node.status()["stale_rejected"]
    node.on_message(LeaseRelease(term=2, leader="a"), 5.3)
    assert node.status()["stale_rejected"] == before + 1 and node.status()["granted_to"] == "a"
    # the holder's own release of the current term ends it: no leader, no sticky grant
    node.on_message(LeaseRelease(term=3, leader="a"), 5.4)
    st = node.status()
    assert st["granted_to"] is None and node.leader is None
    assert st["pre_votes_started"] == 0
    node.tick(5.4 + CFG.retry_period_s + 1e-6)  # campaigns within one jitter, not a lease
    assert node.status()["pre_votes_started"] == 1


@pytest.mark.parametrize("seed", range(6))
def test_releases_on_a_lossy_network_never_overlap(seed):
    """Leaders release at random moments while messages are delayed, reordered and dropped; the
    harness checks at every step that at most one node holds the lease and one wins per term."""
    rng = random.Random(seed)
    net = Net(["a", "b", "c", "d", "e"], seed=seed)
    net.drop_p = 0.1
    net.delay = lambda src, dst: rng.uniform(0.001, 0.2)
    releases = 0
    for _ in range(40):
        net.run(rng.uniform(0.2, 1.5))
        for i in net.ids:
            if net.nodes[i].is_leader(net.local(i)) and rng.random() < 0.5:
                net.apply(i, net.nodes[i].release(net.local(i), "test"))
                releases += 1
    assert releases > 5 and net.max_leaders_seen == 1
    net.drop_p = 0.0
    net.run(4 * L)
    net.settled_leader()


def test_release_travels_as_a_peer_message():
    msg = LeaseRelease(term=7, leader="node-a")
    envelope, payload = to_peer("node-a", msg)
    assert envelope.kind == "lease_release" and payload == []
    decoded, frames = protocol.decode(protocol.encode(envelope, payload))
    assert from_peer(decoded, frames) == msg
