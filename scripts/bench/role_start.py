#!/usr/bin/env python3
"""Role-start benchmark: how long a role process takes from the supervisor starting it to the
role serving, over the starts of a whole job.

Each round starts a fresh one-node daemon, submits a job over the demo-like synthetic corpus
(five sources, ``--workers`` loader workers each, two data constructors) and waits until every
role is alive; then reads the daemon's log: per role, the time from the supervisor's
``started ...`` line (forked from the role template, or spawned) to the role's own
``... serving on`` line. A role forked from the template should serve within tens of
milliseconds; a slow one delays a job's first step, a restarted role or a grown pool.

The last line of output is one JSON object: ``starts``, ``p50_s``, ``p99_s``, ``max_s``,
``over_1s`` (starts that took more than a second), ``forked`` / ``spawned`` counts, and the
configuration.

    python scripts/bench/role_start.py [--rounds 3] [--workers 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (ROOT, os.path.join(ROOT, "client")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
from fabric_client import protocol  # noqa: E402

from fabricd.corpus import job_toml, make_dataset  # noqa: E402
from fabricd.localnode import LocalDaemon  # noqa: E402

JOB = "starts"
_STARTED = re.compile(r"started \S+ (" + JOB + r"/\S+) \(pid \d+, (forked|spawned)")
_SERVING = re.compile(r"\[(" + JOB + r"/\S+) pid=\d+\] .* serving on ")


def _time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def start_times(log: str) -> list[tuple[float, str]]:
    """(seconds from 'started' to 'serving on', 'forked'|'spawned') per role that served."""
    started: dict[str, tuple[float, str]] = {}
    out = []
    for line in log.splitlines():
        if m := _STARTED.search(line):
            started[m.group(1)] = (_time(line), m.group(2))
        elif (m := _SERVING.search(line)) and m.group(1) in started:
            t0, how = started.pop(m.group(1))
            out.append((_time(line) - t0, how))
    return out


def one_round(work: Path, corpus: Path, i: int, workers: int, timeout_s: float) -> list[tuple[float, str]]:
    job_file = work / f"job{i}.toml"
    job_file.write_text(job_toml(corpus, name=JOB, seed=3, dp_size=2, samples_per_step=16, prefetch=4,
                                 workers=workers, extra="[autoscale]\nenabled = false\n"))
    with LocalDaemon(work / f"node{i}", node_id="starts", loader_workers=workers) as daemon:
        with daemon.client() as c:
            c.request(protocol.SubmitJob(spec_toml=job_file.read_text(), spec_path=str(job_file)))
        want = 5 * workers + 2
        deadline = time.monotonic() + timeout_s
        while True:
            roles = daemon.status()["jobs"].get(JOB, {}).get("roles", [])
            if len(roles) >= want and all(r["alive"] for r in roles):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"roles not all alive after {timeout_s:.0f}s:\n{daemon.tail()}")
            time.sleep(0.1)
        time.sleep(0.5)  # the last roles' log lines
        return start_times(daemon.tail(100_000))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=3, help="loader workers per source")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a round may take to start its roles")
    args = ap.parse_args()
    if args.rounds < 1 or args.workers < 1:
        ap.error("--rounds and --workers must be at least 1")
    times: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory(prefix="fabricd-bench-starts-") as tmp:
        work = Path(tmp)
        make_dataset(work / "corpus", samples_per_source=48, seed=5, corrupt_fraction=0.0, progress=False)
        for i in range(args.rounds):
            got = one_round(work, work / "corpus", i, args.workers, args.timeout)
            print(f"round {i}: {len(got)} starts, slowest {max(t for t, _ in got):.3f}s", file=sys.stderr, flush=True)
            times += got
    s = np.array([t for t, _ in times])
    print(json.dumps({
        "starts": len(times),
        "p50_s": round(float(np.percentile(s, 50)), 3),
        "p99_s": round(float(np.percentile(s, 99)), 3),
        "max_s": round(float(s.max()), 3),
        "over_1s": int((s > 1.0).sum()),
        "forked": sum(1 for _, how in times if how == "forked"),
        "spawned": sum(1 for _, how in times if how == "spawned"),
        "rounds": args.rounds,
        "roles_per_round": 5 * args.workers + 2,
        "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
