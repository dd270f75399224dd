#!/usr/bin/env python3
"""Failover benchmark: kill -9 the leader daemon N times while trainers consume batches.

A 3-daemon fabric on 127.0.0.1 serves a 2-rank job to two trainer threads (real Loaders) that
consume one batch every --pace-ms. At a random moment (seeded) the leader daemon is killed with
SIGKILL — its role processes die with it — and restarted once another daemon leads. For each
kill it measures, per trainer rank, the time from the kill to the first batch the Loader hands
to the trainer after it (what a training loop would see; batches already prefetched count), and
the time until another daemon held the lease. At the end every batch the trainers received is
compared with the offline expectation: lost, duplicated, mismatched.

Last line: {"kills", "p50_s", "p99_s", "max_s", "election_p50_s", "election_p99_s", "lost",
"duplicated", "mismatched", "lease_duration_s"}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fabric_client import Loader, protocol  # noqa: E402
from fabricd.config import load_job_spec  # noqa: E402
from fabricd.expect import BatchOracle  # noqa: E402
from fabricd.localnode import LocalCluster  # noqa: E402
from tests.conftest import write_job  # noqa: E402


def make_corpus(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_dataset", ROOT / "scripts" / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.make_dataset(out, samples_per_source=64, seed=5, corrupt_fraction=0.02, progress=False)


class Trainer(threading.Thread):
    def __init__(self, addresses, dp_rank, dp_size, pace_s, stop):
        super().__init__(daemon=True)
        self.args = (addresses, dp_rank, dp_size)
        self.pace_s, self.stop_event = pace_s, stop
        self.records: list[tuple[tuple[int, int, int], str, float]] = []
        self.error: Exception | None = None

    def run(self):
        addresses, dp_rank, dp_size = self.args
        try:
            with Loader(addresses, job="t", dp_rank=dp_rank, dp_size=dp_size, deadline_s=120, stall_s=0.5,
                        prefetch=2) as loader:
                for b in loader:
                    self.records.append(((b.step, b.dp_rank, b.micro_batch), b.checksum, time.time()))
                    if self.stop_event.is_set():
                        break
                    time.sleep(self.pace_s)
        except Exception as e:  # reported by main
            self.error = e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pace-ms", type=float, default=50.0)
    ap.add_argument("--lease-s", type=float, default=2.0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fabricd-failover-"))
    stop = threading.Event()
    cluster = None
    try:
        make_corpus(work / "corpus")
        job_file = write_job(work / "job.toml", work / "corpus", dp_size=2, samples_per_step=8, prefetch=2,
                             ranks_per_constructor=1)
        cluster = LocalCluster(work / "cluster", nodes=3, loader_workers=2, lease_duration_s=args.lease_s,
                               renew_deadline_s=args.lease_s * 0.65, retry_period_s=args.lease_s * 0.15,
                               log_level="WARNING")
        cluster.start()
        leader = cluster.leader()
        with cluster.daemons[leader].client() as c:
            c.request(protocol.SubmitJob(spec_toml=job_file.read_text(), spec_path=str(job_file)))
        deadline = time.monotonic() + 120
        while not (cluster.status(leader) or {}).get("jobs", {}).get("t", {}).get("serving"):
            if time.monotonic() > deadline:
                raise SystemExit("job did not start")
            time.sleep(0.1)
        trainers = [Trainer(cluster.addresses, d, 2, args.pace_ms / 1e3, stop) for d in range(2)]
        for t in trainers:
            t.start()
        waits, elections = [], []
        for k in range(args.kills):
            time.sleep(1.0 + rng.random() * 2.0)  # a random moment of steady delivery
            leader = cluster.leader()
            killed_at = time.time()
            cluster.kill(leader, signal.SIGKILL)
            new = cluster.leader(timeout=60)
            elections.append(time.time() - killed_at)
            per_rank = []
            for t in trainers:
                while not any(ts > killed_at for *_, ts in t.records[-5:]):
                    if t.error or time.time() - killed_at > 60:
                        raise SystemExit(f"rank {t.args[1]} did not recover: {t.error}")
                    time.sleep(0.01)
                per_rank.append(next(ts for *_, ts in t.records if ts > killed_at) - killed_at)
            waits.append(max(per_rank))
            print(f"kill {k + 1:2d}: {leader} killed, {new} led after {elections[-1]:.2f}s, "
                  f"first batch after the kill: {max(per_rank):.2f}s (worst rank)", flush=True)
            cluster.restart(leader)
        stop.set()
        for t in trainers:
            t.join(30)
        spec = load_job_spec(job_file)
        last = min(max(k[0] for k, *_ in t.records) for t in trainers)
        oracle = BatchOracle(spec)
        want = {b.key(): b.checksum for s in range(last) for b in oracle.step(s)}
        lost = duplicated = mismatched = 0
        for t in trainers:
            got = [(k, c) for k, c, _ in t.records if k[0] < last]
            seen = Counter(k for k, _ in got)
            lost += sum(1 for k in want if k[1] == t.args[1] and k not in seen)
            duplicated += sum(n - 1 for n in seen.values() if n > 1)
            mismatched += sum(1 for k, c in got if want.get(k) != c)
        result = {"kills": args.kills, "p50_s": round(float(np.percentile(waits, 50)), 3),
                  "p99_s": round(float(np.percentile(waits, 99)), 3), "max_s": round(max(waits), 3),
                  "election_p50_s": round(float(np.percentile(elections, 50)), 3),
                  "election_p99_s": round(float(np.percentile(elections, 99)), 3),
                  "lost": lost, "duplicated": duplicated, "mismatched": mismatched, "steps_checked": last,
                  "lease_duration_s": args.lease_s}
        print(json.dumps(result))
        return 0
    finally:
        stop.set()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
