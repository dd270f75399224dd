#!/usr/bin/env python3
"""Memory of the loading side: a real local fabric serving the demo job with N sources, by kind
of process, against per-rank DataLoaders over the same data.

    python scripts/bench/memory.py [--sources 5,35] [--steps 30] [--nodes 1] [--loader-workers 1]
                                   [--baseline] [--breakdown] [--quick]

For each N in ``--sources``: the 5 demo sources (``scripts/demo.py``'s corpus, generated under
.demo/data on first use), and beyond 5 the demo sources again under new names, each with its
own copy of the files (``captions_2``, ...; the mixture weight of a demo source is split evenly
over its copies). A ``LocalCluster`` (``--nodes`` daemons, secure, autoscaling off so the pools
keep their base size) serves the job; ``dp_size × mp_size`` simulated trainers
(``scripts/sim_trainer.py``) pull ``--steps`` steps. While they pull, every process of the fabric
(daemons, role processes, the role template when there is one) is sampled every 2 s with
``psutil.Process.memory_full_info``; the sample with the largest summed PSS is reported, by kind:
``daemon``, ``template``, ``source_loader``, ``constructor``, with count, summed and mean PSS, USS
and RSS. PSS is the headline: it is what the processes really cost together (a page shared by k
processes counts 1/k in each); RSS counts shared pages in every process, USS counts none.

``--breakdown`` adds what a role's memory is:

- ``imports``: a fresh interpreter that only imports a role's modules (``python -c "import
  fabricd.roles.source_loader"``), its RSS, USS and PSS: what every spawned role pays before
  doing any work;
- ``mappings``: per kind, the private and proportional MB by kind of mapping (heap, anonymous,
  shared libraries, the Python binary, mapped data files) of the live processes;
- ``tracemalloc``: a second, shorter run at the first N whose roles dump their Python
  allocation top (``FABRICD_ROLE_MEMORY_DUMP`` / ``FABRICD_ROLE_TRACEMALLOC``, see
  ``fabricd.roles.memory_probe``); tracing inflates memory, so this run is not the headline.

``--baseline`` measures what per-rank PyTorch-style DataLoaders would hold over the same job:
one process per trainer rank (``dp_size × mp_size``) builds the dataset (the job's tokenizer,
every source's index and reader, the planner: ``fabricd.expect.BatchOracle``'s pieces), then
forks ``--baseline-workers`` workers, as ``torch.utils.data.DataLoader`` does on Linux (fork
start method); worker ``w`` builds its rank's micro-batches of the steps ``s ≡ w``
(mod workers) exactly as the fabric does (load, transform, pack). Loading-side PSS of the
baseline is the workers' summed PSS (the rank processes themselves are the trainers and are not
counted, which favours the baseline); torch is not imported (it is not installed here; a real
DataLoader's workers would also hold their share of it).

Human lines first; the last stdout line is one JSON object: per N, ``fabric_pss_mb`` (summed
PSS of every fabric process), per kind count and mean PSS/USS/RSS, ``processes``, and with
``--baseline`` ``baseline_pss_mb`` and ``baseline_over_fabric`` (how many times more the
DataLoaders hold). Everything measured (every sample's detail, the mappings' top entries, the
tracemalloc tops) goes to ``WORKDIR/memory-detail.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "client"))

import psutil  # noqa: E402

from fabric_client import protocol  # noqa: E402
from fabricd.localnode import LocalCluster  # noqa: E402
from fabricd.roles.memory_probe import DUMP_ENV, INTERVAL_ENV, TRACEMALLOC_ENV, mapping_breakdown  # noqa: E402

DEMO_DIR = ROOT / ".demo"
DEMO_JOB = ROOT / "config" / "jobs" / "demo.toml"
SOURCES = ("captions", "interleaved", "longdocs", "code", "ocr")
MB = 2**20
KINDS = ("daemon", "template", "source_loader", "constructor", "other")
SAMPLE_EVERY_S = 2.0


# -- corpus and job ---------------------------------------------------------------------------


def ensure_corpus(samples: int) -> Path:
    """The demo corpus (``scripts/demo.py`` makes the same one, with the same marker)."""
    data = DEMO_DIR / "data"
    marker = data / ".complete"
    if marker.exists() and marker.read_text().strip() == str(samples) and (data / "tokenizer/tokenizer.json").is_file():
        return data
    shutil.rmtree(data, ignore_errors=True)
    print(f"generating the demo corpus ({samples} samples per source) in {data} ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dataset.py"), "--out", str(data),
                    "--samples", str(samples), "--seed", "7", "--corrupt-fraction", "0.004"], check=True)
    marker.write_text(f"{samples}\n")
    return data


def source_names(n: int) -> list[tuple[str, str]]:
    """``(name, demo source)`` of the N sources: the demo's, then copies under new names."""
    return [(base if k < len(SOURCES) else f"{base}_{k // len(SOURCES) + 1}", base)
            for k, base in ((k, SOURCES[k % len(SOURCES)]) for k in range(n))]


