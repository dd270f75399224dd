"""What keeps a role process small: the template imports what roles use and never torch, its
warm-up starts no thread, roles give free heap pages back on a schedule, and the opt-in memory
probe writes what the memory benchmark reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fabricd.roles.base import HeapTrimmer
from fabricd.roles.memory_probe import DUMP_ENV, TRACEMALLOC_ENV, mapping_breakdown, snapshot
from fabricd.roles.template import MEMORY_ENV

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_template_preload_and_warm_up_never_import_torch_and_start_no_thread(tmp_path):
    """A stand-in ``torch`` package that leaves a mark when imported: the template's preload and
    warm-up (and the role modules) do not import it; importing it does leave the mark."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    mark = tmp_path / "torch-imported"
    (stub / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    env = {**MEMORY_ENV, "PYTHONPATH": f"{tmp_path / 'stub'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = ("import os, sys\n"
            "from fabricd.roles import template\n"
            "template.preload(); template.warm_up()\n"
            "import fabricd.roles.source_loader, fabricd.roles.constructor, fabricd.roles.__main__\n"
            "print(len(os.listdir('/proc/self/task')), 'torch' in sys.modules, 'PIL.JpegImagePlugin' in sys.modules)\n")
    out = run_python(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "True"]  # one thread, no torch, the decoders preloaded
    assert not mark.exists()
    control = run_python("import torch", env)
    assert control.returncode == 0 and mark.exists(), "the stand-in torch should leave its mark"


def test_heap_trimmer_trims_once_per_interval():
    now = [100.0]
    trimmer = HeapTrimmer(every_s=5.0, clock=lambda: now[0])
    calls = []
    if trimmer._trim is None:
        pytest.skip("no malloc_trim in this C library")
    real = trimmer._trim
    trimmer._trim = lambda pad: calls.append(pad) or real(pad)
    for t in (100.0, 101.0, 104.9, 105.0, 105.1, 111.0):
        now[0] = t
        trimmer.maybe()
    assert calls == [0, 0, 0] and trimmer.trims == 3  # at 100, 105 and 111


def test_mapping_breakdown_accounts_for_the_private_memory():
    info = psutil.Process().memory_full_info()
    mb = mapping_breakdown(os.getpid())
    private = sum(e["private_mb"] for e in mb["by_kind"].values())
    assert private == pytest.approx(info.uss / 2**20, rel=0.1, abs=2.0)
    assert {"heap", "shared_libraries"} <= set(mb["by_kind"])
    assert mb["top"] and all(m["pss_mb"] >= mb["top"][-1]["pss_mb"] for m in mb["top"])
    snap = snapshot("r", "k")
    assert snap["uss_mb"] <= snap["pss_mb"] + 1 and snap["pss_mb"] <= snap["rss_mb"] + 1
    # this is the pytest process (another test may have imported torch here); that a role never
    # imports torch is checked by test_template_preload_and_warm_up_never_import_torch_and_start_no_thread
    assert "numpy" in snap["heavy_modules"]


def test_memory_probe_dumps_at_exit_with_the_tracemalloc_top(tmp_path):
    code = ("from fabricd.roles.memory_probe import start_from_env\n"
            "assert start_from_env('job/loader/a/0', 'source_loader')\n"
            "big = [bytes(1000) for _ in range(5000)]\n")
    out = run_python(code, {DUMP_ENV: str(tmp_path), TRACEMALLOC_ENV: "1"})
    assert out.returncode == 0, out.stderr
    (dump,) = tmp_path.glob("*.json")
    assert dump.name.startswith("job_loader_a_0-")
    data = json.loads(dump.read_text())
    assert data["final"] is True and data["role_id"] == "job/loader/a/0" and data["kind"] == "source_loader"
    assert data["tracemalloc_mb"] >= 5.0  # the 5 MB of bytes objects were live at exit
    assert any("<string>" in t["where"] for t in data["tracemalloc_top"])
    off = run_python("from fabricd.roles.memory_probe import start_from_env\nprint(start_from_env('r', 'k'))",
                     {DUMP_ENV: ""})
    assert off.stdout.strip() == "False"
