"""The pool autoscaler: sizes from measured demand and capacity, with hysteresis (fake time)."""

from __future__ import annotations

import math

import pytest

from fabricd.cluster.autoscale import (GROW_AFTER, GROW_STEP, SHRINK_AFTER_S, PoolAutoscaler, PoolReading,
                                       pool_bounds, weights_now_and_ahead)
from fabricd.cluster.placement import loader_id
from fabricd.cluster.telemetry import NodeTelemetry, RoleProcessTelemetry
from fabricd.config import load_job_spec
from fabricd.planner import MixtureSchedule
from fabricd.spec_bounds import MAX_ROLE_SLOTS, MAX_ROLES_PER_DAEMON, MAX_WORKERS_PER_SOURCE, role_slots

from ..conftest import write_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Pool:
    """A simulated pool: ``workers`` each loading ``capacity`` units per busy second, asked for
    ``demand`` units per second (served up to what the workers can do)."""

    def __init__(self, workers: int, capacity: float, demand: float, base: int = 1, maximum: int = 8,
                 job: str = "j", source: str = "s", spare_cpus: float | None = None, cpu_per_worker: float = 1.0,
                 spare_roles: int = 1 << 30) -> None:
        self.workers, self.capacity, self.demand, self.base, self.maximum = workers, capacity, demand, base, maximum
        self.job, self.source = job, source
        self.spare_cpus, self.cpu_per_worker, self.spare_roles = spare_cpus, cpu_per_worker, spare_roles
        self.units = {}
        self.busy = {}
        self.weights = (0.5, 0.5)
        self.headroom = True

    def run(self, dt: float) -> None:
        served = min(self.demand, self.workers * self.capacity)
        for w in range(self.workers):
            rid = f"{self.job}/loader/{self.source}/{w}"
            self.units[rid] = self.units.get(rid, 0.0) + served * dt / self.workers
            self.busy[rid] = self.busy.get(rid, 0.0) + served * dt / self.workers / self.capacity

    def reading(self) -> PoolReading:
        counters = {r: (self.units[r], self.busy[r]) for r in self.units if int(r.rsplit("/", 1)[1]) < self.workers}
        return PoolReading(self.job, self.source, self.workers, self.base, self.maximum, counters, *self.weights,
                           headroom=self.headroom, spare_cpus=self.spare_cpus, spare_roles=self.spare_roles,
                           cpu_per_worker=self.cpu_per_worker)


def drive(scaler: PoolAutoscaler, pool: Pool, seconds: float, *, headroom: bool = True, dt: float = 2.0,
          start: float = 0.0) -> list[int]:
    """Evaluate every ``dt`` for ``seconds``, applying resizes; returns the sizes decided."""
    sizes, t = [], start
    pool.headroom = headroom
    while t <= start + seconds:
        pool.run(dt)
        for r in scaler.evaluate(t, [pool.reading()]):
            sizes.append(r.size)
            pool.workers = r.size
        t += dt
    return sizes


def test_a_saturated_pool_grows_until_it_keeps_up_then_holds():
    pool = Pool(workers=1, capacity=100.0, demand=420.0)
    sizes = drive(PoolAutoscaler(), pool, 60)
    # 420 units/s at 100/worker and a 0.7 target: 6 workers; saturation reveals the demand step by step
    assert sizes and sizes == sorted(sizes) and pool.workers == 6, sizes
    assert drive(PoolAutoscaler(), Pool(workers=6, capacity=100.0, demand=420.0), 60) == []


def test_growth_waits_for_consecutive_evaluations_and_for_headroom():
    pool = Pool(workers=1, capacity=100.0, demand=300.0)
    scaler = PoolAutoscaler()
    # the first evaluation only records; then GROW_AFTER evaluations wanting more
    assert drive(scaler, pool, 2.0 * GROW_AFTER - 0.1) == []
    assert drive(PoolAutoscaler(), Pool(workers=1, capacity=100.0, demand=300.0), 60, headroom=False) == []


