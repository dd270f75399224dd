"""scripts/bench/e2e.py runs end to end in its tiny mode (a small corpus, 2 ranks, 1 worker a rank,
5 and 10 sources) and reports every key of its JSON line, with numbers that agree with what the
configuration implies: the baseline's tokens per step with its own sampler run offline, the
fabric's tokens per step with the planner's plans, the processes counted with the configuration.
It measures nothing here (the machine is shared); the numbers' meaning is the script's business.

Marker ``cluster`` (real daemons and trainer processes); needs PyTorch (the ``train`` extra).
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytest.importorskip("torch", reason="PyTorch is not installed (it is the `train` extra: pip install -e '.[train]')")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench" / "e2e.py"
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

pytestmark = [pytest.mark.cluster]

KEYS = {"throughput_ratio", "memory_ratio", "fabric_efficiency", "baseline_efficiency", "fabric_wait_frac",
        "baseline_wait_frac", "cpu_ratio", "settle_steps", "simulated_throughput_ratio", "sweep", "configuration",
        "calibration"}


@pytest.mark.timeout(900)
def test_tiny_mode_reports_every_key_with_numbers_the_configuration_implies(tmp_path):
    work = tmp_path / "runs"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--corpus", str(tmp_path / "corpus"), "--samples", "64",
                           "--ranks", "2", "--workers", "1", "--rank-tokens", "2048", "--sweep-sources", "5,10",
                           "--workdir", str(work), "--run-timeout", "400"],
                          capture_output=True, text=True, timeout=860, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result)
    cfg = result["configuration"]
    assert (cfg["ranks"], cfg["workers"], cfg["prefetch_factor"], cfg["rank_tokens"]) == (2, 1, 2, 2048)
    # the DataLoader workers start as under torchrun (fork on Linux), not as the spawned ranks do
    assert cfg["baseline_worker_start_method"] == multiprocessing.get_all_start_methods()[0]
    assert set(result["memory_ratio"]) == {"5", "10"} and all(v > 0 for v in result["memory_ratio"].values())
    assert set(result["simulated_throughput_ratio"]) == {"1024", "4096"}
    assert result["mixture_shift"]["to"] in ("captions", "interleaved", "longdocs", "code", "ocr")
    one = {}
    for side in ("baseline", "fabric"):
        phases = {p["phase"]: p for p in result["sides"][side]["phases"]}
        one[side] = phases["1x"]
        assert {"free", "1x", "0.5x", "2x", "shift"} <= set(phases)
        assert phases["2x"]["scale"] == pytest.approx(4 * phases["0.5x"]["scale"])
        assert phases["1x"]["scale"] == pytest.approx(result["calibration"]["seconds_per_cost"])
        for p in phases.values():
            # CPU is read in clock ticks (10 ms a process): a tiny phase of two steps in ~40 ms can
            # read 0 (seen on the baseline's), so only the side's phases together must show some
            assert 0 <= p["wait_frac"] <= 1 and p["tokens_per_s"] > 0 and p["cpu_s_per_mtok"] >= 0
            # the fabric's loader processes, at least one per source, through every phase
            assert (side == "fabric") == ("source_loaders" in p)
            assert side != "fabric" or min(p["source_loaders"]) >= 5
        assert sum(p["cpu_s"] for p in phases.values()) > 0
    assert result["throughput_ratio"] == pytest.approx(one["fabric"]["tokens_per_s"] / one["baseline"]["tokens_per_s"],
                                                       rel=0.01)
    assert result["fabric_efficiency"] == one["fabric"]["efficiency"] and 0 < result["fabric_efficiency"] < 1.2

    # the baseline's tokens per step: what its own sampler, run offline, says
    base_steps = [p["tokens_per_step"] for p in result["sides"]["baseline"]["phases"] if p["phase"] != "shift"]
    assert abs(sum(base_steps) / len(base_steps) / cfg["baseline_tokens_per_step"] - 1) < 0.2

    # the fabric's tokens per step: exactly its plans' (delivered units are the planned ones)
    from e2e_setup import job_spec
    from fabricd.job import build_planner, job_tokenizer, open_sources

    (job_file,) = work.glob("fabricd-bench-e2e-*/job.toml")
    spec = job_spec(job_file)
    # the global batch in tokens, the baseline's, with step composition
    assert spec.batch.tokens_per_step == cfg["tokens_per_step"] == round(cfg["baseline_tokens_per_step"])
    assert (spec.batch.compose, spec.batch.max_delay_steps) == ("outliers", cfg["max_delay_steps"])
    planner = build_planner(spec, open_sources(spec, tokenizer=job_tokenizer(spec)))
    assert planner.samples_per_step == cfg["samples_per_step"]
    f = one["fabric"]
    planned = [int(planner.plan(s, 2).tokens.sum()) for s in range(f["first_step"], f["first_step"] + f["steps"])]
    assert f["tokens_per_step"] == pytest.approx(sum(planned) / len(planned), rel=0.02)
    # and over the whole composition windows before the mixture shift the fabric's steps hold the
    # baseline's tokens (past the shift, its own draw count holds them: test_plan_changes'
    # test_a_token_budget_holds_across_mixture_points)
    window = cfg["max_delay_steps"] + 1
    before = result["mixture_shift"]["fabric"]["shift_step"] // window * window
    assert before >= window
    steps = [int(planner.plan(s, 2).tokens.sum()) for s in range(before)]
    assert abs(sum(steps) / len(steps) / cfg["tokens_per_step"] - 1) < 0.15

    # processes: the baseline's loading is its workers; the fabric's, a daemon, a loader per source, a constructor
    for point in result["sweep"]:
        assert point["baseline"]["loading_processes"] == 2 * 1
        assert point["fabric"]["loading_processes"] >= 1 + point["sources"] + 1
    groups = result["sides"]["fabric"]["memory"]["by_group_mb"]
    assert {"daemon", "source_loaders", "constructors"} <= set(groups)
    assert set(result["sides"]["baseline"]["memory"]["by_group_mb"]) == {"workers"}
    # the constructor's CPU per delivered step, its main thread's part of it apart (the baseline has none)
    built = result["sides"]["fabric"]["constructor_cpu"]
    assert built["constructors"] == 1
    assert 0 < built["main_thread_ms_per_step"] <= built["process_ms_per_step"]
    assert result["sides"]["baseline"]["constructor_cpu"] is None

    # nothing it started outlived it
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or ())]
    assert not left, f"processes left running: {left}"