def ensure_copies(data: Path, n: int, copies_dir: Path) -> dict[str, Path]:
    """Every source's directory: the demo's own, and a full copy of its files for each copy."""
    paths = {}
    for name, base in source_names(n):
        if name == base:
            paths[name] = data / base
            continue
        target = copies_dir / name
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(data / base, target)
            (target / ".complete").write_text("copy\n")
        paths[name] = target
    return paths


def job_toml(n: int, paths: dict[str, Path], data: Path, name: str) -> str:
    """The demo job over N sources, absolute paths, autoscaling off (base pools only)."""
    demo = tomllib.loads(DEMO_JOB.read_text())
    head = DEMO_JOB.read_text().split("[[sources]]", 1)[0]
    head = head.replace('name = "demo"', f'name = "{name}"', 1)
    head = head.replace(demo["tokenizer"]["path"], str(data / "tokenizer" / "tokenizer.json"))
    bucket = {s["name"]: s["bucket"] for s in demo["sources"]}
    copies = {base: sum(1 for _, b in source_names(n) if b == base) for base in SOURCES}
    out = [head]
    for src, base in source_names(n):
        out.append(f'[[sources]]\nname = "{src}"\npath = "{paths[src]}"\nbucket = "{bucket[base]}"\n\n')
    out.append(f'[mixture]\nkind = "{demo["mixture"]["kind"]}"\n\n')
    for point in demo["mixture"]["points"]:
        weights = ", ".join(f'{src} = {point["weights"][base] / copies[base]:.6f}' for src, base in source_names(n))
        out.append(f'[[mixture.points]]\nstep = {point["step"]}\nweights = {{ {weights} }}\n\n')
    out.append("[autoscale]\nenabled = false\n")
    return "".join(out)


# -- measuring processes ----------------------------------------------------------------------


def proc_memory(pid: int) -> dict[str, float] | None:
    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return None
    return {"pss_mb": info.pss / MB, "uss_mb": info.uss / MB, "rss_mb": info.rss / MB}


def fabric_pids(cluster: LocalCluster, job: str) -> dict[int, str]:
    """Every process of the fabric and its kind (role kinds from the daemons' status)."""
    kinds: dict[int, str] = {}
    for node, d in cluster.daemons.items():
        if d.proc is None:
            continue
        kinds[d.proc.pid] = "daemon"
        st = cluster.status(node) or {}
        roles = {r["pid"]: r["kind"] for r in st.get("jobs", {}).get(job, {}).get("roles", ()) if r.get("pid")}
        for p in d.descendants():
            if p.pid in roles:
                kinds[p.pid] = roles[p.pid]
            else:
                try:
                    cmd = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                kinds[p.pid] = "template" if "fabricd.roles.template" in cmd else "other"
    return kinds


