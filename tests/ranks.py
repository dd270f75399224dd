"""Run one body per DP rank on threads, as a job's trainers would, and fail the test with any
exception a rank raised (a thread's exception would otherwise vanish)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_ranks(dp: int, body: Callable[[int], None], *, join_s: float = 150.0) -> None:
    """``body(rank)`` for every rank of ``dp`` at once; raises AssertionError listing the ranks'
    exceptions, or naming the ranks still running after ``join_s``."""
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            body(r)
        except Exception as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(dp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    assert not errors and not stuck, f"rank errors: {errors!r}; ranks still running: {stuck}"
