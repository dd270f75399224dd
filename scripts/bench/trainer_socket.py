#!/usr/bin/env python
"""Benchmark: what a trainer of another user pays for its stream, over TCP with CurveZMQ against
the Unix socket shared with ``[security] trainer_group`` (README: Security).

    sudo .venv/bin/python scripts/bench/trainer_socket.py [--trials 3] [--steps 40]

One daemon with ``trainer_group = "nogroup"`` serves a one-rank job (the integration tests' job,
``tests/conftest.write_job``, over the corpus generator's five sources, 48 samples a step,
224-pixel images, uncompressed: the trainer is on this machine). A
forked trainer becomes user nobody (gid 65533), once with ``nogroup`` as a supplementary group
(it streams over the shared Unix socket) and once without (TCP with CurveZMQ, with a trainer
key), each on a job of its own, interleaved; each receives ``--steps`` steps. Reported per side,
medians over trials: CPU microseconds per MiB of batch bytes of the trainer process (all its
threads, zmq's I/O thread included) and of the job's constructor process. Needs root (to become
another user). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fabric_client import Loader, protocol  # noqa: E402
from fabric_client.keys import ClientKeys  # noqa: E402
from fabric_client.machine import machine_id  # noqa: E402
from fabricd.corpus import make_dataset  # noqa: E402
from fabricd.localnode import TRAINER_KEY, LocalDaemon  # noqa: E402
from tests.conftest import in_forked_child, write_job  # noqa: E402
from tests.integration.test_data_path import submit  # noqa: E402

NOBODY, NOGROUP, OTHER_GID = 65534, 65534, 65533


def _trainer(address: str, key_file: str, job: str, groups: list[int], steps: int, out) -> None:
    """In a forked child: become nobody (with ``groups``), stream ``steps`` steps, report CPU."""
    try:
        keys = ClientKeys.load(key_file)  # read while still allowed to
        os.setgroups(groups)
        os.setgid(OTHER_GID)
        os.setuid(NOBODY)
        with Loader(address, job=job, dp_rank=0, dp_size=1, max_steps=steps, deadline_s=60, keys=keys) as loader:
            it = iter(loader)
            next(it)  # connected, and the first batch in
            c0, b0, t0 = time.process_time(), loader.stats["bytes"], time.perf_counter()
            for batch in it:
                _ = batch["pixel_values"]
            out.put((time.process_time() - c0, loader.stats["bytes"] - b0, time.perf_counter() - t0,
                     loader.stats["stream_endpoint"]))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put(traceback.format_exc())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: a trainer of another user is what it measures", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fabricd-bench-trainer-socket-"))
    corpus = work / "data" / "corpus"
    make_dataset(corpus, samples_per_source=300, seed=3, corrupt_fraction=0.0, progress=False)
    daemon = LocalDaemon(work / "node", node_id="bench", trainer_group="nogroup", data_roots=[work / "data"])
    key_file = str(daemon.keys_dir / TRAINER_KEY)
    results: dict[str, list[dict]] = {"unix_socket": [], "tcp_curve": []}
    try:
        address = daemon.start()
        machine_id()  # cached before the forks: nobody may not read this interpreter's stdlib
        for trial in range(args.trials):
            order = ("unix_socket", "tcp_curve") if trial % 2 == 0 else ("tcp_curve", "unix_socket")
            for side in order:
                job = f"t{trial}-{side.replace('_', '-')}"
                spec = write_job(work / f"{job}.toml", corpus, name=job, dp_size=1, samples_per_step=48,
                                 prefetch=4, compression="auto")
                spec.write_text(spec.read_text().replace("image_size = 32", "image_size = 224"))
                submit(daemon, spec)
                constructor = next(r for r in daemon.status()["jobs"][job]["roles"] if r["kind"] == "constructor")
                cproc = psutil.Process(constructor["pid"])
                groups = [NOGROUP] if side == "unix_socket" else []
                c0 = sum(cproc.cpu_times()[:2])
                got = in_forked_child(_trainer, address, key_file, job, groups, args.steps, timeout=300)
                c1 = sum(cproc.cpu_times()[:2])
                if isinstance(got, str):
                    raise SystemExit(f"trainer failed:\n{got}")
                cpu, nbytes, wall, endpoint = got
                want = "ipc://" if side == "unix_socket" else "tcp://"
                if not endpoint.startswith(want):
                    raise SystemExit(f"{side}: the trainer streamed from {endpoint}, not over {want}")
                mib = nbytes / 2**20
                row = {"trainer_us_per_mib": round(1e6 * cpu / mib, 1),
                       "constructor_us_per_mib": round(1e6 * (c1 - c0) / mib, 1),
                       "mib": round(mib, 1), "wall_s": round(wall, 2)}
                results[side].append(row)
                print(f"trial {trial} {side:11s} {json.dumps(row)}", flush=True)
                with daemon.client() as client:
                    client.request(protocol.CancelJob(job=job))
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {side: {k: round(statistics.median(r[k] for r in rows), 1)
                      for k in ("trainer_us_per_mib", "constructor_us_per_mib")} for side, rows in results.items()}
    print(json.dumps({**summary, "trainer_cpu_ratio": round(summary["unix_socket"]["trainer_us_per_mib"]
                                                            / summary["tcp_curve"]["trainer_us_per_mib"], 3),
                      "trials": args.trials, "steps": args.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
