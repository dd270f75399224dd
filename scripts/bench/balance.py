#!/usr/bin/env python
"""Benchmark: per-step load balance of attention cost across DP ranks, with a token budget.

    python scripts/bench/balance.py [--data DIR] [--steps 32] [--quick]

The configuration LLM trainers use: a global batch in tokens, 64k tokens per rank per step
(``tokens_per_step = 65536 × dp``), 32k context (long documents split into 32k pieces),
micro-batches of 32k tokens, the demo cost model. For dp 8, 64, 1024 and 4096 it averages,
over steps, max/mean of the per-rank cost for

* ``naive``: a per-rank DataLoader: every rank draws its own units from the mixture (seeded,
  from the same per-source unit pools) and packs greedily to its 64k-token budget;
* ``fabric``: ``Planner.plan`` without composition (the global batch balanced over ranks);
* ``composed``: ``Planner.plan`` with ``compose = "outliers"`` (``fabricd.planner.compose``);
* ``lower_bound``: the fabric's per-step bound max(mean, largest single unit)/mean, which no
  balancer can beat without choosing which units share a step.

Every fabric and composed figure is computed twice: from the plan's unit costs, and again from
the packed micro-batches: each rank's units are packed by ``fabricd.pack.pack_micro_batch`` (as
a constructor does) and the rank's cost is recomputed from the ``cu_seqlens`` it returns (all
steps up to dp 64; the first ``--recompute-steps`` steps above). Planner time, composed plans,
over whole windows (use a multiple of 16 steps): ``planner_ms`` is the mean wall time of a step's
plan, *amortized*: the first step of each window also composes the window (every unit of its 16
steps), the others reuse it; ``planner_worst_ms`` is that worst single step's wall time (the
latency a trainer would see if nothing planned ahead; the plan worker does, see
``fabricd/planner/worker.py``); ``planner_step_ms`` the median over steps that compose nothing;
``planner_cpu_ms`` the amortized CPU time of this process (less sensitive to a shared machine;
a window's draws run on ``plan_threads()`` threads, so it may exceed the wall time);
``planner_worker_ms`` the wall time per step for a job's plan worker to plan the same steps from
a fresh planner, with 1 thread and with the threads a daemon here would give it
(``fabricd.planner.threads.plan_threads``): the planning throughput of a leader, side by side.
``plan_serve_ms``: the leader's other work per step, cutting a planned step into the answers of
every data constructor (``ceil(dp / 8)`` plan requests of 8 ranks, the default
``ranks_per_constructor``), as ``JobRuntime.plan`` does: ``StepPlan.for_ranks`` and the
reply's columns (the median over steps).

``--data DIR`` reads the demo corpus (``DIR/<source>/`` as written by
``scripts/make_dataset.py``) through ``fabricd.sources.index.open_index``; without it, or if
that fails, a synthetic corpus of the same shape is used and a warning line says so.
Human lines first; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from fabricd.job import plan_columns
from fabricd.pack import pack_micro_batch
from fabricd.planner import CostModel, MixtureSchedule, Planner, SourceUnits, build_units, native
from fabricd.planner.plan import draws_for_tokens
from fabricd.planner.threads import MAX_THREADS, plan_threads
from fabricd.planner.worker import PlanWorker

DEMO_WEIGHTS = {"captions": 0.3, "interleaved": 0.2, "longdocs": 0.15, "code": 0.2, "ocr": 0.15}
#: (max_seq_len, long_samples) per demo source.
DEMO_SHAPES = {
    "captions": (4096, "truncate"),
    "interleaved": (4096, "truncate"),
    "longdocs": (32768, "split"),
    "code": (4096, "truncate"),
    "ocr": (4096, "truncate"),
}
IMAGE_TOKENS = 64
DEMO_COST = CostModel(attention=1.0, linear=8192.0, per_image=0.0)


def synthetic_lengths(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(text_tokens, num_images) of ``n`` synthetic samples shaped like the demo source ``name``."""
    if name == "captions":
        return rng.integers(12, 80, n), np.ones(n, dtype=np.int64)
    if name == "interleaved":
        return rng.integers(50, 800, n), rng.integers(1, 7, n)
    if name == "longdocs":  # Pareto lengths, up to 32k tokens
        return np.minimum(32768, (125 * (1 + rng.pareto(1.1, n)))).astype(np.int64), np.zeros(n, dtype=np.int64)
    if name == "code":
        return np.clip(rng.lognormal(5.5, 1.0, n), 25, 2000).astype(np.int64), np.zeros(n, dtype=np.int64)
    if name == "ocr":
        return rng.integers(125, 1000, n), np.ones(n, dtype=np.int64)
    raise ValueError(f"unknown demo source {name!r}")