def test_an_idle_pool_shrinks_back_to_its_base_after_the_hysteresis_delay():
    pool = Pool(workers=4, capacity=100.0, demand=10.0, base=2)
    scaler = PoolAutoscaler()
    assert drive(scaler, pool, SHRINK_AFTER_S - 4) == [], "no shrink before the hysteresis delay"
    sizes = drive(scaler, pool, 3 * SHRINK_AFTER_S, start=SHRINK_AFTER_S - 2)
    assert sizes == [2] and pool.workers == 2, sizes


def test_a_pool_shrinks_to_the_largest_size_it_wanted_over_the_delay():
    pool = Pool(workers=12, capacity=100.0, demand=300.0, maximum=16)  # 300/s at 70 per worker: 5 wanted
    scaler = PoolAutoscaler()
    sizes = drive(scaler, pool, SHRINK_AFTER_S / 2)
    pool.demand = 100.0                                                # 2 wanted from here on
    sizes += drive(scaler, pool, SHRINK_AFTER_S / 2 + 4, start=SHRINK_AFTER_S / 2 + 2)
    assert sizes == [5], sizes
    sizes = drive(scaler, pool, 2 * SHRINK_AFTER_S, start=SHRINK_AFTER_S + 8)
    assert sizes == [2], sizes


def test_lookahead_grows_a_pool_before_its_weight_rises():
    pool = Pool(workers=1, capacity=100.0, demand=40.0)  # 40% busy now: enough for today
    pool.weights = (0.1, 0.5)                            # but its weight will be 5× within the lookahead
    # demand ahead 200/s at 100/worker and a 0.7 target → 3 workers; growth at most doubles per step
    assert drive(PoolAutoscaler(), pool, 20) == [2, 3]
    flat = Pool(workers=1, capacity=100.0, demand=40.0)
    assert drive(PoolAutoscaler(), flat, 20) == [], "the same pool without a rise ahead stays as it is"


def test_restarted_worker_counters_are_not_negative_demand():
    scaler = PoolAutoscaler()
    base = dict(job="j", source="s", size=2, base=1, maximum=4, weight_now=0.5, weight_ahead=0.5)
    scaler.evaluate(0.0, [PoolReading(counters={"a": (1000.0, 9.0), "b": (1000.0, 9.0)}, **base)])
    # "a" restarted: its counters began again from 0; nothing may come out negative or shrink at once
    assert scaler.evaluate(2.0, [PoolReading(counters={"a": (50.0, 0.5), "b": (1100.0, 10.0)}, **base)]) == []


def test_weights_ahead_follow_the_schedule_exactly(tmp_path):
    spec = load_job_spec(write_job(tmp_path / "j.toml", tmp_path))  # linear: longdocs 0.1 at step 0 → 0.3 at step 4
    schedule = MixtureSchedule(spec.mixture.kind, spec.mixture.as_points(), [s.name for s in spec.sources])
    now_and_ahead = weights_now_and_ahead(schedule, 0, spec.autoscale.lookahead_steps)
    assert now_and_ahead["longdocs"][0] == pytest.approx(0.1) and now_and_ahead["longdocs"][1] == pytest.approx(0.3)
    assert now_and_ahead["captions"] == pytest.approx((0.3, 0.3))  # falling weight: the max is now
    assert weights_now_and_ahead(schedule, 10, spec.autoscale.lookahead_steps)["longdocs"] == pytest.approx((0.3, 0.3))


def test_pool_bounds_come_from_the_spec(tmp_path):
    spec = load_job_spec(write_job(tmp_path / "j.toml", tmp_path))
    assert pool_bounds(spec, "captions", 2) == (2, 8)
    off = load_job_spec(write_job(tmp_path / "k.toml", tmp_path, extra="[autoscale]\nenabled = false\n"))
    assert pool_bounds(off, "captions", 2) == (2, 2)
    capped = load_job_spec(write_job(tmp_path / "m.toml", tmp_path, extra="[autoscale]\nmax_workers = 3\n"))
    assert pool_bounds(capped, "captions", 2) == (2, 3)


