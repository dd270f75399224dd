"""Source-loader pool sizes from measured demand and capacity (pure; the leader feeds it).

Every evaluation the leader hands in, per pool (one job's source), the cumulative counters its
live workers report in heartbeats — units loaded and seconds spent busy — and where the
trainers are in the mixture schedule. From the counters' deltas since the last evaluation:

- *capacity*: units one worker loads per busy second (smoothed);
- *utilization*: busy worker-seconds per second, over the pool's reporting workers;
- *demand*: the units per second the pool serves now, scaled by the source's largest mixture
  weight over the next ``lookahead_steps`` against its weight now, so a pool grows before a
  curriculum moves weight onto it. A source whose weight is 0 now gets its share of the job's
  whole rate at its coming weight.

The wanted size is ``ceil(demand / (capacity × target_utilization))``, clamped to
``[base, maximum]``. A saturated pool hides the demand it cannot serve, so while it is saturated
it wants ``max(its size, GROW_STEP)`` more workers (Kubernetes' HPA grows by default by 100 % or
4 pods, whichever is more): on a node with many cores a pool that starts at one worker reaches
its size in a few evaluations instead of one worker every few seconds.

How much of that it gets is bounded by the CPU the cluster has to spare. The leader hands in,
per job, the cores below its CPU guard on the daemons below the memory guard (``spare_cpus``:
each daemon's cores × (guard − its CPU %)), the role slots left, and per pool the CPU one of its
workers uses (``cpu_per_worker``, the busiest worker's). Workers are granted one at a time around
the growing pools in turn (job, source order), each while its job's spare cores still cover its
pool's ``cpu_per_worker`` and a role slot is left. The budget is the cluster's, shared by every
job evaluated together (each job's own guard decides how much of it that job may use). Where a
daemon with room does not report its cores (an older release, during a rolling upgrade), the
spare is unknown (``None``) and every growing pool gets one worker, as before the budget
existed.

Hysteresis: a pool grows once ``GROW_AFTER`` evaluations in a row wanted more and some daemon
has headroom (memory and CPU below their guards: a worker added where every CPU is busy only
adds contention); a worker just added counts as idle in its first evaluation (its counters only
set its baseline), so a pool waits to see what its last growth did before growing again. It
shrinks after wanting less for ``SHRINK_AFTER_S``, to the largest size it wanted over that time
(HPA's scale-down stabilization: a burst that grew a pool, such as the constructors filling
their prefetch at a job's start, is given back at once rather than one worker every 20 s), and
again only as long later.

Pool sizes change *when* batches arrive, never *what* they contain (the determinism contract).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..config import JobSpec
from ..spec_bounds import MAX_WORKERS_PER_SOURCE
from ..planner import MixtureSchedule

__all__ = [
    "EVALUATE_EVERY_S",
    "GROW_AFTER",
    "GROW_STEP",
    "SATURATED",
    "SHRINK_AFTER_S",
    "PoolAutoscaler",
    "PoolReading",
    "Resize",
    "pool_bounds",
    "weights_now_and_ahead",
]

EVALUATE_EVERY_S = 2.0   # how often the leader evaluates
GROW_AFTER = 2           # evaluations in a row that want more before a pool grows
GROW_STEP = 4            # a saturated pool wants max(its size, this) more workers
SHRINK_AFTER_S = 20.0    # how long a pool must want less before it loses a worker
SATURATED = 0.9          # utilization above which a pool is short of workers whatever the demand says
DEAD_BAND = 0.05         # fraction of a worker of demand that does not ask for one more
_MIN_BUSY_S = 0.05       # busy time below which a capacity measurement is noise
_SMOOTHING = 0.5         # weight of the newest capacity measurement
_MIN_WORKER_CPU = 0.05   # cores a worker is charged at least (one waiting on I/O still costs some)


@dataclass(frozen=True)
class PoolReading:
    """One pool at one evaluation: its size, its bounds, its workers' cumulative counters, the
    source's mixture weight now and (the largest) ahead, the utilization it is sized for,
    whether some live daemon has headroom for another worker, and what growing beyond one more
    worker may spend: the cores its job may still use (``spare_cpus``), the role slots left on
    the live daemons, and the cores one of its workers uses."""

    job: str
    source: str
    size: int
    base: int
    maximum: int
    counters: Mapping[str, tuple[float, float]]  # role_id → (units loaded, seconds busy), cumulative
    weight_now: float
    weight_ahead: float
    target_utilization: float = 0.7
    headroom: bool = True
    spare_cpus: float | None = None   # None: unknown (a daemon with room does not report its cores)
    spare_roles: int = 1 << 30
    cpu_per_worker: float = 1.0


@dataclass(frozen=True)
class Resize:
    job: str
    source: str
    previous: int
    size: int
    reason: str


@dataclass
class _Pool:
    capacity: float | None = None     # units per busy second per worker (smoothed)
    grow_streak: int = 0
    shrink_since: float | None = None
    shrink_to: int = 0                # the largest size wanted since shrink_since


@dataclass
class PoolAutoscaler:
    """Decides pool resizes from successive readings. One per leader term: a new leader starts
    fresh (its first evaluation only records the counters)."""

    _pools: dict[tuple[str, str], _Pool] = field(default_factory=dict)
    _last: dict[str, tuple[float, float]] = field(default_factory=dict)
    _last_time: float | None = None

    def evaluate(self, now: float, readings: Iterable[PoolReading]) -> list[Resize]:
        """Resizes due at ``now``. Call once per evaluation with every pool: rates are per call."""
        readings = list(readings)
        deltas = {}
        for r in readings:
            units = busy = 0.0
            for rid, (u, b) in r.counters.items():
                prev = self._last.get(rid)
                if prev is not None:  # a worker's first reading only sets its baseline
                    pu, pb = prev
                    # counters restart from 0 with a restarted process
                    units += u - pu if u >= pu else u
                    busy += b - pb if b >= pb else b
                self._last[rid] = (u, b)
            deltas[(r.job, r.source)] = (units, busy)
        live = {rid for r in readings for rid in r.counters}
        for rid in list(self._last):
            if rid not in live:
                del self._last[rid]
        dt = None if self._last_time is None else now - self._last_time
        self._last_time = now
        if dt is None or dt <= 0:
            return []
        job_rate: dict[str, float] = {}
        for (job, _), (units, _) in deltas.items():
            job_rate[job] = job_rate.get(job, 0.0) + units / dt
        decided = []
        for r in readings:
            resize = self._decide(now, dt, r, deltas[(r.job, r.source)], job_rate.get(r.job, 0.0))
            if resize is not None:
                decided.append((r, resize))
        return _within_budget(decided)

    def _decide(self, now: float, dt: float, r: PoolReading, delta: tuple[float, float],
                job_rate: float) -> Resize | None:
        pool = self._pools.setdefault((r.job, r.source), _Pool())
        units, busy = delta
        if busy >= _MIN_BUSY_S:
            measured = units / busy
            pool.capacity = measured if pool.capacity is None else (
                _SMOOTHING * measured + (1 - _SMOOTHING) * pool.capacity)
        workers = max(1, len(r.counters))
        utilization = busy / (dt * workers)
        rate = units / dt
        if r.weight_now > 0:
            demand = rate * r.weight_ahead / r.weight_now
        else:
            demand = job_rate * r.weight_ahead
        if pool.capacity is None or pool.capacity <= 0:
            wanted = r.size
        else:  # within DEAD_BAND of a whole worker counts as enough: no flapping on rounding noise
            wanted = math.ceil(demand / (pool.capacity * r.target_utilization) - DEAD_BAND)
        saturated = utilization > SATURATED
        most = r.size + max(r.size, GROW_STEP)  # the largest growth in one evaluation
        if saturated:
            wanted = max(wanted, most)
        wanted = min(max(wanted, r.base), r.maximum)
        why = (f"demand {demand:.1f} units/s, capacity {pool.capacity or 0:.1f}/worker, "
               f"utilization {utilization:.2f}{' (saturated)' if saturated else ''}")
        if wanted > r.size:
            pool.shrink_since = None
            pool.grow_streak += 1
            if pool.grow_streak >= GROW_AFTER and r.headroom:
                pool.grow_streak = 0
                return Resize(r.job, r.source, r.size, min(wanted, most), why)
            return None
        pool.grow_streak = 0
        if wanted < r.size:
            if pool.shrink_since is None:
                pool.shrink_since, pool.shrink_to = now, wanted
                return None
            pool.shrink_to = max(pool.shrink_to, wanted)
            if now - pool.shrink_since >= SHRINK_AFTER_S:
                size = pool.shrink_to
                pool.shrink_since, pool.shrink_to = now, wanted
                return Resize(r.job, r.source, r.size, size, f"{why}; at most {size} wanted for {SHRINK_AFTER_S:.0f} s")
            return None
        pool.shrink_since = None
        return None


def _within_budget(decided: list[tuple[PoolReading, Resize]]) -> list[Resize]:
    """The resizes decided, each growth trimmed to what the spare cores and role slots allow.

    One worker at a time to each pool still short, in turn (job, source order), while its job's
    spare cores cover its ``cpu_per_worker`` and a role slot is left; where the spare is unknown,
    one worker (its job's headroom was checked when it was decided) while slots are left. Cores
    and slots spent count against every job: they are the same machines. A pool granted nothing
    is left out (it asks again at a later evaluation).
    """
    granted = [d.previous for _, d in decided]
    growing = sorted((i for i, (_, d) in enumerate(decided) if d.size > d.previous),
                     key=lambda i: (decided[i][1].job, decided[i][1].source))
    spent_cpus, spent_roles = 0.0, 0
    more = True
    while more:
        more = False
        for i in growing:
            r, d = decided[i]
            cost = max(r.cpu_per_worker, _MIN_WORKER_CPU)
            if granted[i] >= d.size or spent_roles >= r.spare_roles:
                continue
            if r.spare_cpus is None:
                if granted[i] > d.previous:
                    continue  # unknown spare: one worker each
            elif spent_cpus + cost > r.spare_cpus:
                continue
            granted[i] += 1
            spent_cpus += cost
            spent_roles += 1
            more = True
    out = []
    for (_, d), size in zip(decided, granted):
        if d.size <= d.previous or size == d.size:
            out.append(d)
        elif size > d.previous:
            out.append(Resize(d.job, d.source, d.previous, size,
                              f"{d.reason}; {d.size - d.previous} wanted, the spare CPU and role slots allow "
                              f"{size - d.previous}"))
    return out


def weights_now_and_ahead(schedule: MixtureSchedule, step: int, lookahead: int) -> dict[str, tuple[float, float]]:
    """Source → (its mixture weight at ``step``, its largest weight in ``[step, step + lookahead]``).

    Exact for every schedule kind: a piecewise or linear schedule takes its extremes at the
    window's ends or at its own points, so those are the only steps evaluated.
    """
    end = step + lookahead
    steps = sorted({step, end, *(p for p, _ in schedule.points if step < p <= end)})
    w = schedule.weights(np.asarray(steps, dtype=np.int64))
    return {n: (float(w[0, i]), float(w[:, i].max())) for i, n in enumerate(schedule.sources)}


def pool_bounds(spec: JobSpec, source: str, default_workers: int, cpus: int = 0) -> tuple[int, int]:
    """(base, maximum) pool size of ``source``: the configured size, and how far it may grow.

    ``[autoscale] max_workers`` when set; else 4 × the base, or the cores of the cluster's live
    daemons (``cpus``) when they are more: one source may use a whole node's cores when the
    others leave them idle (the CPU guard and the spare-core budget stop it when they do not).
    """
    s = next(x for x in spec.sources if x.name == source)
    base = s.workers or default_workers
    if not spec.autoscale.enabled:
        return base, base
    return base, max(base, spec.autoscale.max_workers or min(MAX_WORKERS_PER_SOURCE, max(4 * base, cpus)))
