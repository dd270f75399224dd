"""The transport benchmark still runs end to end (at a tiny size) and ends with its JSON line,
whose headline ratios are what they say: medians of each loader trial over its raw neighbour."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]


def test_transport_bench_tiny_setting_ends_with_its_json_line():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench/transport.py"), "--seconds", "0.2",
                          "--trials", "2", "--batch-kib", "64"],
                         capture_output=True, text=True, timeout=140, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["trials"] == 2 and line["compression"] == "lz4"
    for key, trials in (("ratio_lz4", "ratio_lz4_trials"), ("ratio_none", "ratio_none_trials")):
        assert len(line[trials]) == 2 and all(r > 0 for r in line[trials])
        assert line[key] == pytest.approx(statistics.median(line[trials]), abs=1e-3)
    for key in ("loader_gbps", "raw_gbps", "curve_gbps", "none_loader_gbps", "none_raw_gbps"):
        assert line[key] > 0, key
    assert line["ratio"] == pytest.approx(line["loader_gbps"] / line["raw_gbps"], abs=2e-3)
    assert line["none_ratio"] == pytest.approx(line["none_loader_gbps"] / line["none_raw_gbps"], abs=2e-3)
    assert line["batch_bytes"] >= 64 * 1024 and line["wire_bytes"] > 0
    for kind in ("lz4", "none"):
        cpu = line[f"cpu_us_per_mib_{kind}"]
        assert set(cpu) == {"raw_rx", "raw_tx", "loader_rx", "loader_tx"} and all(v > 0 for v in cpu.values())