def test_headroom_is_per_job_and_one_evaluation_covers_every_pool():
    scaler = PoolAutoscaler()
    a, b = Pool(workers=1, capacity=100.0, demand=300.0, job="a"), Pool(workers=1, capacity=100.0, demand=300.0, job="b")
    a.headroom, b.headroom = False, True
    grown = []
    for t in range(0, 20, 2):
        a.run(2.0)
        b.run(2.0)
        for r in scaler.evaluate(float(t), [a.reading(), b.reading()]):
            grown.append(r.job)
            (a if r.job == "a" else b).workers = r.size
    assert grown and set(grown) == {"b"} and a.workers == 1


def test_with_spare_cores_a_saturated_pool_grows_by_its_size_or_grow_step_at_a_time():
    # 1500 units/s at 100 per worker and a 0.7 target: 22 workers. With 32 spare cores the pool
    # grows 1 → 1 + GROW_STEP → doubling, then to what the demand it now sees asks for
    fast = Pool(workers=1, capacity=100.0, demand=1500.0, maximum=64, spare_cpus=32.0)
    sizes = drive(PoolAutoscaler(), fast, 60)
    assert sizes[:3] == [1 + GROW_STEP, 2 * (1 + GROW_STEP), 4 * (1 + GROW_STEP)] and fast.workers == 22, sizes
    # spare cores unknown (a daemon that does not report them): one worker at a time
    slow = Pool(workers=1, capacity=100.0, demand=1500.0, maximum=64)
    assert drive(PoolAutoscaler(), slow, 60) == list(range(2, 2 + len(drive(PoolAutoscaler(), Pool(
        workers=1, capacity=100.0, demand=1500.0, maximum=64), 60))))
    assert slow.workers < 22


def test_spare_cores_bound_the_growth_at_the_cost_of_the_pools_workers():
    def grown(**kw) -> int:
        pool = Pool(workers=2, capacity=100.0, demand=1000.0, maximum=64, **kw)
        sizes = drive(PoolAutoscaler(), pool, 2.0 * GROW_AFTER)
        return sizes[0] if sizes else 2
    assert grown(spare_cpus=3.0) == 2 + 3                       # three workers of a core each
    assert grown(spare_cpus=3.0, cpu_per_worker=0.5) == 2 + 4   # six half-core ones, but GROW_STEP at most
    assert grown(spare_cpus=0.5) == 2                           # not even one worker's core to spare
    assert grown(spare_cpus=30.0, spare_roles=2) == 2 + 2       # no more workers than role slots left
    assert grown(spare_cpus=0.1, cpu_per_worker=0.0) == 2 + 2   # a worker costs something whatever it reports
    assert grown(spare_cpus=None) == 2 + 1                      # spare unknown: one worker
    assert grown(spare_cpus=math.inf) == 2 + 4                  # no CPU guard: the whole step
    assert grown(spare_cpus=None, spare_roles=0) == 2           # ... while a role slot is left


def test_pools_growing_together_share_the_spare_cores_in_turn():
    scaler = PoolAutoscaler()
    pools = [Pool(workers=1, capacity=100.0, demand=1000.0, maximum=64, job=j, source=s, spare_cpus=7.0)
             for j, s in (("b", "x"), ("a", "y"), ("a", "x"))]
    grown: dict[tuple[str, str], int] = {}
    for t in range(0, 2 * GROW_AFTER + 1, 2):
        for p in pools:
            p.run(2.0)
        for r in scaler.evaluate(float(t), [p.reading() for p in pools]):
            grown[(r.job, r.source)] = r.size - r.previous
    # 7 cores: one worker each (3), then one each in (job, source) order (3), then a/x again (1)
    assert grown == {("a", "x"): 3, ("a", "y"): 2, ("b", "x"): 2}, grown


