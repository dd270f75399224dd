#!/usr/bin/env python3
"""Failover benchmark: kill -9 the leader daemon N times while trainers consume batches.

A 3-daemon fabric on 127.0.0.1 (fabricd.chaos.ChaosRun) serves a 2-rank job to two trainer
threads (real Loaders, one batch every 50 ms, prefetch 2). At a random moment (seeded) the
leader daemon is killed with SIGKILL — its role processes die with it — and restarted once
another daemon leads. Per kill: the time from the kill to the first batch every trainer rank
received after it (the worst rank), and the time until another daemon held the lease. At the
end every received batch is compared with the offline expectation.

Last line: {"kills", "p50_s", "p99_s", "max_s", "election_p50_s", "election_p99_s", "lost",
"duplicated", "mismatched", "lease_duration_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fabricd.chaos import ChaosRun  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lease-s", type=float, default=2.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fabricd-failover-"))
    run = ChaosRun(work, seed=args.seed, lease_s=args.lease_s, kinds=("kill_leader",))
    try:
        run.start()
        for k in range(args.kills):
            fault = run.inject("kill_leader")
            print(f"kill {k + 1:2d}: {fault.target} killed; first batch to every rank after "
                  f"{fault.recovery_s:.3f}s; new leader after {fault.election_s:.2f}s", flush=True)
        summary = run.finish()
    finally:
        run.close()
        shutil.rmtree(work, ignore_errors=True)
    waits = [f.recovery_s for f in run.faults if f.recovery_s is not None]
    elections = [f.election_s for f in run.faults]
    result = {"kills": len(run.faults), "p50_s": round(float(np.percentile(waits, 50)), 3),
              "p99_s": round(float(np.percentile(waits, 99)), 3), "max_s": round(max(waits), 3),
              "election_p50_s": round(float(np.percentile(elections, 50)), 3),
              "election_p99_s": round(float(np.percentile(elections, 99)), 3),
              "lost": summary["lost"], "duplicated": summary["duplicated"], "mismatched": summary["mismatched"],
              "unrecovered": summary["unrecovered"], "steps_checked": summary["steps_checked"],
              "lease_duration_s": args.lease_s}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
