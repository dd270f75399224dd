"""The bounded fuzz run of CI: a live 3-daemon fabric takes ~2,000 malformed messages on each
socket kind (control, peer, source loader, constructor, trainer stream) while a trainer checks
its batches against the expectation. ``scripts/fuzz.py --messages 100000`` is the long run."""

from __future__ import annotations

import pytest

from fabricd.fuzzrun import SOCKET_KINDS, FuzzRun

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_fuzzing_every_socket_kind_crashes_nothing_and_delivery_stays_exact(tmp_path):
    run = FuzzRun(tmp_path, seed=11)
    try:
        run.start()
        run.fuzz(2000)
        summary = run.finish()
    finally:
        run.close()
    assert summary["per_socket"] == dict.fromkeys(SOCKET_KINDS, 2000)
    assert summary["crashes"] == 0 and summary["role_restarts"] == 0, summary
    assert summary["delivery_exact"], summary
    assert summary["steps_checked"] > 0
    # a wedged loop would leave a Ping unanswered for 30 s; anything near that is a wedge
    assert summary["max_handler_ms"] < 10_000, summary
    assert not run.cluster.leftovers, f"processes outlived their daemons: {run.cluster.leftovers}"
