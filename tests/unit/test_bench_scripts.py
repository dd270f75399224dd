"""The scale benchmark still runs end to end (at a small size) and ends with its JSON line, so a
change to the leader's logic cannot silently break it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def test_scale_bench_small_setting_ends_with_its_json_line():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench/scale.py"), "--nodes", "8", "--dp", "32",
                          "--mp", "2", "--sources", "3", "--steps", "5"],
                         capture_output=True, text=True, timeout=100, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["caught_up"] is True
    assert line["steady_records"] == 5  # one job_progress record per step, whatever the ranks
    assert 0 < line["log_bytes_per_step"] <= 1024
    assert {"snapshot_bytes", "catch_up_s", "leader_cpu_ms_per_s", "placement_ms"} <= set(line)
