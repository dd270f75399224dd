"""The metrics registry without sockets: the catalogue, the typed counters the status document
reads, the feeds that turn role processes' running totals into counters, and the exposition."""

from __future__ import annotations

import collections
import re
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fabric_client import protocol
from fabricd.metrics import (
    CATALOGUE, CONSTRUCTOR_BUSY, COUNTER, DROPPED, SOURCE_UNITS, TRAINER_BATCHES, TRAINER_WAIT, UNROUTABLE_REPLY, CounterFeed,
    FabricMetrics,
)
from fabricd.metrics_reading import feed_role_stats
from fabricd.planner.quality import step_balance
from fabricd.planner.plan import StepPlan
from fabricd.roles.base import RoleArgs
from fabricd.roles.supervisor import RoleProcess

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def families(metrics: FabricMetrics) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        out[family.name] = {tuple(sorted(s.labels.items())): s.value for s in family.samples
                            if not s.name.endswith("_created")}
    return out


def test_the_catalogue_follows_prometheus_conventions():
    names = [spec.name for spec in CATALOGUE]
    assert len(names) == len(set(names)), "a metric declared twice"
    for spec in CATALOGUE:
        assert re.fullmatch(r"fabricd_[a-z_]+", spec.name), spec.name
        assert not spec.name.endswith("_total"), "counters get _total on the wire"
        assert spec.help.endswith(".") and len(spec.help) > 20, spec.name
        assert all(re.fullmatch(r"[a-z_]+", label) for label in spec.labels)
        if "seconds" in spec.name or "bytes" in spec.name:
            assert spec.name.endswith(("_seconds", "_bytes")), f"{spec.name}: the unit goes last"


def test_a_feed_counts_what_each_reading_adds_and_a_restart_in_full():
    feed = CounterFeed()
    feed.feed(("r", 1), ("j",), 5)
    feed.feed(("r", 1), ("j",), 8)
    feed.feed(("r2", 7), ("j",), 2)  # another process of the same labels
    assert feed.totals == {("j",): 10}
    feed.feed(("r", 1), ("j",), 3)  # the process started over (same key, lower reading)
    assert feed.totals == {("j",): 13}
    feed.feed(("r", 2), ("j",), 4)  # the restarted role under its new pid
    assert feed.totals == {("j",): 17}
    feed.forget(lambda source: source == ("r", 2))
    feed.feed(("r", 1), ("j",), 6)  # forgotten: a reading from it would count in full again
    assert feed.totals == {("j",): 23}


def test_status_reads_the_same_counters_with_the_keys_it_always_had():
    m = FabricMetrics("a", "0")
    m.events.requests += 3
    for reason in ("malformed", "malformed", "forbidden", UNROUTABLE_REPLY):
        m.dropped.add("control", reason)
    m.dropped.add("peer", "send_queue_full")
    m.dropped.add("stream", "malformed")
    assert m.status_counters() == {"malformed_dropped": 3, "requests": 3, "unroutable_replies": 1,
                                   "peer_sends_dropped": 1, "proposals_refused": 0, "stale_refused": 0}
    assert m.status_dropped() == {"malformed": 2, "forbidden": 1}
    m.refresh({})
    got = families(m)
    assert got["fabricd_control_messages"] == {(): 3.0}
    assert got["fabricd_dropped_messages"][(("reason", "malformed"), ("socket", "control"))] == 2
    assert got["fabricd_dropped_messages"][(("reason", "unroutable_reply"), ("socket", "control"))] == 1
    assert got["fabricd_dropped_messages"][(("reason", "malformed"), ("socket", "stream"))] == 1


def test_each_daemon_has_its_own_registry_and_scrapes_read_the_last_snapshot():
    a, b = FabricMetrics("a", "0"), FabricMetrics("b", "0")
    a.events.requests += 1
    assert families(a)["fabricd_control_messages"] == {(): 0.0}  # not published yet
    a.refresh({})
    b.refresh({})
    assert families(a)["fabricd_control_messages"] == {(): 1.0}
    assert families(b)["fabricd_control_messages"] == {(): 0.0}
    assert families(a)["fabricd_node_info"] == {(("node", "a"), ("version", "0")): 1.0}
    assert not any(n.startswith("fabricd_") for n in REGISTRY._names_to_collectors)  # not the global one
    a.refresh({TRAINER_WAIT: {("j", "dp0/mp0"): 1.5}})
    assert families(a)["fabricd_trainer_data_wait_seconds"] == {(("job", "j"), ("trainer", "dp0/mp0")): 1.5}
    assert {spec.name for spec in CATALOGUE} <= set(families(a))