def summarize(sample: dict[int, tuple[str, dict[str, float]]]) -> dict[str, Any]:
    by: dict[str, dict[str, float]] = {}
    for kind, mem in sample.values():
        e = by.setdefault(kind, {"count": 0, "pss_mb": 0.0, "uss_mb": 0.0, "rss_mb": 0.0})
        e["count"] += 1
        for k in ("pss_mb", "uss_mb", "rss_mb"):
            e[k] += mem[k]
    out = {}
    for kind in KINDS:
        if kind in by:
            e = by[kind]
            out[kind] = {"count": int(e["count"]), **{k: round(e[k], 1) for k in ("pss_mb", "uss_mb", "rss_mb")},
                         **{f"mean_{k}": round(e[k] / e["count"], 1) for k in ("pss_mb", "uss_mb", "rss_mb")}}
    total = {k: round(sum(m[k] for _, m in sample.values()), 1) for k in ("pss_mb", "uss_mb", "rss_mb")}
    return {"total": total, "processes": len(sample), "by_kind": out}


def take_sample(kinds: dict[int, str]) -> dict[int, tuple[str, dict[str, float]]]:
    out = {}
    for pid, kind in kinds.items():
        mem = proc_memory(pid)
        if mem is not None:
            out[pid] = (kind, mem)
    return out


def mappings_by_kind(kinds: dict[int, str]) -> dict[str, Any]:
    """Mean private / proportional MB per process of each kind, by kind of mapping."""
    acc: dict[str, dict[str, dict[str, float]]] = {}
    counts: dict[str, int] = {}
    tops: dict[str, list] = {}
    for pid, kind in kinds.items():
        try:
            mb = mapping_breakdown(pid, top=6)
        except psutil.Error:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        tops.setdefault(kind, mb["top"])
        for cat, e in mb["by_kind"].items():
            a = acc.setdefault(kind, {}).setdefault(cat, {"private_mb": 0.0, "pss_mb": 0.0})
            a["private_mb"] += e["private_mb"]
            a["pss_mb"] += e["pss_mb"]
    return {kind: {"processes": counts[kind],
                   "mean_per_process": {c: {f: round(v / counts[kind], 1) for f, v in e.items()}
                                        for c, e in sorted(cats.items())},
                   "top_mappings_of_one": tops[kind]}
            for kind, cats in acc.items()}


# -- the fabric run ---------------------------------------------------------------------------


