#!/usr/bin/env python3
"""A simulated trainer rank: pulls batches through fabric_client.Loader and records what it got.

Each received micro-batch becomes one JSON line (step, ranks, micro-batch, checksum, tokens) in
--out, so a harness can compare the stream with the offline expectation. The Loader verifies
every batch's content against its checksum on arrival. ``--compute-ms`` sleeps per batch to
imitate a forward/backward pass; ``--stop-after N`` exits after N steps and writes the loader's
state_dict to --state, which ``--resume`` reads back (checkpoint/restart).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from fabric_client import Loader


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--address", required=True, help="daemon control endpoint(s), comma-separated")
    ap.add_argument("--job", required=True)
    ap.add_argument("--dp-rank", type=int, required=True)
    ap.add_argument("--dp-size", type=int, required=True)
    ap.add_argument("--mp-rank", type=int, default=0)
    ap.add_argument("--steps", type=int, required=True, help="stop when this step is reached")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compute-ms", type=float, default=0.0)
    ap.add_argument("--stop-after", type=int, default=None, help="exit after this many steps (checkpoint)")
    ap.add_argument("--state", default=None, help="state_dict file written at exit / read by --resume")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=120.0)
    ap.add_argument("--stall-s", type=float, default=5.0, help="silence before the loader relocates")
    ap.add_argument("--host", default=None, help="the host this trainer declares (default: this machine's name)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"trainer dp={args.dp_rank} mp={args.mp_rank}: %(message)s")

    loader = Loader(args.address.split(","), job=args.job, dp_rank=args.dp_rank, dp_size=args.dp_size,
                    mp_rank=args.mp_rank, max_steps=args.steps, deadline_s=args.deadline_s,
                    stall_s=args.stall_s, host=args.host)
    if args.resume and args.state:
        with open(args.state) as f:
            loader.load_state_dict(json.load(f))
    first_step = None
    with loader, open(args.out, "a") as out:
        for batch in loader:
            first_step = batch.step if first_step is None else first_step
            offsets, ids = batch["image_token_offsets"], batch["input_ids"]
            image_tokens = int((ids == ids[offsets[0]]).sum()) if len(offsets) else 0
            out.write(json.dumps({
                "step": batch.step, "dp_rank": batch.dp_rank, "mp_rank": args.mp_rank,
                "micro_batch": batch.micro_batch, "num_micro_batches": batch.num_micro_batches,
                "checksum": batch.checksum, "tokens": batch.tokens, "samples": batch.samples,
                "skipped": batch.skipped, "images": int(len(offsets)), "image_tokens": image_tokens,
                "t": time.time(),
            }) + "\n")
            if args.compute_ms:
                time.sleep(args.compute_ms / 1e3)
            last_of_step = batch.micro_batch + 1 == batch.num_micro_batches
            if (args.stop_after is not None and last_of_step
                    and batch.step + 1 - (first_step or 0) >= args.stop_after):
                break
        if args.state:
            with open(args.state, "w") as f:
                json.dump(loader.state_dict(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
