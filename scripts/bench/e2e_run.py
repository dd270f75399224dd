"""One run of one side of the end-to-end benchmark: start its processes, drive its phases, measure.

A run is a sequence of *phases* over consecutive steps, each with its own calibration (seconds
per unit of cost, written per step into :class:`e2e_rank.Control` ahead of the ranks). A phase's
first ``warm`` steps and last ``tail`` steps are not measured (the tail is where the harness
decides the next phase while the ranks go on). A :class:`Driver` says which phases come: the
baseline's calibrates itself (free run, then tries until its data wait is at most 10%); every
other run's phases are fixed in advance.

Measured, per phase: steps/s and tokens/s; efficiency (ideal step time — the mean rank cost ×
the calibration, with no data wait — over measured step time); the fraction of time ranks
waited for data; max/mean rank cost; CPU seconds of every loading process per million delivered
tokens. At the end of the run, with every rank still holding its loader: memory, as the summed
PSS of every loading process (the fabric's daemons and roles; the baseline's DataLoader workers)
plus each trainer's PSS growth since before its loader existed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from e2e_rank import FIELDS, Control, RankArgs, rank_main

from fabricd.localnode import kill_processes
from fabricd.roles.base import role_kind

__all__ = ["Phase", "StaticDriver", "CalibratingDriver", "FabricNode", "RunStopped", "run_side", "phase_metrics",
           "settle_steps"]

W, C, COST, TOK, SMP, MIC = range(len(FIELDS))
MAX_DATA_WAIT = 0.10        # the calibration: the baseline's data wait at most this fraction of step time
STALL_FRACTION = 0.10       # a step stalls when some rank waited longer than this × its ideal step time
MIN_AVAILABLE_BYTES = 3 << 30  # a run is stopped when the machine has less memory available than this
REFRESH_S = 0.5
START_TIMEOUT_S = 300.0
PROGRESS_S = 10.0           # how often a run reports its progress on stderr
UNNAMED_GROUPS = ("roles_other", "other")  # groups of a process seen before it named itself: looked at again


@dataclass
class Phase:
    name: str
    start: int
    steps: int
    scale: float          # seconds per unit of cost
    warm: int = 0
    tail: int = 0
    factor: float | None = None  # × the calibration

    @property
    def end(self) -> int:
        return self.start + self.steps


class Driver:
    """Decides a run's phases; ``advance`` is called whenever the ranks complete steps."""

    phases: list[Phase]
    shift_step: int | None = None

    def start(self, ctl: Control) -> None:
        raise NotImplementedError

    def advance(self, done: int, ctl: Control, stats: Callable[[], np.ndarray]) -> None:
        pass

    @staticmethod
    def write(ctl: Control, ph: Phase) -> None:
        for s in range(ph.start, ph.end):
            ctl.scale[s] = ph.scale


class StaticDriver(Driver):
    def __init__(self, phases: list[Phase], shift_step: int | None = None) -> None:
        self.phases, self.shift_step = phases, shift_step

    def start(self, ctl: Control) -> None:
        for ph in self.phases:
            self.write(ctl, ph)
        if self.shift_step is not None:
            ctl.shift_step.value = self.shift_step
        ctl.end_step.value = self.phases[-1].end


