"""The end-to-end benchmark's sequence of runs and its report (``scripts/bench/e2e.py`` is the CLI).

1. The job of the main configuration (``e2e_setup``), with a mixture shift to the source that is
   the most expensive to load, and ``tokens_per_step`` (with step composition) the baseline's
   mean tokens per step.
2. The baseline's main run, calibrating itself (``e2e_run.CalibratingDriver``): free, tries, 1x,
   0.5x, 2x, shift.
3. The fabric's main run at that calibration: free, 1x, 0.5x, 2x, shift.
4. The sweep: both sides at 1x for each (sources, ranks) point other than the main one.
5. Simulated at scale (``e2e_sim``), then the report: human lines, then one JSON line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from e2e_rank import PLATFORM_START_METHOD, RankArgs
from e2e_run import CalibratingDriver, FabricNode, Phase, RunStopped, StaticDriver, run_side, settle_steps
from e2e_sampler import mean_step_tokens
from e2e_setup import (MAX_DELAY_STEPS, BenchConfig, Mixture, bench_sources, ensure_corpus, fabric_job_toml,
                       heaviest_source, job_cost, job_spec, job_units, shifted_weights)
from e2e_sim import simulate, synthetic_demo
from fabricd.planner import MixtureSchedule, native
from fabricd.planner.plan import draws_for_tokens

__all__ = ["Lengths", "FULL", "QUICK", "TINY", "run_benchmark"]

MEMORY_MARGIN_BYTES = 4 << 30  # what a sweep run must leave to the machine's other users


@dataclass(frozen=True)
class Lengths:
    """Phase lengths in steps (a mode): ``free``, the measured steps of the free run (after the
    batches prepared before the first step are consumed); ``sweep``, the 1x phase of a sweep run;
    ``warm``/``tail``, a phase's first/last steps left out of its measurement; ``sim_steps``, the
    simulated steps at each DP size (whole composition windows, but in the test mode)."""

    free: int
    cal: int
    main: int
    shift: int
    sweep: int
    warm: int
    tail: int
    tries: int
    sim_steps: int
    run_timeout_s: float


FULL = Lengths(free=8, cal=14, main=24, shift=30, sweep=12, warm=4, tail=2, tries=4, sim_steps=2 * (MAX_DELAY_STEPS + 1),
               run_timeout_s=1800)
QUICK = Lengths(free=4, cal=8, main=8, shift=6, sweep=3, warm=2, tail=2, tries=2, sim_steps=MAX_DELAY_STEPS + 1,
                run_timeout_s=400)
TINY = Lengths(free=2, cal=5, main=5, shift=6, sweep=3, warm=1, tail=2, tries=1, sim_steps=2, run_timeout_s=150)


def drain_steps(cfg: BenchConfig) -> int:
    """Steps a free run needs before its measurement: the baseline's workers prepare
    ``workers × prefetch_factor`` batches per rank before its first step (the fabric's prefetch is
    shallower; both sides get the same)."""
    return cfg.workers * cfg.prefetch_factor + 2


@dataclass
class Job:
    """One configuration's generated spec and what was derived from the corpus for it."""

    cfg: BenchConfig
    path: Path
    mixture: Mixture
    names: list[str]
    samples_per_step: int            # the fabric's units drawn per step for its tokens_per_step
    baseline_tokens_per_step: float
    heavy_us_per_token: dict


