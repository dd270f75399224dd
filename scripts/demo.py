#!/usr/bin/env python3
"""The fabricd demo: a 3-daemon fabric, the demo job, simulated trainers, a leader killed
mid-run, and a verified summary.

1. generates the demo corpus under .demo/data (first run only; a few corrupt samples included
   on purpose, to show they are skipped deterministically rather than crash anything);
2. starts three fabricd daemons on 127.0.0.1 (they elect a leader) and submits
   config/jobs/demo.toml to the leader, which places source loaders and data constructors;
3. runs dp_size × mp_size simulated trainer processes that pull batches with fabric_client;
   each group of ranks declares one daemon's node id as its host (as if it ran on that
   machine), and the leader moves the group's data constructor there;
4. kills the leader daemon with SIGKILL a third of the way through (its roles die with it), times
   the failover, and restarts it (it rejoins as a follower);
5. computes the expected batches offline from the job spec alone and compares, batch for batch;
6. stops everything it started and prints a summary ending with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fabricd.cluster.placement import constructor_id
from fabricd.config import load_job_spec
from fabricd.expect import BatchOracle
from fabricd.localnode import LocalCluster
from fabricd.planner.quality import step_balance
from fabric_client import protocol

ROOT = Path(__file__).resolve().parent.parent
JOB_FILE = ROOT / "config" / "jobs" / "demo.toml"
DEMO_DIR = ROOT / ".demo"
SOURCES = ("captions", "interleaved", "longdocs", "code", "ocr")


def ensure_data(samples: int, regenerate: bool) -> None:
    data = DEMO_DIR / "data"
    marker = data / ".complete"
    have_tokenizer = (data / "tokenizer" / "tokenizer.json").is_file()
    if marker.exists() and marker.read_text().strip() == str(samples) and have_tokenizer and not regenerate:
        print(f"using the demo corpus in {data}")
        return
    shutil.rmtree(data, ignore_errors=True)
    print(f"generating the demo corpus ({samples} samples per source) in {data} ...")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dataset.py"), "--out", str(data),
                    "--samples", str(samples), "--seed", "7", "--corrupt-fraction", "0.004"], check=True)
    marker.write_text(f"{samples}\n")


def wait_ready(cluster: LocalCluster, leader: str, job: str, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        status = (cluster.status(leader) or {}).get("jobs", {}).get(job, {})
        if status.get("state") != last:
            last = status.get("state")
            print(f"job {job}: {last}")
        if status.get("serving"):
            return status
        if last == "failed":
            raise SystemExit(f"job failed: {status.get('error')}")
        time.sleep(0.2)
    raise SystemExit(f"job {job} not ready after {timeout:.0f}s")


def run_trainers(cluster: LocalCluster, spec, steps: int, out_dir: Path, compute_ms: float,
                 kill_at: int | None) -> tuple[float, dict]:
    dp, mp = spec.topology.dp_size, spec.topology.mp_size
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    started = time.monotonic()
    for d in range(dp):
        for m in range(mp):
            out = out_dir / f"rank-{d}-{m}.jsonl"
            out.unlink(missing_ok=True)
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "sim_trainer.py"), "--address", ",".join(cluster.addresses),
                 "--stall-s", "1.0", "--host", trainer_host(cluster, spec, d),
                 "--job", spec.name, "--dp-rank", str(d), "--dp-size", str(dp), "--mp-rank", str(m),
                 "--steps", str(steps), "--out", str(out), "--compute-ms", str(compute_ms)],
                env={**os.environ, **cluster.client_env()}))  # the trainer key: the fabric runs secure
    failover: dict = {}
    try:
        with tqdm(total=steps, desc="steps delivered to every rank", unit="step") as bar:
            while any(p.poll() is None for p in procs):
                done = min((_last_step(f) for f in out_dir.glob("rank-*.jsonl")), default=0)
                bar.update(max(0, done - bar.n))
                if kill_at is not None and not failover and done >= kill_at:
                    failover = kill_leader(cluster, bar)
                time.sleep(0.05)
            bar.update(steps - bar.n)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    elapsed = time.monotonic() - started
    failed = [p.args[p.args.index("--dp-rank") + 1] for p in procs if p.returncode != 0]
    if failed:
        raise SystemExit(f"trainer ranks {failed} failed; see the output above")
    return elapsed, failover


def trainer_host(cluster: LocalCluster, spec, dp_rank: int) -> str:
    """The host the trainers of ``dp_rank`` pretend to run on: one daemon's node id per
    constructor group, in turn, as if each group of ranks ran on the machine of one daemon."""
    group = dp_rank // spec.topology.ranks_per_constructor
    nodes = list(cluster.daemons)
    return nodes[group % len(nodes)]


def host_affinity(cluster: LocalCluster, spec, timeout: float = 15.0) -> float:
    """Fraction of constructor groups whose primary runs on its trainers' declared host, once
    placement has settled (the killed leader came back; constructors move back to it)."""
    groups = spec.topology.groups()
    deadline = time.monotonic() + timeout
    while True:
        status = cluster.status(cluster.leader()) or {}
        roles = {r["id"]: r for r in status.get("jobs", {}).get(spec.name, {}).get("roles", [])}
        on_host = sum(1 for g, ranks in enumerate(groups)
                      if (r := roles.get(constructor_id(spec.name, g))) and r["alive"]
                      and r["node"] == trainer_host(cluster, spec, ranks[0]))
        if on_host == len(groups) or time.monotonic() > deadline:
            return round(on_host / len(groups), 3)
        time.sleep(0.3)


def kill_leader(cluster: LocalCluster, bar) -> dict:
    """SIGKILL the leader daemon, time until another one holds the lease, then restart it."""
    old = cluster.leader()
    killed_at = time.time()
    cluster.kill(old)
    bar.write(f"killed the leader {old} (SIGKILL; its roles die with it)")
    new = cluster.leader(timeout=60)
    failover_s = time.time() - killed_at
    bar.write(f"{new} took over as leader after {failover_s:.2f}s; restarting {old} as a follower")
    cluster.restart(old)
    return {"killed": old, "new_leader": new, "killed_at": killed_at, "failover_s": round(failover_s, 3)}


def _last_step(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


def stall_after(out_dir: Path, t: float) -> float:
    """Longest time any trainer waited for its first batch after ``t`` (the kill)."""
    waits = []
    for f in out_dir.glob("rank-*.jsonl"):
        after = [json.loads(line)["t"] for line in f.read_text().splitlines()]
        after = [x for x in after if x >= t]
        if after:
            waits.append(after[0] - t)
    return round(max(waits), 3) if waits else 0.0


def verify(spec, steps: int, out_dir: Path) -> dict:
    oracle = BatchOracle(spec)
    expected = {}
    ratios, bounds = [], []
    for step in tqdm(range(steps), desc="computing expected batches offline", unit="step"):
        for b in oracle.step(step):
            expected[b.key()] = b
        balance = step_balance(oracle.planner.plan(step, spec.topology.dp_size))
        ratios.append(balance.max_over_mean)
        bounds.append(balance.bound)
    lost = duplicated = mismatched = 0
    tokens = skipped = batches = image_tokens = images = 0
    for d in range(spec.topology.dp_size):
        for m in range(spec.topology.mp_size):
            rows = [json.loads(line) for line in (out_dir / f"rank-{d}-{m}.jsonl").read_text().splitlines()]
            seen = Counter((r["step"], r["dp_rank"], r["micro_batch"]) for r in rows)
            mine = {k: v for k, v in expected.items() if k[1] == d}
            lost += sum(1 for k in mine if k not in seen)
            duplicated += sum(c - 1 for c in seen.values() if c > 1)
            mismatched += sum(1 for r in rows if (e := expected.get((r["step"], r["dp_rank"], r["micro_batch"])))
                              is None or e.checksum != r["checksum"])
            batches += len(rows)
            if m == 0:
                tokens += sum(r["tokens"] for r in rows)
                skipped += sum(r["skipped"] for r in rows)
                images += sum(r["images"] for r in rows)
                image_tokens += sum(r["image_tokens"] for r in rows)
    return {"expected_batches": len(expected), "batches": batches, "lost": lost, "duplicated": duplicated,
            "mismatched": mismatched, "tokens": tokens, "images": images, "image_tokens": image_tokens,
            "skipped_units": skipped,
            "balance_max_over_mean": round(float(np.mean(ratios)), 4),
            "balance_lower_bound": round(float(np.mean(bounds)), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--samples", type=int, default=1500, help="samples per source in the demo corpus")
    ap.add_argument("--compute-ms", type=float, default=0.0, help="simulated compute per micro-batch")
    ap.add_argument("--regenerate", action="store_true", help="regenerate the corpus")
    ap.add_argument("--nodes", type=int, default=3, help="daemons in the local fabric")
    ap.add_argument("--no-kill", action="store_true", help="do not kill the leader mid-run")
    args = ap.parse_args()

    ensure_data(args.samples, args.regenerate)
    spec = load_job_spec(JOB_FILE)
    run_dir = DEMO_DIR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cluster = LocalCluster(run_dir / "cluster", nodes=args.nodes, loader_workers=2, data_roots=[DEMO_DIR / "data"])
    try:
        cluster.start()
        leader = cluster.leader()
        print(f"{args.nodes} fabricd daemons on {', '.join(cluster.addresses)}; leader {leader}; "
              f"logs: {run_dir / 'cluster'}/node-*/fabricd.log")
        with cluster.daemons[leader].client() as client:
            reply, _ = client.request(protocol.SubmitJob(spec_toml=JOB_FILE.read_text(), spec_path=str(JOB_FILE)))
        print(f"submitted job {reply.job} to the leader")
        wait_ready(cluster, leader, spec.name)
        kill_at = args.steps // 3 if args.nodes > 1 and not args.no_kill else None
        elapsed, failover = run_trainers(cluster, spec, args.steps, run_dir / "received", args.compute_ms, kill_at)
        affinity = host_affinity(cluster, spec)
        status = cluster.status(cluster.leader())
    finally:
        cluster.stop()
    result = verify(spec, args.steps, run_dir / "received")
    summary = {
        "steps": args.steps,
        "dp_size": spec.topology.dp_size,
        "mp_size": spec.topology.mp_size,
        "tokenizer": spec.tokenizer.kind,
        "images_mode": spec.images.mode,
        **result,
        "tokens_per_s": round(result["tokens"] / elapsed, 1),  # real tokens of the job's tokenizer, images included
        "delivery_s": round(elapsed, 2),
        "daemons": args.nodes,
        "failover_s": failover.get("failover_s"),
        "trainer_wait_after_kill_s": stall_after(run_dir / "received", failover["killed_at"]) if failover else None,
        "leader_killed": failover.get("killed"),
        "constructors_on_trainer_hosts": affinity,
        "daemon_malformed_dropped": status["counters"]["malformed_dropped"],
        "secure": not status["security"]["insecure"],  # CurveZMQ on every socket, generated keys
    }
    print()
    print(f"delivered {summary['batches']} micro-batches ({args.steps} steps × {spec.topology.dp_size} DP × "
          f"{spec.topology.mp_size} MP ranks) in {elapsed:.1f}s: {summary['tokens_per_s']:.0f} tokens/s")
    print(f"lost {summary['lost']}, duplicated {summary['duplicated']}, mismatched {summary['mismatched']}; "
          f"{summary['skipped_units']} corrupt units skipped deterministically")
    print(f"attention-cost balance: max/mean across DP ranks = {summary['balance_max_over_mean']} "
          f"(lower bound {summary['balance_lower_bound']}: the largest single sequence)")
    if failover:
        print(f"leader {failover['killed']} killed: {failover['new_leader']} led after {failover['failover_s']}s; "
              f"longest trainer wait for its next batch {summary['trainer_wait_after_kill_s']}s")
    print(f"constructors on their trainers' (simulated) hosts: {affinity:.0%} of groups")
    print(json.dumps(summary))
    ok = summary["lost"] == summary["duplicated"] == summary["mismatched"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
