"""The memory benchmark (``scripts/bench/memory.py --quick``) still runs end to end and ends with
its JSON line: every process of the fabric found and classified, PSS summed by kind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_memory_bench_quick_classifies_every_process(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench/memory.py"), "--quick", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    (run,) = line["runs"]
    kinds = run["by_kind"]
    # one daemon, its role template, a loader per source (5, one worker each), 2 constructors (dp 4, 2 per group)
    assert {k: v["count"] for k, v in kinds.items()} == {"daemon": 1, "template": 1, "source_loader": 5,
                                                         "constructor": 2}
    assert run["processes"] == 9
    assert sum(v["pss_mb"] for v in kinds.values()) == pytest.approx(run["fabric_pss_mb"], abs=0.6)
    assert 0 < run["fabric_uss_mb"] <= run["fabric_pss_mb"] <= run["fabric_rss_mb"]
    for v in kinds.values():
        assert 0 < v["mean_uss_mb"] <= v["mean_pss_mb"] + 0.5 <= v["mean_rss_mb"] + 1
    assert run["batches"] > 0 and run["role_restarts"] == 0 and run["leftover_processes"] == 0
    detail = json.loads((tmp_path / "memory-detail.json").read_text())
    assert detail["runs"][0]["peak"]["total"]["pss_mb"] == run["fabric_pss_mb"]
