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


def receive_ranks(address: str, job: str, dp: int, start: int, stop: int, *,
                  on_batch: Callable[[object, object], None] | None = None, join_s: float = 150.0) -> dict:
    """Every rank of ``dp`` consumes steps ``[start, stop)`` of ``job`` through a real Loader
    (one thread per rank): ``(step, dp_rank, micro) → (checksum, [(source, sample_id, piece)])``.
    A batch delivered twice fails the rank. ``on_batch(loader, batch)`` runs after each batch (a
    training loop's loss report, its pace)."""
    from fabric_client import Loader

    got: dict = {}

    def rank(r: int) -> None:
        with Loader(address, job=job, dp_rank=r, dp_size=dp, max_steps=stop, deadline_s=90.0) as loader:
            if start:
                loader.load_state_dict({"job": job, "next_step": start, "next_micro": 0})
            for b in loader:
                key = (b.step, b.dp_rank, b.micro_batch)
                assert key not in got, f"batch {key} delivered twice"
                got[key] = (b.checksum, list(zip(b["source_ids"].tolist(), b["sample_ids"].tolist(),
                                                 b["pieces"].tolist())))
                if on_batch is not None:
                    on_batch(loader, b)

    run_ranks(dp, rank, join_s=join_s)
    return got