def make_job(cfg: BenchConfig, corpus: Path, out: Path, *, shift_step: int | None) -> Job:
    """Write the job spec of ``cfg``: the mixture (shifting to the heaviest source at
    ``shift_step`` when given) and ``tokens_per_step``, the baseline's mean tokens per step (its
    own sampler run offline over the index's unit lengths). ``Job.samples_per_step``: the units
    the fabric's planner draws per step for it (reported, not configured)."""
    sources = bench_sources(corpus, cfg.sources)
    base = {s.name: s.weight for s in sources}
    out.write_text(fabric_job_toml(cfg, corpus, sources, Mixture(base)))
    spec = job_spec(out)
    units = job_units(spec)
    heavy, measured = heaviest_source(spec, units) if shift_step is not None else (None, {})
    mixture = Mixture(base, shifted_weights(sources, heavy, cfg.shift_fraction) if heavy else None, shift_step, heavy)
    w = np.array([base[u.name] for u in units])
    per_step = mean_step_tokens([u.tokens for u in units], cfg.rank_tokens, w, ranks=cfg.ranks, seed=cfg.seed)
    out.write_text(fabric_job_toml(cfg, corpus, sources, mixture, tokens_per_step=int(round(per_step))))
    names = [u.name for u in units]
    schedule = MixtureSchedule("constant", [(0, base)], names)
    draws = max(draws_for_tokens(int(round(per_step)), schedule, units), cfg.ranks)  # as fabricd.job does
    return Job(cfg, out, mixture, names, draws, per_step, measured)


def rank_args(side: str, job: Job, steps: int) -> RankArgs:
    cfg = job.cfg
    shifted = tuple(job.mixture.shifted[n] for n in job.names) if job.mixture.shifted else None
    return RankArgs(side=side, rank=0, ranks=cfg.ranks, steps=steps, spec_path=str(job.path), out_dir="",
                    seed=cfg.seed, rank_tokens=cfg.rank_tokens, workers=cfg.workers,
                    prefetch_factor=cfg.prefetch_factor, base_weights=tuple(job.mixture.base[n] for n in job.names),
                    shifted_weights=shifted)


def static_phases(L: Lengths, c: float, drain: int, *, with_shift: bool) -> list[Phase]:
    """free, 1x, 0.5x, 2x, shift (at 2x): the fabric's main run; drain (the batches prepared
    before the first step, not measured), 1x: a sweep run."""
    out = ([Phase("free", 0, drain + L.free + L.tail, 0.0, drain, L.tail, 0.0)] if with_shift
           else [Phase("drain", 0, drain, 0.0, drain, 0, 0.0)])
    for name, f in (("1x", 1.0), ("0.5x", 0.5), ("2x", 2.0)) if with_shift else (("1x", 1.0),):
        out.append(Phase(name, out[-1].end, L.main if with_shift else L.sweep, c * f,
                         L.warm if with_shift else min(L.warm, 1), 0, f))
    if with_shift:
        out.append(Phase("shift", out[-1].end, L.shift, 2 * c, 0, 0, 2.0))
    return out


def phase(run: dict, name: str) -> dict:
    return next(p for p in run["phases"] if p["phase"] == name)


def cpu_per_mtok(run: dict, names: tuple[str, ...]) -> float | None:
    """CPU s per million tokens over the measured steps of the phases ``names``."""
    ph = [p for p in run["phases"] if p["phase"] in names]
    tokens = sum(p["tokens_per_s"] * p["elapsed_s"] for p in ph)
    return round(sum(p["cpu_s"] for p in ph) / tokens * 1e6, 3) if tokens else None


def shift_result(run: dict) -> dict:
    phases = {p.name: p for p in run["driver"].phases}
    out = settle_steps(phases["shift"], phases["2x"], run["stats"])
    out["shift_step"] = phases["shift"].start
    return out


