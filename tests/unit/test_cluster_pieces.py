"""Placement, membership and the peer wire format (pure pieces of the cluster layer)."""

from __future__ import annotations

import json

import msgspec
import pytest

from fabric_client import protocol

from fabricd.cluster.state import RoleEntry
from fabricd.cluster.telemetry import NodeTelemetry, RoleView
from fabric_client.errors import ProtocolError
from fabricd.cluster.lease import LeaseAck, VoteRequest
from fabricd.cluster.membership import MemberBeat, Membership
from fabricd.cluster.placement import (MEMORY_GUARD_PERCENT, group_hosts, local_changes, nodes_by_host, place_roles,
                                       wanted_roles)
from fabricd.cluster.replication import LogAppend
from fabricd.cluster.wire import from_peer, to_peer
from fabricd.config import load_job_spec

from ..conftest import write_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def _spec(tmp_path, **kw):
    return load_job_spec(write_job(tmp_path / "j.toml", tmp_path, **kw))


def test_wanted_roles_cover_sources_and_groups(tmp_path):
    spec = _spec(tmp_path, dp_size=5, ranks_per_constructor=2)
    wants = wanted_roles(spec, fingerprint="fp", default_workers=2, standby=True)
    ids = [w.role_id for w in wants]
    assert ids.count("t/loader/captions/0") == 1 and "t/loader/captions/1" in ids and "t/loader/captions/2" not in ids
    assert [w.extra["ranks"] for w in wants if w.kind == "constructor" and "standby" not in w.role_id] == [[0, 1], [2, 3], [4]]
    assert sum("standby" in i for i in ids) == 3
    assert not any("standby" in w.role_id for w in wanted_roles(spec, fingerprint="fp", default_workers=2, standby=False))


def test_placement_spreads_pools_and_keeps_live_roles(tmp_path):
    spec = _spec(tmp_path, dp_size=2)
    wants = wanted_roles(spec, fingerprint="fp", default_workers=2, standby=True)
    nodes = ["a", "b", "c"]
    first = place_roles(wants, live=nodes, current={}, load={})
    assert set(first) == {w.role_id for w in wants}
    for source in ("captions", "ocr"):
        assert first[f"t/loader/{source}/0"] != first[f"t/loader/{source}/1"], "a pool must span daemons"
    assert first["t/constructor/0"] != first["t/constructor/0/standby"]
    counts = {n: list(first.values()).count(n) for n in nodes}
    assert max(counts.values()) - min(counts.values()) <= 1
    # nothing moves while its daemon lives; only the dead daemon's roles move, never onto it
    assert place_roles(wants, live=nodes, current=first, load=counts) == {}
    moved = place_roles(wants, live=["a", "c"], current=first, load=counts)
    assert set(moved) == {r for r, n in first.items() if n == "b"}
    assert set(moved.values()) <= {"a", "c"}


def test_placement_counts_roles_per_core_when_every_daemon_reports_its_cores(tmp_path):
    spec = _spec(tmp_path, dp_size=2)
    wants = [w for w in wanted_roles(spec, fingerprint="fp", default_workers=7, standby=False)
             if w.role_id.startswith("t/loader/captions/")]
    assert len(wants) == 7
    placed = place_roles(wants, live=["big", "small"], current={}, load={}, cores={"big": 48, "small": 8})
    # per core: 6/48 = 1/8; the pool still spans both daemons
    assert sorted(placed.values()).count("big") == 6 and list(placed.values()).count("small") == 1
    # a daemon that does not report its cores: by count, as before
    by_count = place_roles(wants, live=["big", "small"], current={}, load={}, cores={"big": 48, "small": 0})
    assert sorted(list(by_count.values()).count(n) for n in ("big", "small")) == [3, 4]
    # equal cores: the same placement as without them
    assert place_roles(wants, live=["a", "b"], current={}, load={}, cores={"a": 16, "b": 16}) == \
        place_roles(wants, live=["a", "b"], current={}, load={})


