#!/usr/bin/env python
"""Benchmark: what a job's plan changes cost as they pile up (online mixing logs one every
``online_every_steps`` steps: thousands over a long run).

For N logged mixture-point changes (one every 20 steps, as ``online:odm`` logs them) it measures,
in a fresh process per N (so RSS is that N's alone):

- ``build_s``: a job runtime building its planner from scratch with the N changes (a daemon
  starting, or a job resubmitted);
- ``add_s``: one more change committed to that runtime (``JobRuntime.update_plan`` until the new
  planner is ready), the median of a few;
- ``check_s``: the leader checking one more change (``plan_control.check_plan_change``, what
  ``Leadership.propose_plan_change`` runs on the daemon's loop thread), the median of a few;
- ``plan_first_s`` / ``plan_s``: planning a step of the last segment, the first time and a later step;
- ``rss_mb``: resident memory grown from the sources opened to the end (``hwm_mb``: peak growth).

    python scripts/bench/plan_changes.py [--counts 10,100,1000] [--samples 400] [--compose]

Human lines first; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (ROOT, os.path.join(ROOT, "client")):
    if path not in sys.path:
        sys.path.insert(0, path)

EVERY = 20
SOURCES = ("captions", "interleaved", "longdocs", "code", "ocr")


def _mem_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got.get("VmRSS", 0.0), got.get("VmHWM", 0.0)


def _change(job: str, i: int, term: int = 1):
    """The i-th online-mixing-like change: a mixture point at step 20·(i+1), weights varying."""
    from fabricd.cluster.records import MixturePoint, PlanChange

    at = EVERY * (i + 1)
    weights = {s: 1.0 + ((i * 7 + k * 3) % 11) / 10 for k, s in enumerate(SOURCES)}
    return PlanChange(job=job, at_step=at, points=[MixturePoint(step=at, weights=weights)], origin="online:odm",
                      term=term)


def _wait(pred, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.001)


def one(n: int, corpus: Path, work: Path, compose: bool, reps: int) -> dict:
    """Measure one N in this process."""
    import msgspec

    from fabricd.cluster.state import FabricState, Record
    from fabricd.config import load_job_spec
    from fabricd.corpus import job_toml
    from fabricd.job import JobRuntime, NoRoles, open_sources
    from fabricd.plan_control import check_plan_change

    text = job_toml(corpus, name="bench", seed=3, dp_size=4, samples_per_step=64, prefetch=2)
    if compose:
        text = text.replace("prefetch = 2", 'prefetch = 2\ncompose = "outliers"\nmax_delay_steps = 3')
    (work / "job.toml").write_text(text)
    spec = load_job_spec(work / "job.toml")
    open_sources(spec, index_dir=work / "idx")  # the indexes exist before the clock starts
    rss0, hwm0 = _mem_mb()
    changes = [_change(spec.name, i) for i in range(n)]

    t0 = time.perf_counter()
    rt = JobRuntime(spec, index_dir=work / "idx", directory=NoRoles(), plan_changes=changes)
    _wait(lambda: rt.state != "indexing")
    build_s = time.perf_counter() - t0
    assert rt.state == "ready", rt.error

    last = EVERY * n + 5
    dp = spec.topology.dp_size
    t0 = time.perf_counter()
    rt.planner.plan(last, dp)
    plan_first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rt.planner.plan(last + 1, dp)
    plan_s = time.perf_counter() - t0

    state = FabricState()
    state.apply(Record(1, 1, "job_submitted", {"job": spec.name, "spec_toml": spec.text, "spec_origin": spec.file,
                                                "fingerprint": "", "dp_size": dp}))
    for seq, c in enumerate(changes, start=2):
        state.apply(Record(1, seq, "plan_changed", msgspec.to_builtins(c)))
    checks = []
    for r in range(reps):
        t0 = time.perf_counter()
        first, refused = check_plan_change(state, rt, _change(spec.name, n + r), {}, 0)
        checks.append(time.perf_counter() - t0)
        assert refused is None, refused

    adds = []
    for r in range(reps):
        changes = changes + [_change(spec.name, n + r)]
        t0 = time.perf_counter()
        rt.update_plan(changes)
        _wait(lambda: rt._replanned is not None or rt.state == "failed")
        rt._swap_planner()
        adds.append(time.perf_counter() - t0)
        assert rt.state == "ready", rt.error
    rt.planner.plan(EVERY * len(changes) + 5, dp)
    rss1, hwm1 = _mem_mb()
    plans = getattr(rt, "plans", None)  # the segment planners' cache, where the runtime has one
    rt.close()
    return {"n": n, "build_s": round(build_s, 4), "add_s": round(statistics.median(adds), 4),
            "check_s": round(statistics.median(checks), 4), "plan_first_s": round(plan_first_s, 4),
            "plan_s": round(plan_s, 4), "rss_mb": round(rss1 - rss0, 1), "hwm_mb": round(hwm1 - hwm0, 1),
            **({"built": dict(plans.counters)} if plans is not None else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="10,100,1000", help="numbers of logged changes, comma-separated")
    ap.add_argument("--samples", type=int, default=400, help="synthetic samples per source (default 400)")
    ap.add_argument("--compose", action="store_true", help="composition on (outliers, windows of 4)")
    ap.add_argument("--reps", type=int, default=3, help="added/checked changes measured per N (median)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one N
    ap.add_argument("--corpus", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        with tempfile.TemporaryDirectory(prefix="bench-pc-") as d:
            print(json.dumps(one(args.one, args.corpus, Path(d), args.compose, args.reps)))
        return 0
    from fabricd.corpus import make_dataset

    out = []
    with tempfile.TemporaryDirectory(prefix="bench-pc-corpus-") as d:
        make_dataset(Path(d), samples_per_source=args.samples, seed=3, progress=False, tokenizers=False)
        for n in [int(x) for x in args.counts.split(",") if x.strip()]:
            cmd = [sys.executable, __file__, "--one", str(n), "--corpus", d, "--samples", str(args.samples),
                   "--reps", str(args.reps)] + (["--compose"] if args.compose else [])
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            out.append(row)
            print(f"N={n:5d}: build {row['build_s']:.3f}s, add one {row['add_s']:.3f}s, check one {row['check_s']:.3f}s, "
                  f"plan last segment {row['plan_first_s'] * 1e3:.1f} ms (then {row['plan_s'] * 1e3:.1f} ms), "
                  f"RSS +{row['rss_mb']:.1f} MiB (peak +{row['hwm_mb']:.1f})", flush=True)
    print(json.dumps({"samples_per_source": args.samples, "compose": args.compose, "every_steps": EVERY,
                      "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