class CalibratingDriver(Driver):
    """The baseline's run: a free run (no compute) measures its loading once the batches its
    workers prepared before the first step are consumed (``drain`` steps); then tries at a
    calibration until its data wait is at most MAX_DATA_WAIT; that try is the ``1x`` phase, and
    ``0.5x``, ``2x`` and the mixture-shift phase (at 2x) follow."""

    def __init__(self, *, drain: int, free: int, cal: int, main: int, shift: int, warm: int, tail: int,
                 tries: int) -> None:
        self.free, self.cal, self.main, self.shift, self.warm, self.tail, self.tries = free, cal, main, shift, warm, tail, tries
        self.drain = drain
        self.phases = [Phase("free", 0, drain + free + tail, 0.0, drain, tail, 0.0)]
        self.tried: list[dict] = []
        self.calibration: float | None = None
        self.final = False

    @property
    def most_steps(self) -> int:
        return self.phases[0].steps + self.tries * self.cal + 2 * self.main + self.shift

    def start(self, ctl: Control) -> None:
        self.write(ctl, self.phases[0])

    def advance(self, done: int, ctl: Control, stats: Callable[[], np.ndarray]) -> None:
        last = self.phases[-1]
        if self.final or done < last.end - last.tail:
            return
        m = phase_metrics(last, stats(), np.frombuffer(ctl.step_end, np.float64).copy(), None)
        if last.name == "free":
            max_cost = m["mean_max_rank_cost"]
            self._try(ctl, m["step_s"] / max_cost)  # compute as long as loading took: "just keeps up"
            return
        self.tried.append({"scale": last.scale, "data_wait_frac": m["wait_frac"]})
        if m["wait_frac"] <= MAX_DATA_WAIT or len(self.tried) >= self.tries:
            self._finish(ctl, last)
        else:
            self._try(ctl, last.scale * (1 + 1.5 * m["wait_frac"]))

    def _try(self, ctl: Control, scale: float) -> None:
        ph = Phase(f"cal{len(self.tried)}", self.phases[-1].end, self.cal, scale, self.warm, self.tail, 1.0)
        self.phases.append(ph)
        self.write(ctl, ph)

    def _finish(self, ctl: Control, last: Phase) -> None:
        self.final = True
        c = self.calibration = last.scale
        self.phases[-1] = replace(last, name="1x")
        start = last.end
        for name, n, f in (("0.5x", self.main, 0.5), ("2x", self.main, 2.0), ("shift", self.shift, 2.0)):
            ph = Phase(name, start, n, c * f, 0 if name == "shift" else self.warm, 0, f)
            self.phases.append(ph)
            self.write(ctl, ph)
            start = ph.end
        self.shift_step = self.phases[-1].start
        ctl.shift_step.value = self.shift_step
        ctl.end_step.value = start


@dataclass
class FabricNode:
    """How the fabric side runs: a one-daemon local fabric over ``corpus`` (for ``run_side``)."""

    corpus: Path
    loader_workers: int = 1
    local_ipc: bool = True  # [security] local_ipc of its daemon
    nice: int = 0  # the daemon's niceness (its roles inherit it); the packaged unit's is 5
    addresses: list[str] = field(default_factory=list)
    keys: str | None = None
    status: dict = field(default_factory=dict)


