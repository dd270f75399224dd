"""An opt-in look inside a role process's memory, for ``scripts/bench/memory.py``.

Off unless the environment names a directory in ``FABRICD_ROLE_MEMORY_DUMP``; then the role
writes ``DIR/ROLE_ID-PID.json`` (``/`` in the id as ``_``) every ``FABRICD_ROLE_MEMORY_INTERVAL_S`` seconds (default 5) and
once more as it exits. ``FABRICD_ROLE_TRACEMALLOC=N`` also traces Python allocations (N frames;
it costs memory and time, so it is a separate switch) and adds the top allocation sites.

A dump holds: ``memory_full_info`` (RSS, USS, PSS in MB), the private and proportional memory
by kind of mapping (:func:`mapping_breakdown`: heap, anonymous, shared libraries, the Python
binary, mapped data files), what the Arrow memory pool holds, how many modules are imported
and which heavy ones, and the tracemalloc top when traced. Writing a dump never raises into
the role: a failure is logged once.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

__all__ = ["DUMP_ENV", "INTERVAL_ENV", "TRACEMALLOC_ENV", "HEAVY_MODULES", "mapping_breakdown", "snapshot",
           "start_from_env"]

log = logging.getLogger(__name__)

DUMP_ENV = "FABRICD_ROLE_MEMORY_DUMP"
INTERVAL_ENV = "FABRICD_ROLE_MEMORY_INTERVAL_S"
TRACEMALLOC_ENV = "FABRICD_ROLE_TRACEMALLOC"
#: modules worth knowing whether a role imported (libraries of tens of MB, or that must never be)
HEAVY_MODULES = ("torch", "PIL.Image", "pyarrow", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.compute",
                 "tokenizers", "sentencepiece", "numpy", "zmq", "lz4.frame", "msgspec", "psutil", "pandas",
                 "tqdm", "fabricd.planner.plan", "fabricd.images")
MB = 2**20


def _category(path: str) -> str:
    if path == "[heap]":
        return "heap"
    if path in ("", "[anon]") or path.startswith("[anon:"):
        return "anonymous"
    if path.startswith("["):
        return "stack+kernel"  # [stack], [vvar], [vdso]
    name = os.path.basename(path)
    if ".so" in name:
        return "shared_libraries"
    if os.path.realpath(path) == os.path.realpath(sys.executable) or name.startswith("python"):
        return "python_binary"
    return "mapped_files"


def mapping_breakdown(pid: int, top: int = 8) -> dict[str, Any]:
    """Private (USS) and proportional (PSS) MB of process ``pid`` by kind of mapping, and its
    ``top`` mappings by PSS (psutil ``memory_maps``; Linux)."""
    import psutil

    by: dict[str, dict[str, float]] = {}
    maps = []
    for m in psutil.Process(pid).memory_maps(grouped=True):
        cat = _category(m.path)
        private = (m.private_clean + m.private_dirty) / MB
        entry = by.setdefault(cat, {"private_mb": 0.0, "pss_mb": 0.0, "rss_mb": 0.0})
        entry["private_mb"] += private
        entry["pss_mb"] += m.pss / MB
        entry["rss_mb"] += m.rss / MB
        maps.append((m.pss / MB, private, m.path or "[anon]"))
    maps.sort(reverse=True)
    return {"by_kind": {k: {f: round(v, 1) for f, v in e.items()} for k, e in sorted(by.items())},
            "top": [{"path": p, "pss_mb": round(s, 1), "private_mb": round(u, 1)} for s, u, p in maps[:top]]}


def snapshot(role: str = "", kind: str = "", top: int = 15) -> dict[str, Any]:
    """This process's memory now (see the module docstring)."""
    import psutil

    info = psutil.Process().memory_full_info()
    out: dict[str, Any] = {
        "role_id": role, "kind": kind, "pid": os.getpid(), "time": time.time(),
        "rss_mb": round(info.rss / MB, 1), "uss_mb": round(info.uss / MB, 1), "pss_mb": round(info.pss / MB, 1),
        "mappings": mapping_breakdown(os.getpid()),
        "modules": len(sys.modules),
        "heavy_modules": [m for m in HEAVY_MODULES if m in sys.modules],
        "threads": threading.active_count(),
    }
    if "pyarrow" in sys.modules:
        pa = sys.modules["pyarrow"]
        out["arrow_pool_mb"] = round(pa.total_allocated_bytes() / MB, 1)
        out["arrow_pool_backend"] = pa.default_memory_pool().backend_name
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        stats = snap.statistics("lineno")
        out["tracemalloc_mb"] = round(sum(s.size for s in stats) / MB, 1)
        out["tracemalloc_top"] = [{"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                                   "mb": round(s.size / MB, 2), "blocks": s.count} for s in stats[:top]]
        by_file: dict[str, int] = {}
        for s in snap.statistics("filename"):
            by_file[s.traceback[0].filename] = s.size
        out["tracemalloc_by_file"] = [{"file": f, "mb": round(n / MB, 2)}
                                      for f, n in sorted(by_file.items(), key=lambda x: -x[1])[:top]]
    return out


class _Dumper:
    def __init__(self, directory: Path, role: str, kind: str, interval_s: float) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in role)  # role ids hold "/"
        self.path = directory / f"{safe}-{os.getpid()}.json"
        self.role, self.kind, self.interval_s = role, kind, interval_s
        self.failed = False
        self.lock = threading.Lock()

    def dump(self, final: bool = False) -> None:
        try:
            with self.lock:
                data = {**snapshot(self.role, self.kind), "final": final}
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.path)
        except Exception as e:  # a probe must never take the role down
            if not self.failed:
                log.warning("memory dump to %s failed: %s", self.path, e)
            self.failed = True

    def loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.dump()


def start_from_env(role: str, kind: str) -> bool:
    """Start dumping if ``FABRICD_ROLE_MEMORY_DUMP`` names a directory; returns whether it did."""
    directory = os.environ.get(DUMP_ENV, "")
    if not directory:
        return False
    frames = int(os.environ.get(TRACEMALLOC_ENV, "0") or 0)
    if frames > 0:
        tracemalloc.start(frames)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    dumper = _Dumper(path, role, kind, float(os.environ.get(INTERVAL_ENV, "5") or 5))
    threading.Thread(target=dumper.loop, name="memory-probe", daemon=True).start()
    atexit.register(dumper.dump, True)
    log.info("memory probe: dumping to %s every %.1fs (tracemalloc %s)", dumper.path, dumper.interval_s,
             f"{frames} frames" if frames else "off")
    return True
