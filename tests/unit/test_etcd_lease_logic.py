"""The etcd lease backend's decisions, fed observations by hand (no etcd, no sockets), and its
``[cluster]`` config keys. The same code against a real etcd: tests/integration/test_etcd_lease.py.

``ScriptedSession`` stands in for the worker thread's *interface* only (observations out, intent
in); every decision under test is :class:`EtcdLease`'s own.
"""

from __future__ import annotations

import pytest

from fabricd.cluster.etcd_lease import EtcdLease
from fabricd.cluster.etcd_session import Intent, Observation, up_to_date
from fabricd.cluster.lease_messages import BecameLeader, LeaseConfig, SteppedDown
from fabricd.cluster.term_store import MemoryTermStore, TermStoreError
from fabricd.config import load_node_config
from fabricd.errors import ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

CONFIG = LeaseConfig(lease_duration_s=2.0, renew_deadline_s=1.3, retry_period_s=0.2)


class ScriptedSession:
    """The session's interface with observations supplied by the test."""

    endpoint = "http://etcd.test:2379"
    failure = None

    def __init__(self) -> None:
        self.pending: list[Observation] = []
        self.intent = Intent()

    def observations(self) -> list[Observation]:
        out, self.pending = self.pending, []
        return out

    def set_intent(self, intent: Intent) -> None:
        self.intent = intent

    def wait_released(self, release: int, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass


class FailingStore(MemoryTermStore):
    def save(self, term, voted_for):
        raise TermStoreError("term.json", "disk full")


def make(store=None, node="a", voters=("a", "b", "c")):
    session = ScriptedSession()
    lease = EtcdLease(node, voters, CONFIG, store or MemoryTermStore(), session, lambda: (4, 9), now=0.0)
    return lease, session


def feed(lease, session, now, **obs):
    session.pending.append(Observation(**obs))
    return lease.tick(now)


def test_leads_the_create_revision_until_renew_deadline_past_the_last_cycle_start():
    lease, session = make()
    assert session.intent.want_lead and session.intent.position == (4, 9)
    out = feed(lease, session, 0.1, started_at=0.05, holder="a", create_revision=42, ours=True)
    assert BecameLeader(42) in out and lease.term == 42 and lease.is_leader(0.1)
    feed(lease, session, 1.0, started_at=0.9, holder="a", create_revision=42, ours=True)
    assert lease.is_leader(0.9 + 1.29)
    out = feed(lease, session, 1.5, started_at=1.4, error="etcd: timed out")   # etcd unreachable
    assert lease.status()["etcd_error"] == "etcd: timed out" and lease.is_leader(1.5) and not out
    assert not lease.is_leader(0.9 + 1.3)
    out = lease.tick(0.9 + 1.3)
    assert SteppedDown(42, "etcd lease not renewed within renew_deadline_s") in out
    assert session.intent.drop_term == 42, "the key of a term it stepped down from is deleted"


def test_a_term_not_above_the_stored_one_is_never_led():
    store = MemoryTermStore()
    store.save(100, None)
    lease, session = make(store)
    out = feed(lease, session, 0.1, started_at=0.0, holder="a", create_revision=7, ours=True)
    assert not any(isinstance(a, BecameLeader) for a in out) and not lease.is_leader(0.1)
    assert lease.term == 100 and lease.status()["terms_refused"] == 1
    assert session.intent.drop_term == 7
    out = feed(lease, session, 0.5, started_at=0.4, holder="a", create_revision=101, ours=True)
    assert BecameLeader(101) in out and store.load() == (101, None)


def test_a_follower_adopts_higher_terms_and_never_goes_back():
    store = MemoryTermStore()
    lease, session = make(store, node="b")
    feed(lease, session, 0.1, started_at=0.0, holder="a", create_revision=50)
    assert (lease.term, lease.leader, store.load()[0]) == (50, "a", 50)
    feed(lease, session, 0.2, started_at=0.1, holder="c", create_revision=30)   # older key (an etcd reset)
    assert lease.term == 50 and lease.leader is None
    feed(lease, session, 0.3, started_at=0.2, holder="c", create_revision=60)
    assert (lease.term, lease.leader) == (60, "c")
    lease.tick(0.2 + CONFIG.lease_duration_s)   # no word from etcd for a lease: the leader is unknown
    assert lease.leader is None


def test_a_leader_that_sees_another_holder_steps_down_at_once():
    lease, session = make()
    feed(lease, session, 0.1, started_at=0.0, holder="a", create_revision=42, ours=True)
    out = feed(lease, session, 0.2, started_at=0.15, holder="b", create_revision=43)
    assert any(isinstance(a, SteppedDown) for a in out) and not lease.is_leader(0.2) and lease.term == 43


def test_release_steps_down_revokes_and_ignores_views_from_before_it():
    lease, session = make()
    feed(lease, session, 0.1, started_at=0.0, holder="a", create_revision=42, ours=True)
    out = lease.release(0.2, "shutting down")
    assert SteppedDown(42, "shutting down") in out and not lease.is_leader(0.2)
    assert session.intent.release == 1 and not session.intent.want_lead and not session.intent.lease_allowed
    out = feed(lease, session, 0.3, started_at=0.1, holder="a", create_revision=42, ours=True, released=0)
    assert not any(isinstance(a, BecameLeader) for a in out)


def test_a_term_store_that_fails_keeps_it_from_leading():
    lease, session = make(FailingStore())
    out = feed(lease, session, 0.1, started_at=0.0, holder="a", create_revision=42, ours=True)
    assert not any(isinstance(a, BecameLeader) for a in out)
    assert lease.status()["store_error"] == "disk full" and not session.intent.want_lead


def test_peer_lease_messages_are_counted_not_obeyed():
    from fabricd.cluster.lease_messages import VoteRequest
    lease, _ = make()
    assert lease.on_message(VoteRequest(9, "b", 0, 0, False), 0.1) == []
    assert lease.status()["peer_lease_messages"] == 1 and lease.term == 0


@pytest.mark.parametrize("published, ok", [
    ({}, False),                                      # nobody else heard from: no majority
    ({"b": (4, 9)}, True),                            # a and b: a majority of three
    ({"b": (4, 10), "c": (5, 0)}, False),             # both ahead
    ({"b": (4, 10), "c": (3, 99)}, True),             # c is behind (older term)
])
def test_up_to_date_is_raft_voting_over_published_positions(published, ok):
    assert up_to_date((4, 9), "a", {**published, "a": (4, 9)}, ("a", "b", "c")) is ok


# --- config -----------------------------------------------------------------------------------

def _node(tmp_path, cluster: str) -> str:
    p = tmp_path / "n.toml"
    p.write_text(f'[node]\nid = "a"\nstate_dir = "{tmp_path / "st"}"\n[cluster]\n{cluster}\n')
    return str(p)


def test_etcd_keys_load(tmp_path):
    c = load_node_config(_node(tmp_path, 'lease_backend = "etcd"\netcd_endpoints = ["http://10.0.0.1:2379", '
                                         '"http://etcd-2:2379"]\netcd_prefix = "/fabricd/prod/"')).cluster
    assert (c.lease_backend, c.etcd_endpoints, c.etcd_prefix) == (
        "etcd", ("http://10.0.0.1:2379", "http://etcd-2:2379"), "/fabricd/prod/")
    assert load_node_config(_node(tmp_path, "")).cluster.lease_backend == "builtin"


@pytest.mark.parametrize("cluster, key, value", [
    ('lease_backend = "zookeeper"', "cluster.lease_backend", "zookeeper"),
    ('lease_backend = "etcd"', "cluster.etcd_endpoints", []),
    ('lease_backend = "etcd"\netcd_endpoints = ["https://e:2379"]', "cluster.etcd_endpoints", "https://e:2379"),
    ('lease_backend = "etcd"\netcd_endpoints = ["http://e"]', "cluster.etcd_endpoints", "http://e"),
    ('lease_backend = "etcd"\netcd_endpoints = ["http://e:2379/v3"]', "cluster.etcd_endpoints", "http://e:2379/v3"),
    ('lease_backend = "etcd"\netcd_endpoints = "http://e:2379"', "cluster.etcd_endpoints", "http://e:2379"),
    ('lease_backend = "etcd"\netcd_endpoints = ["http://e:2379"]\netcd_prefix = "fabricd"',
     "cluster.etcd_prefix", "fabricd"),
    ('etcd_endpoints = ["http://e:2379"]', "cluster.etcd_endpoints", ["http://e:2379"]),
])
def test_bad_lease_backend_keys_name_file_key_and_value(tmp_path, cluster, key, value):
    path = _node(tmp_path, cluster)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert (info.value.file, info.value.key, info.value.value) == (path, key, value)


def test_gateway_helpers():
    from fabricd.cluster.etcd_gateway import KeyValue, prefix_end, url_problem
    from fabricd.cluster.etcd_session import position_of

    assert prefix_end("/fabricd/nodes/") == "/fabricd/nodes0"
    assert url_problem("http://127.0.0.1:2379") is None and url_problem("http://[::1]:2379") is None
    assert url_problem("http://h:x") and url_problem("unix:///run/etcd.sock")

    def kv(value):
        return KeyValue("/p/nodes/a", value, 5, 5, 7)
    assert position_of(kv('{"term": 3, "seq": 9}')) == (3, 9)
    for bad in ("", "[]", '{"term": -1, "seq": 0}', '{"term": true, "seq": 0}', '{"term": 1}', "{nope"):
        assert position_of(kv(bad)) is None, bad