def run_fabric(n: int, spec_path: Path, job: str, work: Path, data: Path, *, steps: int, nodes: int,
               loader_workers: int, dump_dir: Path | None = None, want_mappings: bool = False) -> dict[str, Any]:
    from fabricd.config import load_job_spec

    spec = load_job_spec(spec_path)
    env = {}
    if dump_dir is not None:
        env = {DUMP_ENV: str(dump_dir), TRACEMALLOC_ENV: "1", INTERVAL_ENV: "3"}
    shutil.rmtree(work, ignore_errors=True)
    cluster = LocalCluster(work, nodes=nodes, loader_workers=loader_workers, data_roots=[data.parent],
                           extra_env=env, log_level="WARNING")
    out: dict[str, Any] = {"sources": n, "nodes": nodes, "loader_workers": loader_workers, "steps": steps}
    trainers: list[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        cluster.start()
        leader = cluster.leader()
        with cluster.daemons[leader].client() as client:
            client.request(protocol.SubmitJob(spec_toml=spec_path.read_text(), spec_path=str(spec_path)))
        deadline = time.monotonic() + 900
        while not (cluster.status(leader) or {}).get("jobs", {}).get(job, {}).get("serving"):
            st = (cluster.status(leader) or {}).get("jobs", {}).get(job, {})
            if st.get("state") == "failed" or time.monotonic() > deadline:
                raise SystemExit(f"job {job} did not start serving: {st.get('error')}")
            time.sleep(0.5)
        out["ready_s"] = round(time.monotonic() - t0, 1)
        dp, mp = spec.topology.dp_size, spec.topology.mp_size
        recv = work / "received"
        recv.mkdir(parents=True, exist_ok=True)
        nodes_ids = list(cluster.daemons)
        for d in range(dp):
            for m in range(mp):
                host = nodes_ids[(d // spec.topology.ranks_per_constructor) % len(nodes_ids)]
                trainers.append(subprocess.Popen(
                    [sys.executable, str(ROOT / "scripts" / "sim_trainer.py"), "--address", ",".join(cluster.addresses),
                     "--job", job, "--dp-rank", str(d), "--dp-size", str(dp), "--mp-rank", str(m),
                     "--steps", str(steps), "--out", str(recv / f"rank-{d}-{m}.jsonl"), "--host", host,
                     "--deadline-s", "300"],
                    env={**os.environ, **cluster.client_env()}, stdout=subprocess.DEVNULL))
        t1 = time.monotonic()
        peak: dict[int, tuple[str, dict[str, float]]] = {}
        peak_total = -1.0
        samples = 0
        kinds: dict[int, str] = {}
        while True:
            done = all(p.poll() is not None for p in trainers)
            kinds = fabric_pids(cluster, job)
            sample = take_sample(kinds)
            samples += 1
            total = sum(m["pss_mb"] for _, m in sample.values())
            if total > peak_total:
                peak, peak_total = sample, total
            if done:
                break
            time.sleep(SAMPLE_EVERY_S)
        out["serve_s"] = round(time.monotonic() - t1, 1)
        failed = [p.args[p.args.index("--dp-rank") + 1] for p in trainers if p.returncode != 0]
        if failed:
            raise SystemExit(f"trainer ranks {failed} failed; see {work}/node-*/fabricd.log")
        out["batches"] = sum(len(f.read_text().splitlines()) for f in recv.glob("rank-*.jsonl"))
        out["samples_taken"] = samples
        out["peak"] = summarize(peak)
        out["end"] = summarize(take_sample(kinds))
        if want_mappings:
            out["mappings"] = mappings_by_kind(kinds)
        restarts = 0
        for node in cluster.daemons:
            for r in (cluster.status(node) or {}).get("jobs", {}).get(job, {}).get("roles", ()):
                restarts += r.get("restarts", 0) if r.get("node") == node else 0
        out["role_restarts"] = restarts
    finally:
        for p in trainers:
            if p.poll() is None:
                p.kill()
            p.wait()
        cluster.stop()
    out["leftover_processes"] = len(cluster.leftovers)
    return out


def read_dumps(dump_dir: Path) -> dict[str, Any]:
    """The roles' final memory dumps, condensed per kind (one representative each, the largest)."""
    best: dict[str, dict] = {}
    for f in dump_dir.glob("*.json"):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if d["kind"] not in best or d["uss_mb"] > best[d["kind"]]["uss_mb"]:
            best[d["kind"]] = d
    return {kind: {k: d.get(k) for k in ("role_id", "uss_mb", "pss_mb", "rss_mb", "modules", "heavy_modules",
                                         "threads", "arrow_pool_mb", "tracemalloc_mb", "tracemalloc_by_file",
                                         "tracemalloc_top", "final")}
            for kind, d in sorted(best.items())}


# -- what imports alone cost ------------------------------------------------------------------

_IMPORT_PROBE = """
import importlib, json, sys, psutil
for m in sys.argv[1:]:
    importlib.import_module(m)
i = psutil.Process().memory_full_info()
heavy = [m for m in ("torch", "PIL.Image", "pyarrow", "pyarrow.parquet", "tokenizers", "sentencepiece", "numpy",
                     "zmq", "fabricd.planner.plan") if m in sys.modules]
print(json.dumps({"rss_mb": round(i.rss / 2**20, 1), "uss_mb": round(i.uss / 2**20, 1),
                  "pss_mb": round(i.pss / 2**20, 1), "modules": len(sys.modules), "heavy": heavy}))
"""


def import_costs() -> dict[str, Any]:
    out = {}
    for label, mods in (("bare_python", []), ("source_loader", ["fabricd.roles.source_loader"]),
                        ("constructor", ["fabricd.roles.constructor"]), ("daemon", ["fabricd.daemon"]),
                        ("both_roles", ["fabricd.roles.source_loader", "fabricd.roles.constructor"])):
        r = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *mods], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'client'}"}, check=True)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# -- the per-rank DataLoader baseline ---------------------------------------------------------


def baseline_rank(spec_path: str, dp_rank: int, workers: int, steps: int, report: str) -> int:
    """One trainer rank's DataLoader: the dataset built here, ``workers`` forked workers that build
    this rank's micro-batches of their steps, then wait (SIGTERM ends them) while being measured."""
    import numpy as np

    from fabricd.assemble import assemble_micro_batch
    from fabricd.config import load_job_spec
    from fabricd.job import build_planner, job_tokenizer, open_sources, transform_spec
    from fabricd.sources.transform import SampleLoader

    spec = load_job_spec(spec_path)
    tokenizer = job_tokenizer(spec, parallel=False)
    indexes = open_sources(spec, tokenizer=tokenizer)
    planner = build_planner(spec, indexes)
    loaders = [SampleLoader(indexes[s.name], transform_spec(spec, s.name), tokenizer=tokenizer) for s in spec.sources]
    dp = spec.topology.dp_size
    pids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                batches = 0
                for step in range(w, steps, workers):
                    plan = planner.plan(step, dp)
                    mine = np.flatnonzero(plan.rank == dp_rank)
                    loaded: dict[int, Any] = {}
                    for src in np.unique(plan.source[mine]).tolist():
                        sel = mine[plan.source[mine] == src]
                        for i, unit in zip(sel.tolist(), loaders[src].load(plan.sample_id[sel], plan.piece[sel])):
                            loaded[i] = unit if not isinstance(unit, Exception) else unit.reason
                    for rows in plan.micro_batches(dp_rank):
                        assemble_micro_batch([loaded[i] for i in rows.tolist()], source_ids=plan.source[rows],
                                             sample_ids=plan.sample_id[rows], pieces=plan.piece[rows],
                                             images=spec.images)
                        batches += 1
                with open(f"{report}.{w}", "w") as f:
                    f.write(json.dumps({"pid": os.getpid(), "batches": batches}))
                signal.sigwait({signal.SIGTERM})  # stay alive, with the working set, until measured
            except BaseException:
                code = 1
                import traceback

                traceback.print_exc()
            os._exit(code)
        pids.append(pid)
    with open(f"{report}.parent", "w") as f:
        f.write(json.dumps({"pid": os.getpid(), "workers": pids}))
    signal.sigwait({signal.SIGTERM})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in pids:
        os.waitpid(pid, 0)
    return 0


def run_baseline(spec_path: Path, work: Path, *, ranks: int, workers: int, steps: int, dp: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("rank-*"):
        f.unlink()
    procs = []
    t0 = time.monotonic()
    for r in range(ranks):
        # SIGTERM is blocked before the fork so sigwait receives it (and workers inherit the mask)
        procs.append(subprocess.Popen([sys.executable, __file__, "--baseline-rank", str(spec_path), str(r % dp),
                                       str(workers), str(steps), str(work / f"rank-{r}")],
                                      env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'client'}"}))
    try:
        deadline = time.monotonic() + 1800
        expected = [work / f"rank-{r}.{w}" for r in range(ranks) for w in range(workers)]
        peak: dict[int, tuple[str, dict[str, float]]] = {}
        peak_total = -1.0
        while True:
            kinds = {}
            for p in procs:
                try:
                    kinds.update({c.pid: "worker" for c in psutil.Process(p.pid).children()})
                except psutil.Error:
                    pass
            sample = take_sample(kinds)
            total = sum(m["pss_mb"] for _, m in sample.values())
            if total > peak_total:
                peak, peak_total = sample, total
            if all(f.exists() for f in expected):
                break
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise SystemExit("a baseline rank failed or timed out")
            time.sleep(SAMPLE_EVERY_S)
        build_s = time.monotonic() - t0
        workers_now = take_sample(kinds)
        parents = take_sample({p.pid: "rank" for p in procs})
        batches = sum(json.loads(f.read_text())["batches"] for f in expected)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def total(s: dict, k: str) -> float:
        return round(sum(m[k] for _, m in s.values()), 1)

    peak_pss = max(total(peak, "pss_mb"), total(workers_now, "pss_mb"))
    return {"ranks": ranks, "workers_per_rank": workers, "worker_processes": len(workers_now), "batches": batches,
            "build_s": round(build_s, 1),
            "workers_pss_mb": peak_pss, "workers_uss_mb": total(workers_now, "uss_mb"),
            "workers_rss_mb": total(workers_now, "rss_mb"),
            "mean_worker_pss_mb": round(total(workers_now, "pss_mb") / max(1, len(workers_now)), 1),
            "rank_processes_pss_mb": total(parents, "pss_mb")}


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON line: headline numbers and per-kind summaries (the full result goes to a file)."""
    out = {k: result[k] for k in ("revision", "steps", "nodes", "loader_workers") if k in result}
    if "imports" in result:
        out["imports"] = {k: {f: v[f] for f in ("uss_mb", "pss_mb", "rss_mb")} for k, v in result["imports"].items()}
    out["runs"] = []
    for r in result["runs"]:
        run = {"sources": r["sources"], "fabric_pss_mb": r["fabric_pss_mb"], "processes": r["peak"]["processes"],
               "fabric_uss_mb": r["peak"]["total"]["uss_mb"], "fabric_rss_mb": r["peak"]["total"]["rss_mb"],
               "by_kind": {k: {f: v[f] for f in ("count", "pss_mb", "mean_pss_mb", "mean_uss_mb", "mean_rss_mb")}
                           for k, v in r["peak"]["by_kind"].items()},
               "batches": r["batches"], "role_restarts": r["role_restarts"],
               "leftover_processes": r["leftover_processes"]}
        if "mappings" in r:  # mean private MB per process, by kind of mapping
            run["private_mb_by_mapping"] = {k: {c: e["private_mb"] for c, e in v["mean_per_process"].items()
                                                if e["private_mb"] >= 0.1}
                                            for k, v in r["mappings"].items()}
        if "baseline" in r:
            b = r["baseline"]
            run.update(baseline_pss_mb=r["baseline_pss_mb"], baseline_over_fabric=r["baseline_over_fabric"],
                       baseline_workers=b["worker_processes"], baseline_mean_worker_pss_mb=b["mean_worker_pss_mb"],
                       baseline_rank_processes_pss_mb=b["rank_processes_pss_mb"])
        out["runs"].append(run)
    if "tracemalloc" in result:
        out["tracemalloc"] = {k: {f: d.get(f) for f in ("uss_mb", "tracemalloc_mb", "arrow_pool_mb", "modules")}
                              for k, d in result["tracemalloc"]["roles"].items()}
    return out


def revision() -> str:
    """The checkout measured: short commit, ``+dirty`` when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-rank":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        _, _, spec, rank, workers, steps, report = sys.argv
        return baseline_rank(spec, int(rank), int(workers), int(steps), report)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default="5,35", help="comma-separated source counts (multiples of 1)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--samples", type=int, default=1500, help="samples per demo source")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--baseline", action="store_true", help="also measure per-rank DataLoaders")
    ap.add_argument("--baseline-workers", type=int, default=4)
    ap.add_argument("--breakdown", action="store_true", help="imports, mappings and a tracemalloc run")
    ap.add_argument("--quick", action="store_true", help="5 sources, 8 steps, 300 samples (smoke test)")
    ap.add_argument("--workdir", default=None, help="default: .demo/memory (a temp dir with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.sources, args.steps, args.samples = "5", 8, 300
    counts = [int(x) for x in args.sources.split(",") if x]
    if args.quick:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="fabricd-memory-"))
        data = work / "corpus"
        if not (data / ".complete").exists():
            from fabricd.corpus import make_dataset

            make_dataset(data, samples_per_source=args.samples, seed=7, corrupt_fraction=0.004, progress=False)
            (data / ".complete").write_text("quick\n")
    else:
        work = Path(args.workdir or DEMO_DIR / "memory")
        data = ensure_corpus(args.samples)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"revision": revision(), "steps": args.steps, "nodes": args.nodes,
                              "loader_workers": args.loader_workers}
    if args.breakdown:
        result["imports"] = import_costs()
        print("imports alone (fresh interpreter): " + ", ".join(
            f"{k} USS {v['uss_mb']} / PSS {v['pss_mb']} MB" for k, v in result["imports"].items()), flush=True)
    runs = []
    for n in counts:
        paths = ensure_copies(data, n, work / "copies" if args.quick else DEMO_DIR / "memory-copies")
        job = f"mem{n}"
        spec_path = work / f"{job}.toml"
        spec_path.write_text(job_toml(n, paths, data, job))
        print(f"--- {n} sources: fabric ({args.nodes} daemon(s), {args.loader_workers} loader worker(s) per source)",
              flush=True)
        run = run_fabric(n, spec_path, job, work / f"fabric-{n}", data, steps=args.steps, nodes=args.nodes,
                         loader_workers=args.loader_workers, want_mappings=args.breakdown)
        peak = run["peak"]
        print(f"    {peak['processes']} processes, summed PSS {peak['total']['pss_mb']} MB "
              f"(USS {peak['total']['uss_mb']}, RSS {peak['total']['rss_mb']}); " + "; ".join(
                  f"{k} ×{v['count']}: PSS {v['pss_mb']} (mean {v['mean_pss_mb']}, USS {v['mean_uss_mb']})"
                  for k, v in peak["by_kind"].items()), flush=True)
        entry: dict[str, Any] = {"sources": n, "fabric_pss_mb": peak["total"]["pss_mb"], **run}
        if args.baseline:
            from fabricd.config import load_job_spec

            spec = load_job_spec(spec_path)
            ranks = spec.topology.dp_size * spec.topology.mp_size
            print(f"--- {n} sources: per-rank DataLoaders ({ranks} ranks × {args.baseline_workers} workers)", flush=True)
            base = run_baseline(spec_path, work / f"baseline-{n}", ranks=ranks, workers=args.baseline_workers,
                                steps=args.steps, dp=spec.topology.dp_size)
            entry["baseline"] = base
            entry["baseline_pss_mb"] = base["workers_pss_mb"]
            entry["baseline_over_fabric"] = round(base["workers_pss_mb"] / entry["fabric_pss_mb"], 2)
            print(f"    {base['worker_processes']} workers, summed PSS {base['workers_pss_mb']} MB "
                  f"(mean {base['mean_worker_pss_mb']}); baseline / fabric = {entry['baseline_over_fabric']}×",
                  flush=True)
        runs.append(entry)
    if args.breakdown:
        n = counts[0]
        dump_dir = work / "dumps"
        shutil.rmtree(dump_dir, ignore_errors=True)
        print(f"--- {n} sources: tracemalloc run (not the headline: tracing inflates memory)", flush=True)
        traced = run_fabric(n, work / f"mem{n}.toml", f"mem{n}", work / f"traced-{n}", data,
                            steps=max(4, args.steps // 2), nodes=1, loader_workers=args.loader_workers,
                            dump_dir=dump_dir)
        result["tracemalloc"] = {"sources": n, "peak": traced["peak"]["by_kind"], "roles": read_dumps(dump_dir)}
        for kind, d in result["tracemalloc"]["roles"].items():
            print(f"    {kind}: USS {d['uss_mb']} MB, Python allocations {d['tracemalloc_mb']} MB, "
                  f"Arrow pool {d.get('arrow_pool_mb')} MB, {d['modules']} modules, heavy: {d['heavy_modules']}")
    result["runs"] = runs
    detail = work / "memory-detail.json"
    detail.write_text(json.dumps(result, indent=1))
    print(f"full detail (samples, mappings, tracemalloc tops): {detail}")
    print(json.dumps(compact(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
