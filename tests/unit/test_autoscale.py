"""The pool autoscaler: sizes from measured demand and capacity, with hysteresis (fake time)."""

from __future__ import annotations

import pytest

from fabricd.cluster.autoscale import (GROW_AFTER, SHRINK_AFTER_S, PoolAutoscaler, PoolReading, pool_bounds,
                                       weights_now_and_ahead)
from fabricd.config import load_job_spec
from fabricd.planner import MixtureSchedule

from ..conftest import write_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Pool:
    """A simulated pool: ``workers`` each loading ``capacity`` units per busy second, asked for
    ``demand`` units per second (served up to what the workers can do)."""

    def __init__(self, workers: int, capacity: float, demand: float, base: int = 1, maximum: int = 8,
                 job: str = "j") -> None:
        self.workers, self.capacity, self.demand, self.base, self.maximum = workers, capacity, demand, base, maximum
        self.job = job
        self.units = {}
        self.busy = {}
        self.weights = (0.5, 0.5)
        self.headroom = True

    def run(self, dt: float) -> None:
        served = min(self.demand, self.workers * self.capacity)
        for w in range(self.workers):
            rid = f"{self.job}/loader/s/{w}"
            self.units[rid] = self.units.get(rid, 0.0) + served * dt / self.workers
            self.busy[rid] = self.busy.get(rid, 0.0) + served * dt / self.workers / self.capacity

    def reading(self) -> PoolReading:
        counters = {r: (self.units[r], self.busy[r]) for r in self.units if int(r.rsplit("/", 1)[1]) < self.workers}
        return PoolReading(self.job, "s", self.workers, self.base, self.maximum, counters, *self.weights,
                           headroom=self.headroom)


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


def test_an_idle_pool_shrinks_one_worker_at_a_time_back_to_its_base():
    pool = Pool(workers=4, capacity=100.0, demand=10.0, base=2)
    scaler = PoolAutoscaler()
    assert drive(scaler, pool, SHRINK_AFTER_S - 4) == [], "no shrink before the hysteresis delay"
    sizes = drive(scaler, pool, 3 * SHRINK_AFTER_S, start=SHRINK_AFTER_S - 2)
    assert sizes == [3, 2] and pool.workers == 2, sizes


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