def test_pool_prefix_is_the_pool_of_a_loader_and_no_pool_of_anything_else():
    from fabricd.cluster.placement import constructor_id, loader_id, loader_prefix, pool_prefix

    for job, source in (("t", "captions"), ("job-a", "s_1")):
        assert pool_prefix(loader_id(job, source, 12)) == loader_prefix(job, source)
    pools = {loader_prefix("t", s) for s in ("captions", "code")}
    for rid in (constructor_id("t", 0), constructor_id("t", 3, standby=True), "daemon", ""):
        assert pool_prefix(rid) not in pools


def test_placement_prefers_constructor_nodes_of_the_job(tmp_path):
    spec = _spec(tmp_path, dp_size=2, extra="")
    spec = spec.__class__(**{**spec.__dict__, "topology": spec.topology.__class__(
        dp_size=2, mp_size=1, ranks_per_constructor=1, constructor_nodes=("c",))})
    placed = place_roles(wanted_roles(spec, fingerprint="fp", default_workers=1, standby=False),
                         live=["a", "b", "c"], current={}, load={})
    assert placed["t/constructor/0"] == placed["t/constructor/1"] == "c"


def test_group_host_is_the_most_declared_then_the_lowest_rank(tmp_path):
    spec = _spec(tmp_path, dp_size=6, mp_size=2, ranks_per_constructor=3)  # groups [0,1,2], [3,4,5]
    declared = {"0/0": ["h2", 5], "1/0": ["h1", 1], "2/1": ["h1", 2], "0/1": ["h2", 3], "3/1": ["h9", 1]}
    # group 0: h2 twice, h1 twice -> the host of the lowest rank (0/0) wins the tie
    assert group_hosts(spec, declared) == {0: "h2", 1: "h9"}
    assert group_hosts(spec, {}) == {}
    on_host = nodes_by_host({"a": {"a", "gpu-1"}, "b": {"b", "gpu-2"}, "c": {"c", "gpu-2"}})
    assert on_host["gpu-2"] == ("b", "c") and on_host["a"] == ("a",) and "nowhere" not in on_host


def test_constructor_moves_to_its_trainers_host_and_its_standby_moves_off(tmp_path):
    spec = _spec(tmp_path, dp_size=2)
    nodes = ["a", "b", "c"]
    before = place_roles(wanted_roles(spec, fingerprint="fp", default_workers=1, standby=True),
                         live=nodes, current={}, load={})
    # trainers of group 0 declare the host of the daemon that holds group 0's standby
    host_node = before["t/constructor/0/standby"]
    wants = wanted_roles(spec, fingerprint="fp", default_workers=1, standby=True, group_nodes={0: (host_node,)})
    counts = {n: list(before.values()).count(n) for n in nodes}
    moved = place_roles(wants, live=nodes, current=before, load=counts)
    after = {**before, **moved}
    assert after["t/constructor/0"] == host_node
    assert after["t/constructor/0/standby"] != host_node, "primary and standby must not share a daemon"
    assert set(moved) == {"t/constructor/0", "t/constructor/0/standby"}, "nothing else moves"
    assert place_roles(wants, live=nodes, current=after, load=counts) == {}, "stable once placed"
    # the host's daemon dies: the constructor goes anywhere live, and comes back when it returns
    away = place_roles(wants, live=[n for n in nodes if n != host_node], current=after, load=counts)
    assert away["t/constructor/0"] != host_node
    back = place_roles(wants, live=nodes, current={**after, **away}, load=counts)
    assert back["t/constructor/0"] == host_node


def test_declared_host_narrowed_by_constructor_nodes(tmp_path):
    spec = _spec(tmp_path, dp_size=1)
    spec = spec.__class__(**{**spec.__dict__, "topology": spec.topology.__class__(
        dp_size=1, mp_size=1, ranks_per_constructor=1, constructor_nodes=("b",))})
    def primary(group_nodes):
        wants = wanted_roles(spec, fingerprint="fp", default_workers=1, standby=False, group_nodes=group_nodes)
        return next(w.prefer for w in wants if w.role_id == "t/constructor/0")
    assert primary({0: ("a", "b", "c")}) == ("b",)  # one host runs all three: the job's choice narrows it
    assert primary({0: ("c",)}) == ("c",)            # the trainers' host wins over the job's choice
    assert primary({}) == ("b",)


