"""The benchmarks that run local daemons still run end to end at a small size and end with their
JSON line: ``autoscale.py`` was once broken for months (its trainers had no keys once the fabric
became secure by default) without anything noticing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fabricd.localnode import DATA_ROOTS_ENV, kill_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def _last_json(args: list[str], timeout: float) -> dict:
    """Run a benchmark; its last stdout line. On a timeout the benchmark and every process under
    it (its daemons and their roles) are killed by pid, so none outlives the test."""
    # the benchmark's daemons take their data roots from where the benchmark put its corpus, not
    # from the tests' session setting
    env = {k: v for k, v in os.environ.items() if k != DATA_ROOTS_ENV}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        root = psutil.Process(proc.pid)
        kill_processes([root, *root.children(recursive=True)], timeout=10)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_autoscale_bench_small_setting_delivers_exactly_and_ends_with_its_json_line():
    line = _last_json(["scripts/bench/autoscale.py", "--latency-ms", "20", "--warmup", "6", "--seconds", "2",
                       "--ramp", "2"], timeout=200)
    assert line["lost"] == line["duplicated"] == line["mismatched"] == 0
    assert line["fixed_steps_per_s"] > 0 and line["autoscaled_steps_per_s"] > 0
    assert sum(line["fixed_pool_sizes"].values()) == 5  # autoscaling off: one worker per source
    assert {"ramp_s", "fixed_ramp_steps_per_s", "autoscaled_ramp_steps_per_s", "autoscaled_grown_s"} <= set(line)


def test_role_start_bench_small_setting_ends_with_its_json_line():
    line = _last_json(["scripts/bench/role_start.py", "--rounds", "1", "--workers", "1"], timeout=200)
    assert line["starts"] == line["roles_per_round"] == 7  # five loaders and two constructors, every one seen
    assert line["forked"] + line["spawned"] == 7
    assert 0 < line["p50_s"] <= line["p99_s"] <= line["max_s"]