class LoadingProcesses:
    """The processes doing one side's loading (the roots and their descendants): CPU seconds
    (a process that exited keeps its last reading) and PSS, in total and by group: ``trainers``
    (the ranks), ``workers`` (their children: DataLoader workers), ``daemon``, and the daemon's
    role processes by kind (``source_loader``, ``constructor``, ...)."""

    def __init__(self, ranks: list[int], daemons: list[int]) -> None:
        self.groups = {pid: "trainers" for pid in ranks} | {pid: "daemon" for pid in daemons}
        self.roots = ranks + daemons
        self.procs: dict[int, psutil.Process] = {}
        self.cpu_last: dict[int, float] = {}
        self.cpu_base: dict[int, float] = {}  # at the start, for processes that existed then
        # constructors' main threads alone (their ZeroMQ I/O threads run beside them): what bounds
        # the steps/s one constructor can build is its main thread's CPU per step
        self.main_last: dict[int, float] = {}
        self.main_base: dict[int, float] = {}
        self.refreshed = 0.0
        self.refresh()
        self.cpu()
        self.cpu_base = dict(self.cpu_last)
        self.main_base = dict(self.main_last)

    def refresh(self) -> None:
        self.refreshed = time.monotonic()
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                self.procs.setdefault(pid, root)
                for p in root.children(recursive=True):
                    if p.pid not in self.procs:
                        self.procs[p.pid] = p
                        self.groups.setdefault(p.pid, _group(p, self.groups.get(pid)))
                    elif self.groups.get(p.pid) in UNNAMED_GROUPS:
                        # a role forked from the template is named after its kind only once it
                        # runs: seen before that, it was not a loader or constructor yet
                        self.groups[p.pid] = _group(p, self.groups.get(pid))
            except psutil.NoSuchProcess:
                pass

    def cpu(self) -> float:
        if time.monotonic() - self.refreshed > REFRESH_S:
            self.refresh()
        for pid, p in self.procs.items():
            try:
                t = p.cpu_times()
                self.cpu_last[pid] = t.user + t.system
                if self.groups.get(pid) == "constructors":
                    main = next((th for th in p.threads() if th.id == pid), None)
                    if main is not None:
                        self.main_last[pid] = main.user_time + main.system_time
            except psutil.NoSuchProcess:
                pass
        return float(sum(self.cpu_last.values()))

    def constructor_cpu(self, steps: int) -> dict[str, float] | None:
        """The constructors' CPU per delivered step, in ms: their processes' and their main
        threads' (every constructor together; None without constructors or steps)."""
        procs = [pid for pid, g in self.groups.items() if g == "constructors" and pid in self.cpu_last]
        if not procs or steps <= 0:
            return None
        process = sum(self.cpu_last[pid] - self.cpu_base.get(pid, 0.0) for pid in procs)
        main = sum(self.main_last.get(pid, 0.0) - self.main_base.get(pid, 0.0) for pid in procs)
        return {"constructors": len(procs), "process_ms_per_step": round(1000 * process / steps, 1),
                "main_thread_ms_per_step": round(1000 * main / steps, 1)}

    def alive(self, group: str) -> int:
        """Processes of ``group`` running now (as of the last refresh: a fabric's loader pools
        grow and shrink under the autoscaler)."""
        return sum(1 for pid, p in self.procs.items() if self.groups.get(pid) == group and p.is_running())

    def cpu_by_group(self) -> dict[str, float]:
        """CPU seconds of each group since the start."""
        out: dict[str, float] = {}
        for pid, c in self.cpu_last.items():
            g = self.groups.get(pid, "other")
            out[g] = round(out.get(g, 0.0) + c - self.cpu_base.get(pid, 0.0), 1)
        return out

    def pss(self) -> dict[int, float]:
        self.refresh()
        out = {}
        for pid, p in self.procs.items():
            try:
                out[pid] = float(p.memory_full_info().pss)
            except psutil.NoSuchProcess:
                pass
        return out


def _group(p: psutil.Process, parent_group: str | None) -> str:
    """The group of a descendant process (see LoadingProcesses)."""
    if parent_group == "trainers":
        return "workers"
    try:
        name = p.name()
    except psutil.Error:
        return "other"
    kind = role_kind(name)  # forked or spawned, a role's process name says its kind
    if kind is not None:
        return f"{kind}s"
    return "roles_other" if name.startswith("fd-") else "other"


