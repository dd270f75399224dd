#!/usr/bin/env python
"""Benchmark: wall time of ``Planner.plan`` for one step.

    python scripts/bench/planner.py [--data DIR] [--steps 20] [--warmup 3] [--method lpt]

dp 1024 with samples_per_step 8192 and dp 4096 with 32768, on the demo sources (or the
synthetic fallback; see scripts/bench/balance.py). Median over ``--steps`` consecutive steps
after ``--warmup`` steps. Human lines first; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from balance import DEMO_COST, demo_schedule, demo_sources  # noqa: E402  (sibling bench module)

from fabricd.planner import Planner, native  # noqa: E402

CASES = ((1024, 8192), (4096, 32768))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="demo corpus directory (DIR/<source>/)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=20000, help="synthetic samples per source")
    ap.add_argument("--method", default="lpt")
    ap.add_argument("--micro-batch-tokens", type=int, default=32768)
    args = ap.parse_args(argv)
    sources, origin = demo_sources(args.data, args.samples, args.seed)
    print(f"sources: {origin}; method {args.method}; micro_batch_tokens {args.micro_batch_tokens}; "
          f"planner loops: {native.describe()}")
    out: dict[str, float] = {}
    for dp, batch in CASES:
        planner = Planner(seed=args.seed, samples_per_step=batch, micro_batch_tokens=args.micro_batch_tokens,
                          schedule=demo_schedule(), cost=DEMO_COST, method=args.method, sources=sources)
        times = []
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            plan = planner.plan(step, dp)
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times.append(dt)
        ms = float(np.median(times) * 1e3)
        out[str(dp)] = round(ms, 2)
        print(f"dp {dp:5d}, samples_per_step {batch:6d}: median {ms:.2f} ms/step "
              f"(min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f}; max micro-batches/rank {int(plan.num_micro.max())})")
    print(json.dumps({"ms_per_step": out, "planner_loops": native.describe()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