def test_a_daemon_has_a_role_slot_per_core_when_it_has_more_cores_than_the_fixed_bound():
    assert role_slots(0) == role_slots(16) == MAX_ROLES_PER_DAEMON  # unreported, or fewer cores
    assert role_slots(192) == 192
    assert role_slots(10**9) == MAX_ROLE_SLOTS  # a beat's count never lets pools grow without bound


def test_the_default_cap_is_the_clusters_cores_when_they_are_more_than_4_x_the_base(tmp_path):
    spec = load_job_spec(write_job(tmp_path / "j.toml", tmp_path))
    assert pool_bounds(spec, "captions", 2, cpus=6) == (2, 8)
    assert pool_bounds(spec, "captions", 2, cpus=64) == (2, 64)
    assert pool_bounds(spec, "captions", 2, cpus=100_000) == (2, MAX_WORKERS_PER_SOURCE)
    capped = load_job_spec(write_job(tmp_path / "m.toml", tmp_path, extra="[autoscale]\nmax_workers = 3\n"))
    assert pool_bounds(capped, "captions", 2, cpus=64) == (2, 3)


def test_the_leader_reads_cores_cpu_and_roles_from_the_heartbeats(tmp_path, tiny_corpus):
    """The leader's readings: the cluster's cores set the cap and, less the CPU in use, the
    budget; the busiest worker's CPU its cost; a node over the memory guard counts for nothing."""
    from fabricd.leadership import Leadership

    from .test_cluster_controller import ClusterController, _cfg
    from .test_plan_changes import ready_runtime

    spec = load_job_spec(write_job(tmp_path / "j.toml", tiny_corpus, name="j", extra="[autoscale]\ncpu_guard_percent = 80\n"))
    c = ClusterController(_cfg(tmp_path), now=0.0, cpus=16)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    assert c.members.members["a"].cpus == 16
    c.propose([("job_submitted", {"job": "j", "spec_toml": spec.text, "spec_origin": spec.file,
                                  "fingerprint": "", "dp_size": 2})], 0.01)
    runtime = ready_runtime(spec, tmp_path)
    assert runtime.state == "ready", runtime.error
    lead = Leadership(c.cfg, c, {"j": runtime}, lambda entries, now: True)
    me = c.members.members["a"]

    def beat(t: float, cpu_percent: float, mem: float = 50.0) -> list:
        # every pool: one worker, busy all the time, at 1.5 cores for captions and 0.5 for the others
        procs = {loader_id("j", s.name, 0): RoleProcessTelemetry(
            units=int(100 * t), busy_s=t, cpu_percent=150.0 if s.name == "captions" else 50.0)
            for s in spec.sources}
        me.telemetry = NodeTelemetry(cpu_percent=cpu_percent, mem_used_percent=mem, roles=60, role_processes=procs)
        return lead._autoscale(t, ["a"])

    beat(0.0, 30.0)
    beat(2.0, 30.0)
    seen = []
    real = lead._autoscaler[1].evaluate

    def spy(now, readings):
        readings = list(readings)
        seen.extend(readings)
        return real(now, readings)
    lead._autoscaler[1].evaluate = spy
    resized = beat(4.0, 30.0)
    r = {x.source: x for x in seen}
    assert r["captions"].maximum == 16 and r["captions"].spare_cpus == pytest.approx(16 * 0.5)
    assert r["captions"].cpu_per_worker == pytest.approx(1.5) and r["code"].cpu_per_worker == pytest.approx(0.5)
    assert r["captions"].spare_roles == MAX_ROLES_PER_DAEMON - 60
    # saturated: every pool wants 1 + GROW_STEP; 8 cores and 4 role slots: one worker each (4 slots)
    grown = {d["source"]: d["workers"] for _, d in resized}
    assert len(spec.sources) > 4 and sorted(grown.values()) == [2] * 4, grown
    seen.clear()
    beat(6.0, 30.0, mem=95.0)
    assert all(x.spare_cpus == 0.0 and not x.headroom for x in seen)  # the only node is over the memory guard
    seen.clear()
    me.cpus = 128  # a big node: a slot per core, not MAX_ROLES_PER_DAEMON
    beat(7.0, 30.0)
    assert seen and all(x.spare_roles == 128 - 60 for x in seen)
    seen.clear()
    me.cpus = 0  # a daemon of an older release: no cores in its beat
    beat(8.0, 30.0)
    assert all(x.spare_cpus is None and x.headroom and x.maximum == 4 for x in seen)
    runtime.close()
    c.log.close()