def test_loaders_avoid_daemons_short_of_memory(tmp_path):
    spec = _spec(tmp_path, dp_size=1)
    wants = [w for w in wanted_roles(spec, fingerprint="fp", default_workers=2, standby=False)
             if w.kind == "source_loader"]
    full = {"a": MEMORY_GUARD_PERCENT + 5, "b": 10.0, "c": 20.0}
    placed = place_roles(wants, live=["a", "b", "c"], current={}, load={}, memory=full)
    assert "a" not in placed.values() and set(placed.values()) == {"b", "c"}
    # when every daemon is short of memory, roles still go somewhere
    placed = place_roles(wants, live=["a"], current={}, load={}, memory=full)
    assert set(placed.values()) == {"a"}


def test_roles_start_only_on_committed_records_and_stop_at_once():
    def role(job: str, node: str, extra: dict, seq: int) -> RoleEntry:
        return RoleEntry(job=job, kind="source_loader", node=node, extra=extra, term=1, seq=seq)

    roles = {
        "j/a": role("j", "n1", {"x": 1}, 3),
        "j/b": role("j", "n1", {"x": 2}, 7),   # not committed yet
        "j/c": role("j", "n2", {}, 2),          # another daemon's
        "k/d": role("k", "n1", {}, 1),          # a job this node does not run
        "j/e": role("j", "n1", {"x": 9}, 8),   # re-assigned with new arguments
    }
    running = {"j/e": {"x": 5}, "j/gone": {}, "j/a": {"x": 1}}
    stop, start = local_changes(roles, node="n1", jobs={"j"}, commit_seq=5, running=running)
    assert sorted(stop) == ["j/e", "j/gone"]   # moved away or changed: stopped, committed or not
    assert start == []                          # j/a runs already; j/b and j/e wait for their commit
    stop, start = local_changes(roles, node="n1", jobs={"j"}, commit_seq=8, running={"j/a": {"x": 1}})
    assert stop == [] and sorted(start) == ["j/b", "j/e"]
    # records from snapshots written before roles carried their seq count as committed
    legacy = {"j/a": msgspec.convert({"job": "j", "kind": "source_loader", "node": "n1", "extra": {}, "term": 1},
                                     RoleEntry)}
    assert local_changes(legacy, node="n1", jobs={"j"}, commit_seq=0, running={}) == ([], ["j/a"])


def test_membership_liveness_and_restarts():
    m = Membership("a", ["a", "b", "c"], heartbeat_s=0.5, missed_beats=3)
    assert m.live(0.0) == ["a"]
    beat = dict(incarnation="1", term=1, leader="a", telemetry=NodeTelemetry(), roles={})
    assert not m.on_beat("b", **beat, now=1.0)
    assert m.alive("b", 2.4) and not m.alive("b", 2.6)
    assert m.changes(2.0) == [("b", True)] and m.changes(2.1) == []
    assert m.changes(3.0) == [("b", False)] and m.members["b"].deaths == 1
    assert m.on_beat("b", **{**beat, "incarnation": "2"}, now=3.1), "a new incarnation is a restart"
    assert not m.on_beat("zz", **beat, now=3.2) and "zz" not in m.members


@pytest.mark.parametrize("msg", [
    VoteRequest(term=2, candidate="a", last_log_term=1, last_log_seq=9, pre_vote=True),
    LeaseAck(term=2, voter="b", renew_id=4, ok=False),
    MemberBeat(node="a", incarnation="x", term=1, leader="", telemetry=NodeTelemetry(cpu_percent=1.0, trainer_hosts=[("j", 1, 0, "h", 5)]),
               roles={"j/constructor/0": RoleView(endpoint="tcp://h:1", kind="constructor", alive=True, trainers=[(1, 0, 4)])},
               cpus=64),
    LogAppend(term=1, leader="a", prev_seq=0, records=[], commit_seq=0, prev_term=0),
])
def test_peer_messages_round_trip(msg):
    frames = protocol.encode(*to_peer("a", msg))
    envelope, payload = protocol.decode(frames)
    assert from_peer(envelope, payload) == msg