def phase_metrics(ph: Phase, stats: np.ndarray, step_end: np.ndarray, cpu: np.ndarray | None,
                  busy: np.ndarray | None = None, loaders: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of the measured steps of ``ph`` (see the module docstring). Also, to read them by:
    ``barrier_s``, the mean time per step beyond the slowest rank's wait + compute (the barrier,
    scheduling); ``oversleep_frac``, compute measured over compute asked (a loaded machine wakes
    sleepers late); ``other_cores_busy``, cores this machine spent on processes not of this run;
    ``source_loaders``, the fabric's loader processes at the phase's first and last measured step
    (``loaders``: their count at the end of each step)."""
    a, b = max(1, ph.start + ph.warm), ph.end - ph.tail
    st = stats[:, a:b]
    elapsed = float(step_end[b - 1] - step_end[a - 1])
    steps = b - a
    tokens = float(st[..., TOK].sum())
    cost = st[..., COST]
    ideal = float(cost.mean(axis=0).sum() * ph.scale)
    step_s = np.diff(step_end[a - 1:b])
    asked = float(cost.sum() * ph.scale)
    out = {
        "phase": ph.name, "factor": ph.factor, "scale": ph.scale, "steps": steps, "first_step": a,
        "elapsed_s": round(elapsed, 3), "step_s": elapsed / steps,
        "steps_per_s": round(steps / elapsed, 4), "tokens_per_s": round(tokens / elapsed, 1),
        "tokens_per_step": round(tokens / steps, 1),
        "efficiency": round(ideal / elapsed, 4) if ph.scale > 0 else None,
        "wait_frac": round(float(st[..., W].sum(axis=1).mean()) / elapsed, 4),
        "max_over_mean": round(float(cost.max(axis=0).sum() / cost.mean(axis=0).sum()), 4),
        "mean_rank_cost": float(cost.mean()),
        "mean_max_rank_cost": float(cost.max(axis=0).mean()),
        "micro_batches_per_rank_step": round(float(st[..., MIC].mean()), 3),
        "barrier_s": round(float((step_s - (st[..., W] + st[..., C]).max(axis=0)).mean()), 4),
        "oversleep_frac": round(float(st[..., C].sum()) / asked - 1, 4) if asked > 0 else None,
    }
    if cpu is not None:
        used = float(cpu[b - 1] - cpu[a - 1])
        out["cpu_s"] = round(used, 3)
        out["cpu_s_per_mtok"] = round(used / tokens * 1e6, 3) if tokens else None
        out["cpu_cores_busy"] = round(used / elapsed, 3)
        if busy is not None:
            out["other_cores_busy"] = round((float(busy[b - 1] - busy[a - 1]) - used) / elapsed, 3)
    if loaders is not None and np.isfinite(loaders[a - 1]) and np.isfinite(loaders[b - 1]):
        out["source_loaders"] = [int(loaders[a - 1]), int(loaders[b - 1])]
    return out


def settle_steps(ph: Phase, before: Phase, stats: np.ndarray, *, tail: int = 3) -> dict[str, Any]:
    """Steps from the mixture shift (the first step of ``ph``) until stalls stop: the steps up to
    and including the last stalled one (0: none; None: still stalling in the last ``tail``
    steps). A step stalls when some rank waited for data longer than STALL_FRACTION of the ideal
    step time (mean rank cost × calibration) *and* longer than any rank waited in a measured step
    of ``before`` (the phase before the shift, at the same calibration): what the machine's
    noise does without a shift is not a stall of the shift's."""
    def longest(p: Phase) -> np.ndarray:
        return stats[:, p.start + p.warm:p.end - p.tail, W].max(axis=0)

    st = stats[:, ph.start:ph.end]
    noise = float(longest(before).max()) if before.steps > before.warm + before.tail else 0.0
    ideal = st[..., COST].mean(axis=0) * ph.scale
    stalled = longest(ph) > np.maximum(STALL_FRACTION * ideal, noise)
    idx = np.flatnonzero(stalled)
    settle = 0 if not idx.size else (None if idx[-1] >= ph.steps - tail else int(idx[-1]) + 1)
    return {"settle_steps": settle, "stalled_steps": int(stalled.sum()), "steps": ph.steps,
            "longest_wait_s": round(float(st[..., W].max()), 3), "longest_wait_before_s": round(noise, 3)}


def _start_fabric(node: FabricNode, work: Path, spec_path: Path, timeout: float) -> Any:
    from fabric_client import protocol
    from fabricd.localnode import TRAINER_KEY, LocalCluster

    cluster = LocalCluster(work / "cluster", nodes=1, loader_workers=node.loader_workers, data_roots=[node.corpus],
                           log_level="WARNING", local_ipc=node.local_ipc, nice=node.nice)
    cluster.start()
    try:
        leader = cluster.leader()
        daemon = cluster.daemons[leader]
        with daemon.client() as client:
            client.request(protocol.SubmitJob(spec_toml=spec_path.read_text(), spec_path=str(spec_path)))
        deadline = time.monotonic() + timeout
        while True:
            job = (cluster.status(leader) or {}).get("jobs", {}).get("e2e", {})
            if job.get("serving"):
                break
            if job.get("state") == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"fabric job not serving ({job.get('state')}: {job.get('error')}); "
                                   f"daemon log:\n{daemon.tail()}")
            time.sleep(0.1)
        node.addresses = list(cluster.addresses)
        node.keys = None if daemon.insecure else str(daemon.keys_dir / TRAINER_KEY)
        return cluster
    except BaseException:
        cluster.stop()
        raise


