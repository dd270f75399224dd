"""The scale and index benchmarks still run end to end (at a small size) and end with their JSON
line, so a change to the leader's logic or to indexing cannot silently break them."""

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


def test_index_bench_quick_setting_ends_with_its_json_line():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench/index.py"), "--quick"],
                         capture_output=True, text=True, timeout=100, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["quick"] is True and line["docs"] == 40 and 1.5 < line["text_mb"] < 2.5
    assert line["hf_mb_per_s"] > 0 and line["raw_mb_per_s"] > 0
    assert line["ratio"] == pytest.approx(line["hf_mb_per_s"] / line["raw_mb_per_s"], rel=0.02)
    # both count the same documents with the same tokenizer, and chunk cuts change no token
    assert line["index_tokens"] == line["raw_tokens"] > 100_000 and line["counts_agree"] is True
    assert line["big_doc_counts_agree"] is True
    assert 0 < line["piece_ms_12m_doc"] and 0 < line["whole_doc_encode_s_12m_doc"]
    assert line["rss_before_index_mb_12m_doc"] <= line["peak_rss_mb_12m_doc"] < 2000
    assert isinstance(line["counts_agree"], bool)
