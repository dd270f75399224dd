"""Autoscaling benchmark: delivered steps/s of a job whose source loaders are slow, with the
leader's pool autoscaler off and on, measured one after the other in the same run.

The slowness is simulated: every load request sleeps ``--latency-ms`` in the source loader
(the ``loader.before_load=sleep(ms)`` failpoint, armed through ``FABRICD_ROLE_FAILPOINTS``),
standing for a remote object store; it occupies a worker without using a CPU, which is the
case extra loader workers help with. Each phase starts a fresh one-node daemon with one worker
per source, runs two free-running trainers (no pacing) for ``--warmup`` seconds, then counts
the steps both trainers completed in the next ``--seconds``. With autoscaling on, the pools
grow during the warm-up (up to ``--max-workers``; 0 takes the default cap); the phase also
reports their final sizes, how long after the trainers' start the pools last changed size
(``grown_s``, from the daemon's status sampled every 0.25 s) and the steps/s over the first
``--ramp`` seconds (``ramp_steps_per_s``: how fast the pools reach their size shows there).
Every delivered batch is checked against the offline expectation (lost/duplicated/mismatched).

The last line of output is one JSON object.

    python scripts/bench/autoscale.py [--latency-ms 60] [--warmup 20] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (ROOT, os.path.join(ROOT, "client")):
    if path not in sys.path:
        sys.path.insert(0, path)

from fabric_client import Loader, protocol  # noqa: E402
from fabricd.config import load_job_spec  # noqa: E402
from fabricd.corpus import job_toml, make_dataset  # noqa: E402
from fabricd.expect import BatchOracle  # noqa: E402
from fabricd.failpoints import ROLE_ENV  # noqa: E402
from fabricd.localnode import LocalDaemon  # noqa: E402

def phase(work: Path, corpus: Path, *, autoscale: bool, args: argparse.Namespace) -> dict:
    job_file = work / f"job-{'on' if autoscale else 'off'}.toml"
    job_file.write_text(job_toml(corpus, name="bench", seed=3, dp_size=2, samples_per_step=16, prefetch=4, workers=1,
                                 extra=f"[autoscale]\nenabled = {'true' if autoscale else 'false'}\n"
                                       f"max_workers = {args.max_workers}\n"))
    env = {ROLE_ENV: f"loader.before_load=sleep({args.latency_ms})"}
    with LocalDaemon(work / f"node-{'on' if autoscale else 'off'}", node_id="bench", loader_workers=1,
                     extra_env=env) as daemon:
        with daemon.client() as c:
            c.request(protocol.SubmitJob(spec_toml=job_file.read_text(), spec_path=str(job_file)))
        deadline = time.monotonic() + 120
        while not daemon.status()["jobs"].get("bench", {}).get("serving"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"job not serving:\n{daemon.tail()}")
            time.sleep(0.1)
        records: dict[int, list] = {0: [], 1: []}
        stop = threading.Event()
        errors = []

        def trainer(d: int) -> None:
            try:
                with Loader(daemon.address, job="bench", dp_rank=d, dp_size=2, deadline_s=60,
                            keys=daemon.trainer_keys) as loader:
                    for b in loader:
                        records[d].append(((b.step, b.dp_rank, b.micro_batch), b.checksum, time.monotonic()))
                        if stop.is_set():
                            return
            except Exception as e:  # reported below
                errors.append(e)

        sizes: list[tuple[float, int]] = []  # (seconds since the trainers started, loader workers) at each change

        def sample() -> None:
            while not stop.is_set():
                roles = daemon.status()["jobs"].get("bench", {}).get("roles", [])
                n = sum(1 for r in roles if r["kind"] == "source_loader")
                if not sizes or sizes[-1][1] != n:
                    sizes.append((round(time.monotonic() - started, 2), n))
                stop.wait(0.25)

        threads = [threading.Thread(target=trainer, args=(d,), daemon=True) for d in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(args.warmup)
        begin = time.monotonic()
        time.sleep(args.seconds)
        end = time.monotonic()
        stop.set()
        for t in threads:
            t.join(60)
        sampler.join(10)
        if errors:
            raise RuntimeError(f"trainer failed: {errors[0]!r}")
        job = daemon.status()["jobs"]["bench"]
        resizes = [line.split("job bench: ", 1)[1] for line in daemon.tail(100_000).splitlines()
                   if "job bench: pool " in line and "workers (" in line]
        pools = Counter(r["source"] for r in job["roles"] if r["kind"] == "source_loader")

    def steps_done(d: int, t: float) -> int:  # steps whose last micro-batch reached rank d by time t
        done = [k[0] for k, _, ts in records[d] if ts <= t]
        return max(done, default=-1) + 1  # in-order delivery: every earlier step is complete

    steps = min(steps_done(d, end) - steps_done(d, begin) for d in range(2))
    ramp = min(steps_done(d, started + args.ramp) for d in range(2))
    last = min(max((k[0] for k, *_ in records[d]), default=0) for d in range(2))
    want = {b.key(): b.checksum for s in range(last) for b in BatchOracle(load_job_spec(job_file)).step(s)}
    got = [(k, c) for d in range(2) for k, c, _ in records[d] if k[0] < last]
    seen = Counter(k for k, _ in got)
    return {
        "steps_per_s": round(steps / (end - begin), 2),
        "ramp_steps_per_s": round(ramp / args.ramp, 2),
        "pool_sizes": dict(sorted(pools.items())),
        "loader_workers_over_time": sizes,
        "grown_s": sizes[-1][0] if len(sizes) > 1 else 0.0,
        "resizes": resizes,  # the leader's log: each resize and why
        "lost": sum(1 for k in want if k not in seen),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "mismatched": sum(1 for k, c in got if want.get(k) != c),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=int, default=60, help="simulated store latency per load request")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-workers", type=int, default=4, help="per source; 0: the default cap")
    ap.add_argument("--ramp", type=float, default=10.0, help="seconds from the start over which ramp_steps_per_s counts")
    args = ap.parse_args()
    if not 0 < args.ramp <= args.warmup + args.seconds:
        ap.error("--ramp must be positive and at most --warmup + --seconds")
    with tempfile.TemporaryDirectory(prefix="fabricd-bench-autoscale-") as tmp:
        work = Path(tmp)
        make_dataset(work / "corpus", samples_per_source=96, seed=5, corrupt_fraction=0.0, progress=False)
        fixed = phase(work, work / "corpus", autoscale=False, args=args)
        print(json.dumps({"phase": "fixed", **fixed}), flush=True)
        scaled = phase(work, work / "corpus", autoscale=True, args=args)
        print(json.dumps({"phase": "autoscaled", **scaled}), flush=True)
    print(json.dumps({
        "latency_ms": args.latency_ms,
        "fixed_steps_per_s": fixed["steps_per_s"],
        "autoscaled_steps_per_s": scaled["steps_per_s"],
        "ramp_s": args.ramp,
        "fixed_ramp_steps_per_s": fixed["ramp_steps_per_s"],
        "autoscaled_ramp_steps_per_s": scaled["ramp_steps_per_s"],
        "autoscaled_grown_s": scaled["grown_s"],
        "speedup": round(scaled["steps_per_s"] / fixed["steps_per_s"], 2) if fixed["steps_per_s"] else None,
        "fixed_pool_sizes": fixed["pool_sizes"],
        "autoscaled_pool_sizes": scaled["pool_sizes"],
        "lost": fixed["lost"] + scaled["lost"],
        "duplicated": fixed["duplicated"] + scaled["duplicated"],
        "mismatched": fixed["mismatched"] + scaled["mismatched"],
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