@pytest.mark.parametrize("kind, body", [
    ("vote_request", {"term": "2", "candidate": "a", "last_log_term": 1, "last_log_seq": 9, "pre_vote": True}),
    ("vote_request", {"term": 2, "candidate": "a"}),
    ("lease_ack", {"term": 2, "voter": "b", "renew_id": 4, "ok": 1}),
    ("log_append", {"term": -1, "leader": "a", "prev_seq": 0, "records": [], "commit_seq": 0, "prev_term": 0}),
    ("lease_ack", {"term": 2 ** 62, "voter": "b", "renew_id": 4, "ok": False}),
    ("member_beat", {"node": "a", "incarnation": "x", "term": 1, "leader": "", "roles": {},
                     "telemetry": {"cpu_percent": -1.0}}),
    ("member_beat", {"node": "a", "incarnation": "x", "term": 1, "leader": "", "telemetry": {},
                     "roles": {"r": {"trainers": [[0, 0, 2 ** 70]]}}}),
    ("member_beat", {"node": "a", "incarnation": "x", "term": 1, "leader": "", "telemetry": {},
                     "roles": {"r": "not a view"}}),
    ("member_beat", {"node": "a", "incarnation": "x", "term": 1, "leader": "", "roles": {},
                     "telemetry": {"trainer_hosts": [["j", "0", 0, "h0", 1]]}}),
    ("member_beat", {"node": "a", "incarnation": "x", "term": 1, "leader": "", "roles": {},
                     "telemetry": {"role_processes": 3}}),
    ("member_beat", {"node": "a", "incarnation": "x", "term": 1, "leader": "", "roles": {}, "telemetry": {},
                     "cpus": -2}),
    ("no_such_kind", {}),
    ("vote_request", [[[[[]]]]]),
])
def test_malformed_peer_messages_are_protocol_errors(kind, body):
    with pytest.raises(ProtocolError):
        from_peer(protocol.PeerMessage(sender="a", kind=kind, body=msgspec.Raw(json.dumps(body).encode())))


def test_a_beat_from_an_older_or_a_newer_peer_is_read():
    """Rolling upgrades: a beat without the fields this release added reads their defaults, and
    fields a newer release adds, at any level of the beat, are ignored."""
    old = {"node": "a", "incarnation": "x", "term": 1, "leader": "", "roles": {}, "telemetry": {"cpu_percent": 5.0}}
    beat = from_peer(protocol.PeerMessage(sender="a", kind="member_beat", body=msgspec.Raw(json.dumps(old).encode())), [])
    assert beat.cpus == 0 and beat.telemetry.cpu_percent == 5.0
    newer = {**old, "cpus": 8, "numa_nodes": 2,
             "telemetry": {"cpu_percent": 5.0, "gpu_util": [1, 2], "role_processes": {"j/loader/s/0": {"units": 3, "io_wait_s": 1.0}}},
             "roles": {"j/constructor/0": {"kind": "constructor", "zone": "z"}}}
    beat = from_peer(protocol.PeerMessage(sender="a", kind="member_beat", body=msgspec.Raw(json.dumps(newer).encode())), [])
    assert beat.cpus == 8 and beat.telemetry.role_processes["j/loader/s/0"].units == 3
    assert beat.roles["j/constructor/0"].kind == "constructor"


def test_deeply_nested_peer_body_is_a_protocol_error():
    raw = b'{"t":"peer","sender":"a","kind":"member_beat","body":' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(ProtocolError):
        envelope, _ = protocol.decode([raw])
        from_peer(envelope)