class Node:
    """Pools on one node of ``cores`` cores: a worker busy for a second uses a core for a second;
    when the pools' busy workers want more cores than the node has, every worker slows alike.
    Reports the node's CPU % and each pool's busiest worker's CPU, as heartbeats do."""

    def __init__(self, cores: int, pools: list[Pool], other_cores: float = 0.0) -> None:
        self.cores, self.pools, self.other = cores, pools, other_cores
        self.cpu_percent = 0.0

    def run(self, dt: float) -> None:
        want = {id(p): min(p.demand / p.capacity, p.workers) for p in self.pools}  # busy workers each wants
        total = sum(want.values()) + self.other
        slow = min(1.0, self.cores / total) if total else 1.0
        for p in self.pools:
            busy = want[id(p)] * slow  # cores this pool gets
            served = busy * p.capacity
            for w in range(p.workers):
                rid = f"{p.job}/loader/{p.source}/{w}"
                p.units[rid] = p.units.get(rid, 0.0) + served * dt / p.workers
                p.busy[rid] = p.busy.get(rid, 0.0) + want[id(p)] * dt / p.workers  # busy: running or runnable
            p.cpu_per_worker = busy / p.workers
        self.cpu_percent = 100.0 * min(1.0, total * slow / self.cores)
        for p in self.pools:
            p.spare_cpus = self.cores * max(0.0, 90.0 - self.cpu_percent) / 100.0
            p.headroom = self.cpu_percent < 90.0


def _grow_on(node: Node, *, unknown_spare: bool = False) -> list[int]:
    """Evaluate ``node``'s pools every 2 s for 60 s, from one worker each, applying resizes; the
    pools' total workers after each evaluation. ``unknown_spare``: as if no daemon reported cores."""
    for p in node.pools:
        p.workers, p.units, p.busy = 1, {}, {}
    scaler, totals = PoolAutoscaler(), []
    for t in range(0, 61, 2):
        node.run(2.0)
        if unknown_spare:
            for p in node.pools:
                p.spare_cpus = None
        for r in scaler.evaluate(float(t), [p.reading() for p in node.pools]):
            next(p for p in node.pools if p.source == r.source).workers = r.size
        totals.append(sum(p.workers for p in node.pools))
    return totals


def test_on_a_16_core_node_five_saturated_pools_fill_the_cores_in_a_few_evaluations_and_stop_at_the_guard():
    """The 16-core end-to-end case: five pools of one worker, each asked for far more than the
    node can do. They grow to what the CPU guard allows within a few growths, and no further."""
    pools = [Pool(workers=1, capacity=100.0, demand=1000.0, maximum=16, source=s)
             for s in ("captions", "code", "interleaved", "longdocs", "ocr")]
    node = Node(16, pools, other_cores=2.0)  # the trainers' share
    totals = _grow_on(node)
    # 16 cores, 2 of them the trainers', a 90% guard: at most 12.4 loader cores. The first growth
    # (the second evaluation with a measurement) takes the whole spare: 7 cores at 44% busy
    assert totals[:3] == [5, 5, 12] and set(totals[3:]) == {12}, totals
    assert node.cpu_percent <= 90.0
    assert max(p.workers for p in pools) - min(p.workers for p in pools) <= 1, [p.workers for p in pools]
    # where the spare is unknown, one worker a pool a growth: slower, and past the guard
    unknown = _grow_on(node, unknown_spare=True)
    assert unknown[2] == 10 and unknown[-1] == 15 and node.cpu_percent == 100.0, unknown
