#!/usr/bin/env python3
"""End-to-end benchmark: fabricd against per-rank PyTorch DataLoaders, side by side in one run.

    python scripts/bench/e2e.py [--quick] [--corpus DIR]

Same data (the demo corpus: its byte-level BPE tokenizer, native-resolution images), same
transforms (fabricd's reader and transform on both sides), same tokens per step, same cost model.

* Baseline: one ``torch.utils.data.DataLoader`` per DP rank (``num_workers=4``,
  ``persistent_workers=True``, ``prefetch_factor=2``, ``pin_memory=False``), a map-style dataset
  over every source with a per-rank sampler that mixes the sources by weight and packs greedily
  to the token budget (``e2e_baseline.py`` says why map-style).
* fabricd: a one-daemon local fabric running the generated job (``e2e_setup.fabric_job_toml``:
  the demo job's tokenizer, images, cost model, LPT balancing, autoscaler on; its global batch
  ``tokens_per_step``, the baseline's mean tokens per step, with step composition,
  ``compose = "outliers"``), trainers pulling with ``fabric_client.Loader``.
* Trainers: R ranks per side, one process each. A rank takes its step's batch, "computes"
  (sleeps) cost × calibration per micro-batch, and waits at a barrier for every rank.

Calibration: seconds per unit of cost such that the baseline's loading just keeps up: a free run
(no compute) gives its loading time per step; tries from there until its data wait is at most
10% of step time. Both sides then run at 1x, 0.5x (loading-bound) and 2x (compute-bound) of it,
and a mixture-shift phase at 2x (weight moves to the source that is the most expensive to load:
``settle_steps``, the steps until stalls stop). The sweep reruns both sides at 1x with 5, 20,
35 sources (the demo sources repeated under new names, each with its own files) and 8, 32 ranks.
``simulated_throughput_ratio``: both sides' plans at DP 1024 and 4096 under the cost model, no
processes (``e2e_sim.py``).

Measured per side (``e2e_run.py``): steps/s, tokens/s, efficiency (ideal step time = mean rank
cost × calibration, over measured step time), the fraction of time ranks waited for data, CPU
seconds of every loading process per million delivered tokens, loading memory (summed PSS of
the fabric's daemon and roles / the baseline's workers, plus each trainer's growth from loading),
CPU and memory by process group, and the cores other processes of the machine used meanwhile
(``other_cores_busy``: this benchmark measures on whatever machine it is given). A stall of the
mixture shift is a wait longer than 10% of the ideal step and than any wait of the phase before
the shift. A sweep run the machine cannot hold is stopped (memory) or not started (when it would
need more than the machine has): its memory then is a lower bound, flagged in the JSON.

``--quick`` runs the same configuration with shorter phases and only the 35-source sweep point
(memory at 5 and 35 sources). ``--tiny`` is for tests (a small corpus and configuration: it
checks that everything runs, it measures nothing). Human lines first (progress on stderr); the
last stdout line is one JSON object. The modules: ``e2e_bench`` (the sequence of runs, the
report), ``e2e_run`` (one run: processes, phases, measurements), ``e2e_rank`` (a simulated rank),
``e2e_baseline`` / ``e2e_sampler`` (the baseline), ``e2e_setup`` (corpus, job spec), ``e2e_sim``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases; the sweep only at 35 sources")
    ap.add_argument("--tiny", action="store_true", help="test mode: a small corpus and configuration, measures nothing")
    ap.add_argument("--corpus", type=Path, default=HERE.parents[1] / ".demo" / "bench" / "corpus",
                    help="where the demo corpus is made once and reused")
    ap.add_argument("--samples", type=int, default=1500, help="samples per source of the corpus (the demo's 1500)")
    ap.add_argument("--ranks", type=int, default=8, help="simulated DP ranks per side")
    ap.add_argument("--workers", type=int, default=4, help="baseline DataLoader workers per rank")
    ap.add_argument("--rank-tokens", type=int, default=8192, help="tokens per rank per step")
    ap.add_argument("--compression", default="", choices=["", "auto", "none", "lz4"],
                    help="the fabric's batch compression (default: the demo job's, auto: uncompressed to the "
                         "trainers here, which share the daemon's machine)")
    ap.add_argument("--no-local-ipc", action="store_true",
                    help="the fabric's same-node links (loaders, trainer streams) over TCP with CurveZMQ, as across nodes "
                         "(default: a private Unix socket, plaintext; README: Security)")
    ap.add_argument("--fabric-nice", type=int, default=0, choices=range(0, 20), metavar="N",
                    help="run the fabric's daemon (and so its roles) at niceness N, as systemd/fabricd.service does "
                         "with Nice=5 (default 0: the same as the trainers and the baseline's workers)")
    ap.add_argument("--ranks-per-constructor", type=int, default=8, metavar="N",
                    help="the fabric's [topology] ranks_per_constructor (default 8, the job default: one constructor "
                         "for a host's 8 ranks; on many cores, 4 or 2 share the batch building over more processes)")
    ap.add_argument("--sweep-sources", default=None, help="source counts (default 5,20,35; quick and tiny: 5,35)")
    ap.add_argument("--sweep-ranks", default=None, help="ranks per host (default RANKS,32; quick and tiny: RANKS)")
    ap.add_argument("--run-timeout", type=float, default=None, help="seconds one run may take (default: by mode)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs' directories under this directory")
    args = ap.parse_args(argv)
    if args.ranks_per_constructor < 1:
        ap.error(f"--ranks-per-constructor {args.ranks_per_constructor}: must be at least 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # imported here: the ranks are spawned, and each re-imports this file as its main module
    from e2e_bench import FULL, QUICK, TINY, run_benchmark, summary_line
    from e2e_setup import BenchConfig

    L = TINY if args.tiny else QUICK if args.quick else FULL
    if args.run_timeout:
        L = replace(L, run_timeout_s=args.run_timeout)
    short = args.quick or args.tiny
    sources = [int(x) for x in (args.sweep_sources or ("5,35" if short else "5,20,35")).split(",")]
    ranks = [int(x) for x in (args.sweep_ranks or (str(args.ranks) if short else f"{args.ranks},32")).split(",")]
    cfg = BenchConfig(ranks=args.ranks, workers=args.workers, rank_tokens=args.rank_tokens,
                      compression=args.compression, local_ipc=not args.no_local_ipc,
                      fabric_nice=args.fabric_nice, ranks_per_constructor=args.ranks_per_constructor)
    result = run_benchmark(L=L, mode="tiny" if args.tiny else "quick" if args.quick else "full",
                           corpus=args.corpus.absolute(), samples=args.samples, cfg=cfg, sweep_sources=sources,
                           sweep_ranks=ranks, workdir=args.workdir)
    print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
