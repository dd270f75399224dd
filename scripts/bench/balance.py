#!/usr/bin/env python
"""Benchmark: per-step load balance of attention cost across DP ranks.

    python scripts/bench/balance.py [--data DIR] [--steps 50] [--seed 0]

For dp 8, 64 and 1024 (16 units per rank) it averages, over steps, max/mean of the per-rank
cost for (a) the fabric (``Planner.plan``), (b) a naive per-rank DataLoader (each rank
independently draws its 16 units from the mixture: a seeded random draw from the same per-source
unit pools) and (c) the per-step lower bound max(mean, largest single unit)/mean.

``--data DIR`` reads the demo corpus (``DIR/<source>/`` as written by
``scripts/make_dataset.py``) through ``fabricd.sources.index.open_index``; without it, or if
that fails, a synthetic corpus of the same shape is used and a warning line says so.
Human lines first; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fabricd.planner import CostModel, MixtureSchedule, Planner, SourceUnits, build_units

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


def naive_rank_costs(sources: list[SourceUnits], weights: np.ndarray, dp: int, per_rank: int,
                     step: int, seed: int) -> np.ndarray:
    """Rank costs when every rank draws its own ``per_rank`` units from the mixture (per-rank DataLoader)."""
    out = np.empty(dp)
    for r in range(dp):
        rng = np.random.default_rng([seed, step, r])
        which = rng.choice(len(sources), size=per_rank, p=weights)
        cost = 0.0
        for j in np.unique(which):
            k = int((which == j).sum())
            pick = rng.integers(0, len(sources[j]), k)
            cost += float(DEMO_COST(sources[j].tokens[pick], sources[j].images[pick]).sum())
        out[r] = cost
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="demo corpus directory (DIR/<source>/)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=20000, help="synthetic samples per source")
    ap.add_argument("--method", default="lpt")
    args = ap.parse_args(argv)
    sources, origin = demo_sources(args.data, args.samples, args.seed)
    print(f"sources: {origin}: " + ", ".join(f"{s.name}={len(s)} units (max {int(s.tokens.max())} tok)" for s in sources))
    schedule = demo_schedule()
    weights = schedule.weights(0)
    per_rank = 16
    result: dict[str, dict[str, float]] = {"fabric_max_over_mean": {}, "naive_max_over_mean": {}, "lower_bound": {}}
    for dp in (8, 64, 1024):
        planner = Planner(seed=args.seed, samples_per_step=per_rank * dp, micro_batch_tokens=65536, schedule=schedule,
                          cost=DEMO_COST, method=args.method, sources=sources)
        fab, nai, lb = [], [], []
        t0 = time.perf_counter()
        for step in range(args.steps):
            plan = planner.plan(step, dp)
            rc = plan.rank_costs()
            mean = rc.mean()
            fab.append(rc.max() / mean)
            lb.append(max(mean, float(plan.cost.max())) / mean)
            nc = naive_rank_costs(sources, weights, dp, per_rank, step, args.seed)
            nai.append(nc.max() / nc.mean())
        dt = time.perf_counter() - t0
        result["fabric_max_over_mean"][str(dp)] = round(float(np.mean(fab)), 4)
        result["naive_max_over_mean"][str(dp)] = round(float(np.mean(nai)), 4)
        result["lower_bound"][str(dp)] = round(float(np.mean(lb)), 4)
        ratio = np.mean(np.array(fab) / np.array(lb))
        print(f"dp {dp:5d}: fabric {np.mean(fab):.4f}  naive {np.mean(nai):.4f}  lower bound {np.mean(lb):.4f}  "
              f"fabric/bound {ratio:.4f} (worst step {np.max(np.array(fab) / np.array(lb)):.4f})  [{dt:.1f}s, {args.steps} steps]")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