def demo_lengths(data_dir: str | None, samples: int, seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """Per-source (text_tokens, num_images): from the demo corpus index when possible, else synthetic."""
    if data_dir is not None:
        try:
            from fabricd.sources.index import open_index

            out = {}
            for name in DEMO_WEIGHTS:
                idx = open_index(name, Path(data_dir) / name)
                out[name] = (np.asarray(idx.text_tokens), np.asarray(idx.num_images))
            return out, f"demo corpus {data_dir}"
        except Exception as e:  # noqa: BLE001 - any failure means: use the synthetic corpus, loudly
            print(f"WARNING: cannot read the demo corpus at {data_dir!r} ({type(e).__name__}: {e}); "
                  f"falling back to a synthetic corpus", flush=True)
    else:
        print("WARNING: no --data given; using a synthetic corpus shaped like the demo (Pareto long docs up to 32k)", flush=True)
    rng = np.random.default_rng(seed)
    return {name: synthetic_lengths(name, samples, rng) for name in DEMO_WEIGHTS}, f"synthetic ({samples} samples/source)"


def demo_sources(data_dir: str | None, samples: int = 20000, seed: int = 0) -> tuple[list[SourceUnits], str]:
    """The demo sources as planner units, and a description of where the lengths came from."""
    lengths, origin = demo_lengths(data_dir, samples, seed)
    units = []
    for name, (text, images) in lengths.items():
        msl, policy = DEMO_SHAPES[name]
        units.append(build_units(name, text, images, max_seq_len=msl, long_samples=policy, image_tokens=IMAGE_TOKENS))
    return units, origin


def demo_schedule() -> MixtureSchedule:
    return MixtureSchedule("constant", [(0, DEMO_WEIGHTS)], list(DEMO_WEIGHTS))



BUDGET_PER_RANK = 65536
MICRO_BATCH_TOKENS = 32768
MAX_DELAY_STEPS = 15
DPS = (8, 64, 1024, 4096)
RANKS_PER_CONSTRUCTOR = 8  # the topology default


def serve_ms(plan) -> float:
    """Wall ms to cut ``plan`` into every constructor's plan reply (its rows and columns), as a
    leader answers the constructors' requests for a step (``JobRuntime.plan``)."""
    t = time.perf_counter()
    for lo in range(0, plan.dp_size, RANKS_PER_CONSTRUCTOR):
        plan_columns(plan.for_ranks(range(lo, min(plan.dp_size, lo + RANKS_PER_CONSTRUCTOR))))
    return 1000 * (time.perf_counter() - t)


def naive_rank_costs(sources: list[SourceUnits], weights: np.ndarray, dp: int, budget: int,
                     step: int, seed: int) -> np.ndarray:
    """Rank costs when every rank draws its own units from the mixture and packs them greedily
    to ``budget`` tokens (a per-rank DataLoader with a token budget). Vectorized over ranks."""
    rng = np.random.default_rng([seed, step, dp])
    mean_tokens = sum(float(w) * float(s.tokens.mean()) for w, s in zip(weights, sources))
    k = int(4 * budget / mean_tokens) + 64
    which = rng.choice(len(sources), size=(dp, k), p=weights / weights.sum())
    tokens = np.zeros((dp, k), dtype=np.int64)
    cost = np.zeros((dp, k))
    for j, s in enumerate(sources):
        m = which == j
        pick = rng.integers(0, len(s), int(m.sum()))
        tokens[m] = s.tokens[pick]
        cost[m] = DEMO_COST(s.tokens[pick], s.images[pick])
    # greedy: a rank takes units in draw order while they fit its budget, stops at the first that does not
    fits = np.cumsum(tokens, axis=1) <= budget
    take = np.cumprod(fits, axis=1).astype(bool)
    return (cost * take).sum(axis=1)


class _Sample:
    """A synthetic loaded unit of ``n`` tokens (no images: the demo cost model's per_image is 0)."""

    __slots__ = ("input_ids", "image_starts", "pixels")
    _EMPTY_STARTS = np.zeros(0, dtype=np.int32)
    _EMPTY_PIXELS = np.zeros((0, 4, 4, 3), dtype=np.uint8)

    def __init__(self, n: int) -> None:
        self.input_ids = np.zeros(n, dtype=np.int32)
        self.image_starts = self._EMPTY_STARTS
        self.pixels = self._EMPTY_PIXELS


def packed_rank_costs(plan) -> np.ndarray:
    """Each rank's cost recomputed from the cu_seqlens of its packed micro-batches."""
    out = np.zeros(plan.dp_size)
    for rank in range(plan.dp_size):
        for rows in plan.micro_batches(rank):
            samples = [_Sample(int(t)) for t in plan.tokens[rows].tolist()]
            packed = pack_micro_batch(samples, source_ids=plan.source[rows], sample_ids=plan.sample_id[rows],
                                      pieces=plan.piece[rows], image_size=4)
            lengths = np.diff(packed["cu_seqlens"].astype(np.int64))
            out[rank] += float(DEMO_COST(lengths, np.zeros(lengths.size)).sum())
    return out


def planner_for(sources: list[SourceUnits], dp: int, compose: str, seed: int) -> Planner:
    schedule = demo_schedule()
    draws = draws_for_tokens(BUDGET_PER_RANK * dp, schedule, sources)
    return Planner(seed=seed, samples_per_step=draws, micro_batch_tokens=MICRO_BATCH_TOKENS, schedule=schedule,
                   cost=DEMO_COST, method="lpt", sources=sources, compose=compose,
                   max_delay_steps=MAX_DELAY_STEPS if compose != "none" else 0, size_by_tokens=True,
                   dp_history=((0, dp),))


#: Composition windows the plan worker's figure plans; the first (a cold start: nothing composed
#: ahead of it) is left out of the timing, so the figure is a running job's steady state.
WORKER_WINDOWS = 3


def worker_ms(sources: list[SourceUnits], dp: int, window: int, threads: int, seed: int) -> float:
    """Wall ms per step for a job's plan worker (``fabricd.planner.worker``) with ``threads``
    threads (and a window's draws on as many), planning the steps of ``WORKER_WINDOWS``
    composition windows of ``window`` steps from a fresh composed planner: the time from the
    first window's last plan to the last window's, per step. Everything a running job's worker
    does is in it (composing each window, ahead of it or not; the balance it computes per plan,
    as in a daemon): its throughput, not one plan's latency."""
    steps = WORKER_WINDOWS * window
    before = os.environ.get("FABRICD_PLAN_THREADS")
    os.environ["FABRICD_PLAN_THREADS"] = str(threads)  # a window's draws too: all of it on ``threads``
    worker = PlanWorker(planner_for(sources, dp, "outliers", seed), dp, name=f"bench-{dp}", cache_steps=steps,
                        ahead_steps=steps - 1, queue_steps=steps, deadline_s=3600.0, threads=threads)
    done = lambda: worker.counters["plans_computed"] + worker.counters["plan_errors"]  # noqa: E731
    try:
        worker.get(0)  # step 0, and the look-ahead: every other step
        while done() < window:
            time.sleep(0.001)
        t = time.perf_counter()
        while done() < steps:
            time.sleep(0.001)
        elapsed = time.perf_counter() - t
        if worker.counters["plan_errors"]:
            raise SystemExit(f"dp {dp}: the plan worker failed: {worker.status()['error']}")
    finally:
        worker.close()
        worker.join(60)
        if before is None:
            os.environ.pop("FABRICD_PLAN_THREADS", None)
        else:
            os.environ["FABRICD_PLAN_THREADS"] = before
    return round(1000 * elapsed / (steps - window), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="demo corpus directory (DIR/<source>/)")
    ap.add_argument("--steps", type=int, default=32, help="steps per dp size (whole windows of 16 are best)")
    ap.add_argument("--recompute-steps", type=int, default=2, help="steps recomputed from cu_seqlens above dp 64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=20000, help="synthetic samples per source")
    ap.add_argument("--quick", action="store_true", help="16 steps (one window) per dp size")
    ap.add_argument("--worker-threads", default="",
                    help="plan threads to measure planner_worker_ms with, comma-separated (default: 1 and the "
                         "daemon's default here); a leader's machine with many cores: e.g. 1,4,8,12,16")
    args = ap.parse_args(argv)
    try:
        worker_threads = sorted({int(n) for n in args.worker_threads.split(",") if n.strip()} or {1, plan_threads()})
    except ValueError:
        ap.error(f"--worker-threads: expected comma-separated integers, got {args.worker_threads!r}")
    if not all(1 <= n <= MAX_THREADS for n in worker_threads):
        ap.error(f"--worker-threads: each must be 1 to {MAX_THREADS}")
    steps = 16 if args.quick else args.steps
    sources, origin = demo_sources(args.data, args.samples, args.seed)
    print(f"sources: {origin}: " + ", ".join(f"{s.name}={len(s)} units (max {int(s.tokens.max())} tok)" for s in sources))
    weights = demo_schedule().weights(0)
    keys = ("composed_max_over_mean", "fabric_max_over_mean", "naive_max_over_mean", "lower_bound")
    result: dict = {k: {} for k in keys}
    result.update({"composed_recomputed": {}, "fabric_recomputed": {}, "composed_worst_step": {},
                   "composed_lower_bound": {}, "planner_ms": {}, "planner_worst_ms": {},
                   "planner_step_ms": {}, "planner_cpu_ms": {}, "tokens_per_step_spread": {},
                   "planner_worker_ms": {}, "plan_serve_ms": {}})
    for dp in DPS:
        t0 = time.perf_counter()
        plain = planner_for(sources, dp, "none", args.seed)
        comp = planner_for(sources, dp, "outliers", args.seed)
        figs: dict[str, list[float]] = {k: [] for k in ("fab", "fab_re", "comp", "comp_re", "nai", "lb", "clb", "tok")}
        times, cpu, serve = [], [], []
        recompute = steps if dp <= 64 else min(steps, args.recompute_steps)
        for step in range(steps):
            p = plain.plan(step, dp)
            rc = p.rank_costs()
            figs["fab"].append(rc.max() / rc.mean())
            figs["lb"].append(max(rc.mean(), float(p.cost.max())) / rc.mean())
            t, tc = time.perf_counter(), time.process_time()
            c = comp.plan(step, dp)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - tc)
            cc = c.rank_costs()
            figs["comp"].append(cc.max() / cc.mean())
            figs["clb"].append(max(cc.mean(), float(c.cost.max())) / cc.mean())
            figs["tok"].append(int(c.tokens.sum()))
            serve.append(serve_ms(c))
            if step < recompute:
                for plan, key, planned in ((p, "fab_re", rc), (c, "comp_re", cc)):
                    re = packed_rank_costs(plan)
                    if not np.allclose(re, planned, rtol=1e-9):
                        raise SystemExit(f"dp {dp} step {step}: rank costs from cu_seqlens differ from the plan's")
                    figs[key].append(re.max() / re.mean())
            nc = naive_rank_costs(sources, weights, dp, BUDGET_PER_RANK, step, args.seed)
            figs["nai"].append(nc.max() / nc.mean())
        d = str(dp)
        mean = lambda k: round(float(np.mean(figs[k])), 4)  # noqa: E731
        result["composed_max_over_mean"][d] = mean("comp")
        result["fabric_max_over_mean"][d] = mean("fab")
        result["naive_max_over_mean"][d] = mean("nai")
        result["lower_bound"][d] = mean("lb")
        result["composed_lower_bound"][d] = mean("clb")
        result["composed_recomputed"][d] = mean("comp_re")
        result["fabric_recomputed"][d] = mean("fab_re")
        result["composed_worst_step"][d] = round(float(np.max(figs["comp"])), 4)
        result["planner_ms"][d] = round(1000 * float(np.mean(times)), 1)  # amortized: one step a window composes it
        result["planner_worst_ms"][d] = round(1000 * float(np.max(times)), 1)
        others = [x for i, x in enumerate(times) if i % comp.window] or times
        result["planner_step_ms"][d] = round(1000 * float(np.median(others)), 1)
        result["planner_cpu_ms"][d] = round(1000 * float(np.mean(cpu)), 1)
        tok = np.asarray(figs["tok"], dtype=np.float64) / (BUDGET_PER_RANK * dp)
        result["tokens_per_step_spread"][d] = [round(float(tok.min()), 4), round(float(tok.max()), 4)]
        result["plan_serve_ms"][d] = round(float(np.median(serve)), 1)
        result["planner_worker_ms"][d] = {str(n): worker_ms(sources, dp, comp.window, n, args.seed)
                                          for n in worker_threads}
        print(f"dp {dp:5d}: naive {mean('nai'):.4f}  fabric {mean('fab'):.4f} (bound {mean('lb'):.4f})  "
              f"composed {mean('comp'):.4f} (worst step {np.max(figs['comp']):.4f}, bound {mean('clb'):.4f})  "
              f"recomputed from cu_seqlens: fabric {mean('fab_re'):.4f} composed {mean('comp_re'):.4f} "
              f"({recompute} steps)  planner {result['planner_ms'][d]} ms/step amortized (worst step "
              f"{result['planner_worst_ms'][d]}, others {result['planner_step_ms'][d]}, cpu {result['planner_cpu_ms'][d]}; "
              f"plan worker {result['planner_worker_ms'][d]} ms/step by threads; serving {result['plan_serve_ms'][d]} ms)  tokens/budget {tok.min():.3f}..{tok.max():.3f}  "
              f"[{time.perf_counter() - t0:.1f}s, {steps} steps]", flush=True)
    result["max_delay_steps"] = MAX_DELAY_STEPS
    result["config"] = {"tokens_per_rank": BUDGET_PER_RANK, "context": 32768, "micro_batch_tokens": MICRO_BATCH_TOKENS,
                        "steps": steps, "origin": origin, "cost": {"attention": DEMO_COST.attention,
                                                                   "linear": DEMO_COST.linear},
                        "planner_loops": native.describe(),  # "c", or numpy (FABRICD_NATIVE=0, or not built)
                        "plan_threads": plan_threads(), "cpus": os.cpu_count()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
