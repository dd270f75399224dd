"""The etcd lease backend against a real etcd server (Debian's etcd-server, started by the
``etcd_server`` fixture on free ports): acquire, keepalive, exclusion, expiry, release, the term
as the leader key's create revision, and stale terms refused.

Each test drives :class:`EtcdLease` objects the way the daemon's loop does (``tick`` every few
tens of milliseconds) and uses its own key prefix. Only the first test runs in CI (~5 s); the
rest wait out etcd lease TTLs and are ``slow``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from fabricd.cluster.etcd_gateway import EtcdGateway
from fabricd.cluster.etcd_lease import EtcdLease, lease_ttl_s
from fabricd.cluster.etcd_session import LEADER_KEY, EtcdSession
from fabricd.cluster.lease_messages import BecameLeader, LeaseConfig, SteppedDown
from fabricd.cluster.term_store import MemoryTermStore

from ..etcd_server import EtcdServer, etcd_missing

pytestmark = [pytest.mark.integration]

CONFIG = LeaseConfig(lease_duration_s=2.0, renew_deadline_s=1.3, retry_period_s=0.2)
TICK_S = 0.03


class Node:
    """One daemon's lease, ticked by the test; records what it did and when."""

    def __init__(self, url: str, prefix: str, node_id: str, voters: list[str], *,
                 store: MemoryTermStore | None = None, position: tuple[int, int] = (0, 0)) -> None:
        self.node_id = node_id
        self.store = store or MemoryTermStore()
        self.position = position
        self.session = EtcdSession(EtcdGateway([url], 0.4), prefix=prefix, node_id=node_id, voters=voters,
                                   ttl_s=lease_ttl_s(CONFIG), period_s=CONFIG.retry_period_s)
        self.lease = EtcdLease(node_id, voters, CONFIG, self.store, self.session, lambda: self.position,
                               time.monotonic())
        self.session.start()
        self.actions: list[tuple[float, object]] = []
        self.leading: list[float] = []   # times it said is_leader() == True

    def tick(self) -> None:
        now = time.monotonic()
        self.actions += [(now, a) for a in self.lease.tick(now)]
        if self.lease.is_leader(now):
            self.leading.append(now)

    def close(self) -> None:
        self.lease.close()