def print_run(label: str, run: dict) -> None:
    m = run["memory"]
    print(f"{label}: ready {run['ready_s']}s, first step {run['first_step_s']}s after the loaders started, ran "
          f"{run['wall_s']}s; loading memory {m['total_mb']} MB ({m['loading_processes']} processes "
          f"{m['loading_processes_pss_mb']} MB + trainers' growth {m['trainer_growth_mb']} MB)", flush=True)
    print(f"  CPU s by process group over the run: {run['cpu_by_group_s']}; PSS MB by group: "
          f"{m['by_group_mb']}", flush=True)
    if run["pools_at_end"]:
        print(f"  source-loader pools at the end: {run['pools_at_end']}", flush=True)
    if (c := run.get("constructor_cpu")) is not None:
        print(f"  constructors ({c['constructors']}): {c['process_ms_per_step']} ms of CPU per delivered step, "
              f"{c['main_thread_ms_per_step']} ms of it on their main threads", flush=True)
    for p in run["phases"]:
        eff = "  -  " if p["efficiency"] is None else f"{p['efficiency']:.3f}"
        print(f"  {p['phase']:>5s}: {p['steps_per_s']:6.3f} steps/s {p['tokens_per_s']:8.0f} tok/s  eff {eff}  "
              f"wait {p['wait_frac']:.3f}  max/mean {p['max_over_mean']:.3f}  cpu {p['cpu_s_per_mtok']} s/Mtok "
              f"({p['cpu_cores_busy']} cores; others {p['other_cores_busy']})"
              + (f"  loaders {p['source_loaders'][0]}->{p['source_loaders'][1]}" if "source_loaders" in p else ""),
              flush=True)


def side_view(run: dict) -> dict:
    out = {k: run[k] for k in ("ready_s", "first_step_s", "wall_s", "cpu_total_s", "cpu_by_group_s", "memory",
                               "pools_at_end", "constructor_cpu")}
    out["phases"] = [{k: (round(v, 4) if k == "step_s" else v) for k, v in p.items() if k != "mean_max_rank_cost"}
                     for p in run["phases"]]
    return out


def _run(side: str, ctx: Any, job: Job, driver: Any, L: Lengths, work: Path, corpus: Path) -> dict:
    steps = driver.most_steps if isinstance(driver, CalibratingDriver) else driver.phases[-1].end
    fabric = FabricNode(corpus, job.cfg.loader_workers, job.cfg.local_ipc, nice=job.cfg.fabric_nice) \
        if side == "fabric" else None
    return run_side(side, ctx=ctx, args=rank_args(side, job, steps), driver=driver, steps=steps, work=work,
                    timeout_s=L.run_timeout_s, fabric=fabric)


def _sweep_point(sources: int, ranks: int, runs: dict) -> dict:
    out: dict = {"sources": sources, "ranks": ranks}
    for side, run in runs.items():
        if "error" in run:
            out[side] = run
            continue
        p = phase(run, "1x")
        out[side] = {"tokens_per_s": p["tokens_per_s"], "steps_per_s": p["steps_per_s"], "wait_frac": p["wait_frac"],
                     "efficiency": p["efficiency"], "memory_mb": run["memory"]["total_mb"],
                     "loading_processes": run["memory"]["loading_processes"],
                     "cpu_s_per_mtok": p["cpu_s_per_mtok"], "first_step_s": run["first_step_s"],
                     "other_cores_busy": p["other_cores_busy"]}
        if run.get("constructor_cpu") is not None:
            out[side]["constructor_cpu"] = run["constructor_cpu"]
    b, f = out.get("baseline", {}), out.get("fabric", {})
    held = b.get("memory_mb", b.get("memory_mb_at_stop"))  # stopped for memory: what it held then, a lower bound
    out["memory_ratio"] = round(held / f["memory_mb"], 3) if held and f.get("memory_mb") else None
    out["memory_ratio_is_lower_bound"] = "memory_mb" not in b and out["memory_ratio"] is not None
    out["throughput_ratio"] = (round(f["tokens_per_s"] / b["tokens_per_s"], 3)
                               if "tokens_per_s" in f and b.get("tokens_per_s") else None)
    return out