def test_due_refreshes_at_most_every_refresh_s():
    m = FabricMetrics("a", "0")
    assert m.due(10.0) and not m.due(10.5) and m.due(11.0)


def _role(kind: str, pid: int, **stats) -> RoleProcess:
    args = RoleArgs(kind=kind, role_id=f"j/{kind}/0", daemon="", job="j", spec_path="", spec_origin="",
                    bind_host="127.0.0.1", heartbeat_s=1.0, max_message_bytes=1 << 20)
    role = RoleProcess(args=args, proc=SimpleNamespace(pid=pid, poll=lambda: None))
    role.stats = protocol.RoleCounters(**stats)
    return role


def test_role_stats_feed_trainers_sources_and_drops_across_a_restart():
    m = FabricMetrics("a", "0")
    feed_role_stats(m, _role("constructor", 10, delivered=[(0, 0, 4, 0.5), (1, 0, 3, 0.25)], malformed=1,
                             busy_s=2.0))
    feed_role_stats(m, _role("constructor", 10, delivered=[(0, 0, 6, 0.75), (1, 0, 3, 0.25)], malformed=1,
                             busy_s=2.5))
    feed_role_stats(m, _role("constructor", 11, delivered=[(0, 0, 2, 0.5)], busy_s=0.25))  # restarted: counts from 0
    feed_role_stats(m, _role("source_loader", 12, source="s", units=40, busy_s=1.0, forbidden=2))
    assert m.feeds[TRAINER_BATCHES].totals == {("j", "dp0/mp0"): 8, ("j", "dp1/mp0"): 3}
    assert m.feeds[TRAINER_WAIT].totals == {("j", "dp0/mp0"): 1.25, ("j", "dp1/mp0"): 0.25}
    assert m.feeds[SOURCE_UNITS].totals == {("j", "s"): 40}
    assert m.feeds[CONSTRUCTOR_BUSY].totals == {("j", "j/constructor/0"): 2.75}  # the loaders' busy time is not in it
    assert m.feeds[DROPPED].totals == {("stream", "malformed"): 1, ("stream", "forbidden"): 0,
                                       ("loader", "malformed"): 0, ("loader", "forbidden"): 2}
    assert all(spec.kind == COUNTER for spec in m.feeds)


def test_step_balance_is_max_over_mean_and_its_lower_bound():
    rank = np.array([0, 0, 1, 2], np.int32)
    cost = np.array([1.0, 1.0, 5.0, 2.0])
    plan = StepPlan(step=7, dp_size=3, rank=rank, micro=np.zeros(4, np.int32), source=np.zeros(4, np.int32),
                    sample_id=np.arange(4, dtype=np.int64), piece=np.zeros(4, np.int32),
                    tokens=np.ones(4, np.int32), cost=cost, num_micro=np.ones(3, np.int32))
    b = step_balance(plan)
    assert b.step == 7
    assert b.max_over_mean == pytest.approx(5.0 / 3.0)
    assert b.bound == pytest.approx(5.0 / 3.0)  # the 5.0 unit alone is above the mean share
    empty = StepPlan(step=0, dp_size=2, rank=rank[:0], micro=rank[:0], source=rank[:0],
                     sample_id=np.zeros(0, np.int64), piece=rank[:0], tokens=rank[:0], cost=cost[:0],
                     num_micro=np.ones(2, np.int32))
    assert (step_balance(empty).max_over_mean, step_balance(empty).bound) == (1.0, 1.0)


def test_pss_is_read_at_most_every_refresh_interval_and_cpu_rss_every_time(monkeypatch):
    """smaps_rollup costs milliseconds per process: a snapshot a second over dozens of roles
    reads it once per PSS_REFRESH_S per process, and CPU and RSS on every snapshot."""
    import psutil

    from fabricd import metrics_reading as mr

    calls = []
    real = psutil.Process.memory_full_info

    def counted(self):
        calls.append(self.pid)
        return real(self)

    monkeypatch.setattr(psutil.Process, "memory_full_info", counted)
    proc, cache, labels = psutil.Process(), {}, ("", "daemon", "daemon")
    readings = []
    for now in (100.0, 101.0, 100.0 + mr.PSS_REFRESH_S - 0.1, 100.0 + mr.PSS_REFRESH_S + 0.1):
        r = collections.defaultdict(dict)
        mr._usage(proc, labels, r, cache, now)
        readings.append(r)
    assert len(calls) == 2  # the first snapshot and the one past the interval
    assert all(labels in r[mr.ROLE_PSS] and labels in r[mr.ROLE_RSS] and labels in r[mr.ROLE_CPU] for r in readings)
    assert readings[1][mr.ROLE_PSS][labels] == readings[0][mr.ROLE_PSS][labels]