class RunStopped(RuntimeError):
    """A run stopped before its end (a rank failed, time ran out, memory ran short); ``memory_mb``:
    the loading memory when it stopped (None when not measured), ``step``: steps completed."""

    def __init__(self, reason: str, *, memory_mb: float | None = None, step: int = 0) -> None:
        super().__init__(reason)
        self.memory_mb, self.step = memory_mb, step


def _busy_cpu() -> float:
    """CPU seconds this machine's cores have been busy (every process, ours and others')."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _memory(pss: dict[int, float], rank_pids: dict[int, int], before: Any) -> dict[str, Any]:
    growth = {r: pss.get(pid, 0.0) - before[r] for pid, r in rank_pids.items()}
    others = {pid: v for pid, v in pss.items() if pid not in rank_pids}
    mb = 1 / 2**20
    return {
        "loading_processes": len(others),
        "loading_processes_pss_mb": round(sum(others.values()) * mb, 1),
        "trainer_growth_mb": round(sum(growth.values()) * mb, 1),
        "total_mb": round((sum(others.values()) + sum(growth.values())) * mb, 1),
        "largest_process_mb": round(max(others.values(), default=0.0) * mb, 1),
    }


def run_side(side: str, *, ctx: Any, args: RankArgs, driver: Driver, steps: int, work: Path,
             timeout_s: float, fabric: FabricNode | None = None) -> dict[str, Any]:
    """Run ``args.ranks`` ranks of ``side`` through the driver's phases; stop every process it
    started; return per-phase metrics, memory and the raw per-step arrays. Raises RunStopped."""
    work.mkdir(parents=True, exist_ok=True)
    args = replace(args, out_dir=str(work))
    ctl = Control(ctx, args.ranks, steps)
    driver.start(ctl)
    cluster = None
    procs: list[Any] = []
    loading: LoadingProcesses | None = None
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        if side == "fabric":
            cluster = _start_fabric(fabric, work, Path(args.spec_path), timeout=min(300.0, timeout_s))
            args = replace(args, addresses=tuple(fabric.addresses), keys=fabric.keys)
        ready_s = time.monotonic() - started
        for r in range(args.ranks):
            p = ctx.Process(target=rank_main, args=(replace(args, rank=r), ctl), name=f"{side}-rank-{r}")
            p.start()
            procs.append(p)
        ctl.started.wait(START_TIMEOUT_S)
        ctl.measured.wait(START_TIMEOUT_S)
        loaders_at = time.monotonic()
        loading = LoadingProcesses([p.pid for p in procs],
                                   [d.proc.pid for d in cluster.daemons.values()] if cluster else [])
        cpu, busy = np.full(steps, np.nan), np.full(steps, np.nan)
        loaders = np.full(steps, np.nan) if cluster is not None else None  # the fabric's pools, per step
        seen = 0
        cpu_start = loading.cpu()
        shown = time.monotonic()
        while True:
            _check(ctl, procs, work, deadline)
            done = ctl.progress.value
            if time.monotonic() - shown > PROGRESS_S:
                shown = time.monotonic()
                print(f"  {side}: step {done} of {ctl.end_step.value} after {shown - started:.0f}s", file=sys.stderr,
                      flush=True)
            if done != seen:
                cpu[seen:done], busy[seen:done] = loading.cpu(), _busy_cpu()
                if loaders is not None:
                    loaders[seen:done] = loading.alive("source_loaders")
                seen = done
                driver.advance(done, ctl, ctl.stat_array)
                if done >= ctl.end_step.value:
                    break
            elif time.monotonic() - loading.refreshed > REFRESH_S:
                loading.cpu()
            time.sleep(0.005)
        end = ctl.end_step.value
        _wait_for_files(work, args.ranks, ctl, procs, deadline)
        pss = loading.pss()
        memory = _memory(pss, {p.pid: r for r, p in enumerate(procs)}, ctl.pss_before)
        memory["by_group_mb"] = {}
        for pid, v in pss.items():
            g = loading.groups.get(pid, "other")
            if g != "trainers":
                memory["by_group_mb"][g] = round(memory["by_group_mb"].get(g, 0.0) + v / 2**20, 1)
        cpu_groups = loading.cpu_by_group()
        constructor_cpu = loading.constructor_cpu(end)
        if cluster is not None:
            fabric.status = cluster.status(cluster.leader(timeout=10)) or {}
        stats, step_end = ctl.stat_array(), np.frombuffer(ctl.step_end, np.float64).copy()
    except (RunStopped, MemoryError, TimeoutError, RuntimeError, threading.BrokenBarrierError) as e:
        at_stop = None
        if isinstance(e, MemoryError) and loading is not None:  # how much it held when it was stopped
            at_stop = _memory(loading.pss(), {p.pid: r for r, p in enumerate(procs)}, ctl.pss_before)["total_mb"]
        raise RunStopped(f"{side}: {type(e).__name__}: {e}", memory_mb=at_stop, step=ctl.progress.value) from e
    finally:
        ctl.release.set()
        _stop(procs)
        if cluster is not None:
            cluster.stop()
    phases = [phase_metrics(ph, stats, step_end, cpu, busy, loaders) for ph in driver.phases
              if ph.end <= end and ph.steps > ph.warm + ph.tail]  # a drain phase measures nothing
    pools: dict[str, int] = {}
    for role in ((fabric.status if fabric else {}).get("jobs", {}).get("e2e", {}).get("roles", [])):
        if role.get("kind") == "source_loader" and role.get("alive"):
            pools[role["source"]] = pools.get(role["source"], 0) + 1
    return {"side": side, "pools_at_end": pools, "cpu_by_group_s": cpu_groups, "constructor_cpu": constructor_cpu,
            "ready_s": round(ready_s, 1), "first_step_s": round(float(step_end[0] - loaders_at), 1),
            "wall_s": round(time.monotonic() - started, 1), "cpu_total_s": round(float(cpu[end - 1] - cpu_start), 1),
            "phases": phases, "memory": memory, "stats": stats[:, :end], "step_end": step_end[:end],
            "driver": driver}


def _check(ctl: Control, procs: list[Any], work: Path, deadline: float) -> None:
    errors = sorted(work.glob("rank-*.err"))
    if errors:
        raise RuntimeError(f"{errors[0].name}: {errors[0].read_text()[-3000:]}")
    dead = [p.name for p in procs if p.exitcode is not None and p.exitcode != 0]
    if dead or ctl.abort.is_set():
        raise RuntimeError(f"ranks {dead} exited; run aborted")
    if time.monotonic() > deadline:
        raise TimeoutError(f"run did not finish in time (at step {ctl.progress.value} of {ctl.end_step.value})")
    if psutil.virtual_memory().available < MIN_AVAILABLE_BYTES:
        raise MemoryError(f"less than {MIN_AVAILABLE_BYTES >> 30} GiB of memory left on this machine")


def _wait_for_files(work: Path, ranks: int, ctl: Control, procs: list[Any], deadline: float) -> None:
    while len(list(work.glob("rank-*.json"))) < ranks:
        _check(ctl, procs, work, deadline)
        time.sleep(0.01)


def _stop(procs: list[Any]) -> None:
    """Stop the ranks (they exit once released) and anything of theirs still running, by pid."""
    descendants = []
    for p in procs:
        try:
            descendants += psutil.Process(p.pid).children(recursive=True)
        except (psutil.NoSuchProcess, ValueError):
            pass
    for p in procs:
        p.join(timeout=30)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
    kill_processes(descendants, timeout=10)