def run_benchmark(*, L: Lengths, mode: str, corpus: Path, samples: int, cfg: BenchConfig, sweep_sources: list[int],
                  sweep_ranks: list[int], workdir: Path | None) -> dict:
    """Every run of the benchmark; returns the report (the JSON line's object)."""
    started = time.monotonic()
    corpus = ensure_corpus(corpus, samples)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fabricd-bench-e2e-", dir=workdir))
    # fresh interpreters for the ranks: what a rank holds before its loader is its own, so its
    # growth is loading's, and a DataLoader worker forks from a rank that imported torch itself
    ctx = multiprocessing.get_context("spawn")
    try:
        drain = drain_steps(cfg)
        fabric_phases = static_phases(L, 1.0, drain, with_shift=True)  # scales set once calibrated
        fabric_shift = fabric_phases[-1].start
        job = make_job(cfg, corpus, tmp / "job.toml", shift_step=fabric_shift)
        print(f"configuration: {cfg.ranks} ranks, {cfg.workers} workers/rank, {cfg.rank_tokens} tokens/rank/step "
              f"(baseline mean {job.baseline_tokens_per_step:.0f} tokens/step = the fabric's tokens_per_step, "
              f"composed, ~{job.samples_per_step} units/step), {cfg.sources} sources; heaviest to load: {job.mixture.heavy} "
              f"(µs/token: {job.heavy_us_per_token})", flush=True)

        drv = CalibratingDriver(drain=drain, free=L.free, cal=L.cal, main=L.main, shift=L.shift, warm=L.warm, tail=L.tail,
                                tries=L.tries)
        base = _run("baseline", ctx, job, drv, L, tmp / "baseline-main", corpus)
        c = drv.calibration
        print_run("baseline", base)
        one_b = phase(base, "1x")
        cal = {"seconds_per_cost": c, "tries": drv.tried, "free_step_s": round(phase(base, "free")["step_s"], 4),
               "baseline_data_wait_frac": one_b["wait_frac"], "met": one_b["wait_frac"] <= 0.10,
               "ideal_step_s_1x": round(c * one_b["mean_rank_cost"], 4)}
        print(f"calibration: {c:.4g} s per unit of cost (ideal step {cal['ideal_step_s_1x']}s; baseline data wait "
              f"{one_b['wait_frac']:.3f} at 1x; tries {drv.tried})", flush=True)

        fab = _run("fabric", ctx, job, StaticDriver(static_phases(L, c, drain, with_shift=True), fabric_shift), L,
                   tmp / "fabric-main", corpus)
        print_run("fabric", fab)

        sweep = []
        points = [(s, cfg.ranks) for s in sweep_sources] + [(cfg.sources, r) for r in sweep_ranks if r != cfg.ranks]
        for sources, ranks in points:
            if (sources, ranks) == (cfg.sources, cfg.ranks):
                sweep.append(_sweep_point(sources, ranks, {"baseline": base, "fabric": fab}))
                continue
            sjob = make_job(replace(cfg, sources=sources, ranks=ranks), corpus, tmp / f"job-{sources}-{ranks}.toml",
                            shift_step=None)
            runs: dict = {}
            for side in ("baseline", "fabric"):
                label = f"{side} ({sources} sources, {ranks} ranks)"
                need = base["memory"]["total_mb"] * ranks / cfg.ranks * (2**20)
                have = psutil.virtual_memory().available - MEMORY_MARGIN_BYTES
                if side == "baseline" and ranks > cfg.ranks and need > have:  # would run the machine out of memory
                    why = (f"not run: {ranks} ranks would need about {need / 2**30:.1f} GiB ({ranks}/{cfg.ranks} × the "
                           f"{cfg.ranks}-rank run's), this machine has {have / 2**30:.1f} GiB to spare")
                    print(f"{label} {why}", flush=True)
                    runs[side] = {"error": why, "memory_mb_estimated": round(need / 2**20)}
                    continue
                try:
                    runs[side] = _run(side, ctx, sjob, StaticDriver(static_phases(L, c, drain, with_shift=False)), L,
                                      tmp / f"{side}-{sources}-{ranks}", corpus)
                    print_run(label, runs[side])
                except RunStopped as e:
                    print(f"{label} stopped: {e}", flush=True)
                    runs[side] = {"error": str(e), "memory_mb_at_stop": e.memory_mb, "step_at_stop": e.step}
            sweep.append(_sweep_point(sources, ranks, runs))

        units, weights, cost, budget = synthetic_demo(seed=cfg.seed)
        sim = simulate(units, weights, rank_tokens=budget, cost=cost, steps=L.sim_steps, seed=cfg.seed)
        spec = job_spec(job.path)
        corpus_units = job_units(spec)
        sim_corpus = simulate(corpus_units, np.array([job.mixture.base[u.name] for u in corpus_units]),
                              rank_tokens=cfg.rank_tokens, cost=job_cost(spec), steps=L.sim_steps, seed=cfg.seed)
        print(f"simulated at scale, tokens/s fabric over baseline (synthetic demo lengths, {budget} tokens/rank): "
              f"{sim['ratio']}; (this corpus, {cfg.rank_tokens} tokens/rank): {sim_corpus['ratio']}", flush=True)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    one_f = phase(fab, "1x")
    main_phases = ("0.5x", "1x", "2x")
    ratios = {f: round(phase(fab, f)["tokens_per_s"] / phase(base, f)["tokens_per_s"], 3) for f in main_phases}
    cpu_b, cpu_f = cpu_per_mtok(base, main_phases), cpu_per_mtok(fab, main_phases)
    shift = {"baseline": shift_result(base), "fabric": shift_result(fab)}
    return {
        "throughput_ratio": ratios["1x"],
        "throughput_ratios": ratios,
        "memory_ratio": {str(p["sources"]): p["memory_ratio"] for p in sweep if p["ranks"] == cfg.ranks},
        "memory_ratio_lower_bounds": [str(p["sources"]) for p in sweep
                                      if p["ranks"] == cfg.ranks and p["memory_ratio_is_lower_bound"]],
        "fabric_efficiency": one_f["efficiency"],
        "baseline_efficiency": one_b["efficiency"],
        "fabric_wait_frac": one_f["wait_frac"],
        "baseline_wait_frac": one_b["wait_frac"],
        "cpu_ratio": round(cpu_f / cpu_b, 3) if cpu_b and cpu_f else None,
        "cpu_s_per_mtok": {"baseline": cpu_b, "fabric": cpu_f},
        "settle_steps": shift["fabric"]["settle_steps"],
        "settle_steps_baseline": shift["baseline"]["settle_steps"],
        "mixture_shift": {"to": job.mixture.heavy, "fraction_moved": cfg.shift_fraction, "at": "2x", **shift},
        "simulated_throughput_ratio": sim["ratio"],
        "simulated": {"synthetic_demo": {"rank_tokens": budget, **sim["detail"]},
                      "this_corpus": {"rank_tokens": cfg.rank_tokens, "ratio": sim_corpus["ratio"],
                                      **sim_corpus["detail"]}},
        "calibration": cal,
        "sweep": sweep,
        "sides": {"baseline": side_view(base), "fabric": side_view(fab)},
        "configuration": {**cfg.as_dict(), "mode": mode, "lengths": L.__dict__,
                          "tokens_per_step": int(round(job.baseline_tokens_per_step)),
                          "samples_per_step": job.samples_per_step,
                          "compose": "outliers", "max_delay_steps": MAX_DELAY_STEPS,
                          "planner_loops": native.describe(),
                          "baseline_worker_start_method": PLATFORM_START_METHOD,
                          "baseline_tokens_per_step": round(job.baseline_tokens_per_step, 1),
                          "heavy_source_us_per_token": job.heavy_us_per_token,
                          "corpus_samples_per_source": samples, "cpus": os.cpu_count(),
                          "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                          "wall_s": round(time.monotonic() - started, 1)},
    }


def summary_line(result: dict) -> str:
    return (f"throughput ratio (fabric/baseline tokens/s) {result['throughput_ratios']}; memory ratio "
            f"{result['memory_ratio']}; cpu ratio {result['cpu_ratio']}; efficiency fabric {result['fabric_efficiency']} "
            f"baseline {result['baseline_efficiency']}; settle steps fabric {result['settle_steps']} baseline "
            f"{result['settle_steps_baseline']}; simulated {result['simulated_throughput_ratio']}; "
            f"wall {result['configuration']['wall_s']}s\n{json.dumps(result)}")