def drive(nodes: list[Node], until: Callable[[], bool], timeout: float) -> float:
    """Tick every node until ``until()``; the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not until():
        assert time.monotonic() - start < timeout, "condition not reached in time: " + \
            "; ".join(f"{n.node_id}: {n.lease.status()}" for n in nodes)
        for n in nodes:
            n.tick()
        time.sleep(TICK_S)
    return time.monotonic() - start


def run_for(nodes: list[Node], seconds: float) -> None:
    end = time.monotonic() + seconds
    drive(nodes, lambda: time.monotonic() >= end, seconds + 5)


def leader_key(url: str, prefix: str):
    _, kvs = EtcdGateway([url], 2.0).range(prefix + LEADER_KEY)
    return kvs[0] if kvs else None


@pytest.fixture
def prefix() -> str:
    return f"/fabricd-test/{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def nodes():
    made: list[Node] = []
    yield made
    for n in made:
        n.close()


def leader_of(nodes: list[Node]) -> Node | None:
    now = time.monotonic()
    return next((n for n in nodes if n.lease.is_leader(now)), None)


def start_three(url: str, prefix: str, nodes: list[Node]) -> Node:
    """Three voters a, b, c (one alone is no majority); the one that leads, once one does."""
    nodes += [Node(url, prefix, n, ["a", "b", "c"]) for n in "abc"]
    drive(nodes, lambda: leader_of(nodes) is not None, 10)
    return leader_of(nodes)


@pytest.mark.timeout(60)
def test_acquire_keepalive_exclusion_and_fast_release(etcd_server, prefix, nodes):
    url = etcd_server.url
    first = start_three(url, prefix, nodes)
    key = leader_key(url, prefix)
    assert key is not None and key.value == first.node_id
    assert first.lease.term == key.create_revision, "the term is the leader key's create revision"
    assert [x for _, x in first.actions if isinstance(x, BecameLeader)] == [BecameLeader(key.create_revision)]
    assert first.store.load() == (key.create_revision, None), "the term is persisted before leading"

    others = [n for n in nodes if n is not first]
    run_for(nodes, 2.5 * lease_ttl_s(CONFIG))   # past several TTLs: the keepalive keeps it
    assert first.lease.is_leader(time.monotonic()) and not any(n.leading for n in others), "a second leader"
    assert not any(isinstance(x, SteppedDown) for _, x in first.actions)
    assert all(n.lease.leader == first.node_id and n.lease.term == key.create_revision for n in others)
    assert leader_key(url, prefix).create_revision == key.create_revision

    released_at = time.monotonic()
    first.actions += [(released_at, x) for x in first.lease.release(released_at, "test: shutting down")]
    assert not first.lease.is_leader(released_at)
    took = drive(nodes, lambda: leader_of(others) is not None, 10)
    assert took < lease_ttl_s(CONFIG), f"the release handed over in {took:.2f} s, no faster than the TTL"
    assert leader_of(others).lease.term > key.create_revision
    assert max(first.leading) < released_at


@pytest.mark.timeout(60)
def test_a_daemon_that_cannot_reach_etcd_does_not_lead_and_says_why(tmp_path):
    """A real daemon configured for etcd at a port nobody listens on (no etcd binary needed):
    it starts, never leads, and its status says why (``degraded``) — then stops promptly."""
    from fabricd.localnode import LocalDaemon, free_port

    url = f"http://127.0.0.1:{free_port()}"
    daemon = LocalDaemon(tmp_path / "node", node_id="solo",
                         cluster_toml=f'[cluster]\nlease_backend = "etcd"\netcd_endpoints = ["{url}"]\n')
    daemon.start()
    try:
        deadline = time.monotonic() + 15
        while not (st := daemon.status())["cluster"]["degraded"]:
            assert time.monotonic() < deadline, st["cluster"]
            time.sleep(0.1)
        assert st["cluster"]["degraded"].startswith(f"etcd: etcd {url} ")
        lease = st["cluster"]["lease"]
        assert lease["backend"] == "etcd" and not st["is_leader"] and lease["etcd_errors"] > 0
    finally:
        started = time.monotonic()
        daemon.stop()
    assert time.monotonic() - started < 10


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_holder_that_stops_renewing_expires_and_another_leads_a_larger_term(etcd_server, prefix, nodes):
    first = start_three(etcd_server.url, prefix, nodes)
    others = [n for n in nodes if n is not first]
    run_for(nodes, 0.5)
    term = first.lease.term
    first.session.close()           # its process hangs or dies: no more keepalives
    stopped = time.monotonic()
    drive(nodes, lambda: leader_of(others) is not None, 15)
    took_over = min(t for n in others for t in n.leading)
    assert max(first.leading) < took_over, "two leaders at once"
    assert max(first.leading) < stopped + CONFIG.renew_deadline_s
    assert any(isinstance(x, SteppedDown) for _, x in first.actions), "the stale holder stepped down"
    new = leader_of(others)
    assert new.lease.term > term
    run_for(nodes, 0.5)
    other = next(n for n in others if n is not new)
    assert other.lease.leader == new.node_id and other.lease.term == new.lease.term


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_log_behind_a_majority_does_not_lead(etcd_server, prefix, nodes):
    url, voters = etcd_server.url, ["a", "b", "c"]
    behind = Node(url, prefix, "a", voters, position=(3, 10))
    nodes.append(behind)
    b = Node(url, prefix, "b", voters, position=(3, 12))
    b.lease.resign(time.monotonic(), "test: b may not lead for a lease")
    c = Node(url, prefix, "c", voters, position=(3, 12))
    c.lease.resign(time.monotonic(), "test: c may not lead for a lease")
    nodes += [b, c]
    run_for(nodes, 1.0)
    assert not behind.leading and leader_key(url, prefix) is None, "a log behind a majority took the lease"
    assert behind.lease.status()["behind"] > 0
    drive(nodes, lambda: any(n.lease.is_leader(time.monotonic()) for n in (b, c)), 10)
    assert not behind.leading


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_unreachable_etcd_leader_stops_before_its_lease_expires(tmp_path, nodes):
    if etcd_missing():
        pytest.skip(etcd_missing())
    with EtcdServer(tmp_path) as server:
        a = Node(server.url, "/p/", "a", ["a"])
        nodes.append(a)
        drive(nodes, lambda: a.lease.is_leader(time.monotonic()), 10)
        run_for(nodes, 0.5)
        server.pause()   # calls time out: etcd is unreachable
        paused = time.monotonic()
        drive(nodes, lambda: any(isinstance(x, SteppedDown) for _, x in a.actions), 10)
        assert max(a.leading) < paused + CONFIG.renew_deadline_s < paused + lease_ttl_s(CONFIG)
        assert a.lease.status()["etcd_error"].startswith(f"etcd {server.url} ")
        server.resume()
        drive(nodes, lambda: a.lease.is_leader(time.monotonic()), 15)
        assert a.lease.term > [x for _, x in a.actions if isinstance(x, BecameLeader)][0].term


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_term_not_above_the_stored_one_is_refused(etcd_server, prefix, nodes):
    """After an etcd data reset (or terms from the built-in backend) the create revision can be
    at or below terms this node already saw: it does not lead such a term, and once the revision
    passed its stored term it leads a larger one."""
    url = etcd_server.url
    gw = EtcdGateway([url], 2.0)
    revision, _ = gw.range(prefix)
    store = MemoryTermStore()
    store.save(revision + 6, None)   # a term the store holds from "before"
    a = Node(url, prefix, "a", ["a"], store=store)
    nodes.append(a)
    drive(nodes, lambda: a.lease.is_leader(time.monotonic()), 20)
    assert a.lease.status()["terms_refused"] >= 1
    assert a.lease.term > revision + 6
    assert all(x.term > revision + 6 for _, x in a.actions if isinstance(x, BecameLeader))
    assert store.load()[0] == a.lease.term


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_appends_of_the_previous_etcd_term_are_fenced(etcd_server, prefix, nodes, tmp_path):
    """Terms taken from a real handover (create revisions t1 < t2) go through the replication
    layer's fencing unchanged: a shadow that holds t2's records refuses a late append of t1, and
    the old leader is told of the newer term."""
    from fabricd.cluster.log import CheckpointLog
    from fabricd.cluster.replication import LogAck, LogAppend, ReplicationTracker, ShadowReplica
    from fabricd.cluster.state import FabricState, Record

    from ..unit.test_replication import make_records

    first = start_three(etcd_server.url, prefix, nodes)
    t1 = first.lease.term
    first.lease.release(time.monotonic(), "test: hand over")
    others = [n for n in nodes if n is not first]
    drive(nodes, lambda: leader_of(others) is not None, 10)
    second = leader_of(others)
    t2 = second.lease.term
    shadow = next(n for n in others if n is not second)
    drive(nodes, lambda: shadow.lease.term == t2, 5)
    assert t1 < t2

    log = CheckpointLog(tmp_path / "log")
    replica = ShadowReplica(shadow.node_id, log, log.open())
    decided = FabricState()
    old = make_records(decided, t1, 3)
    replica.on_message(LogAppend(t1, first.node_id, 0, [r.to_dict() for r in old], 3, 0), 1.0)
    new = make_records(decided, t2, 2)
    replica.on_message(LogAppend(t2, second.node_id, 3, [r.to_dict() for r in new], 5, t1), 2.0)
    assert log.last_position == (t2, 5)

    late = LogAppend(t1, first.node_id, 5, [Record(t1, 6, "member_seen", {"node": "x", "endpoint": "e"}).to_dict()],
                     6, t2)
    assert t1 < shadow.lease.term, "the daemon's own check (append term < lease term) refuses it too"
    (reply,) = replica.on_message(late, 3.0)
    assert reply.msg == LogAck(term=t2, shadow=shadow.node_id, seq=5, ok=False)
    assert replica.counters["stale_term_rejected"] == 1 and log.last_position == (t2, 5)
    stale_leader = ReplicationTracker(first.node_id, t1, [shadow.node_id], 1, log, clock_now=0.0)
    assert [a.term for a in stale_leader.on_message(reply.msg, 3.0)] == [t2]
    log.close()
