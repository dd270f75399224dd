#!/usr/bin/env python3
"""Fuzz a live 3-daemon fabric on every socket kind while a trainer checks its batches.

    .venv/bin/python scripts/fuzz.py --messages 100000 --seed 1

Socket kinds: control, peer (replication, lease, heartbeats), source loader, constructor, trainer
stream (see fabricd/fuzzrun.py). Inputs: every field of every record type given a wrong type or an
extreme value, damaged frames, deep nesting, oversize headers, replayed and out-of-order trainer
messages. Ends with one JSON line:

    {"messages": .., "per_socket": {..}, "crashes": 0, "role_restarts": .., "rss_growth_mb": ..,
     "max_handler_ms": .., "delivery_exact": true, ...}

Exits non-zero on a crash, a role restart or inexact delivery.
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

from fabricd.fuzzrun import FuzzRun  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000, help="messages per socket kind")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C: the finally below stops every daemon this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="fabricd-fuzz-"))
    run = FuzzRun(work, seed=args.seed)
    try:
        run.start()
        run.fuzz(args.messages, progress=sys.stderr.isatty() or args.messages >= 10000)
        summary = run.finish()
    finally:
        run.close()
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0 if summary["crashes"] == 0 and summary["role_restarts"] == 0 and summary["delivery_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
