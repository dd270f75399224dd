#!/usr/bin/env python3
"""The chaos suite outside pytest: a 3-daemon fabric, real trainers, N seeded faults, invariants.

    .venv/bin/python scripts/chaos.py --faults 200 --seed 1
    .venv/bin/python scripts/chaos.py --faults 50 --etcd http://127.0.0.1:2379   # on the etcd lease backend

Prints one JSON line per fault, then one summary line: {faults, lost, duplicated, mismatched,
stale_term_applied, malformed_casualties, skips_recorded, max_recovery_s, ...}; delivery is
checked against the offline expectation given the skip records of the most up-to-date log. Exits non-zero if an invariant was violated.
See fabricd/chaos.py for the faults and invariants.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabricd.chaos import FAULT_KINDS, PARTITION_KINDS, ChaosRun  # noqa: E402
from fabricd.netns import available  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--kinds", default=None, help="comma-separated fault kinds (default: all that can run here)")
    ap.add_argument("--netns", choices=("auto", "yes", "no"), default="auto",
                    help="run the daemons in network namespaces, enabling partition faults (needs root)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    ap.add_argument("--etcd", metavar="URL", default=None,
                    help="use the etcd lease backend against this etcd endpoint (e.g. http://127.0.0.1:2379), "
                         "under a prefix of this run's own")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C: the finally below stops every daemon this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="fabricd-chaos-"))
    netns = args.netns == "yes" or (args.netns == "auto" and available())
    kinds = tuple(args.kinds.split(",")) if args.kinds else FAULT_KINDS + (PARTITION_KINDS if netns else ())
    print(f"faults drawn from: {', '.join(kinds)}" + ("" if netns else " (no network namespaces: no partitions)"),
          file=sys.stderr)
    extra = (f'lease_backend = "etcd"\netcd_endpoints = ["{args.etcd}"]\netcd_prefix = "/fabricd-chaos/{work.name}/"\n'
             if args.etcd else "")
    run = ChaosRun(work, seed=args.seed, nodes=args.nodes, kinds=kinds, netns=netns, cluster_extra=extra)
    try:
        run.start()
        for _ in range(args.faults):
            print(json.dumps(run.inject().__dict__), flush=True)
        summary = run.finish()
    finally:
        run.close()
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    bad = ("lost", "duplicated", "mismatched", "stale_term_applied", "log_divergence", "two_leaders_in_a_term",
           "unrecovered", "orphaned_processes", "daemon_crashes", "malformed_casualties", "unrecorded_failures")
    return 1 if any(summary[k] for k in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
