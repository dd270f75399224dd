"""How many threads planning may use: ``FABRICD_PLAN_THREADS``, else a few within this process's cores.

A job's plan worker (``fabricd.planner.worker``) plans that many steps at once, and a planner
draws a composition window's steps on that many threads (``Planner._compose``). Plans are the
same whatever the count: it only decides how fast they come.
"""

from __future__ import annotations

import os

__all__ = ["MAX_THREADS", "DEFAULT_MAX_THREADS", "plan_threads"]

MAX_THREADS = 64
#: threads per job by default: a few, within the cores this process may use
DEFAULT_MAX_THREADS = 4


def plan_threads(environ: "os._Environ[str] | dict[str, str] | None" = None) -> int:
    """The planning threads a job's worker runs: ``FABRICD_PLAN_THREADS`` when set (1 to
    MAX_THREADS), else up to DEFAULT_MAX_THREADS, one per core this process may use. Raises
    ``ValueError`` for a value that is not such a number."""
    env = os.environ if environ is None else environ
    raw = env.get("FABRICD_PLAN_THREADS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(f"FABRICD_PLAN_THREADS={raw!r}: expected an integer from 1 to {MAX_THREADS}")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(DEFAULT_MAX_THREADS, cores))
