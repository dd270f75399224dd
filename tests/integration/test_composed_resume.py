"""Step composition through a real daemon: a job with a global batch in tokens and
``compose = "outliers"`` delivers exactly what ``fabricd.expect`` computes, and when the job comes
back at another DP size mid-run, the leader records the change at a step past the trainers'
frontier, so the resumed trainers lose and repeat nothing."""

from __future__ import annotations

import collections
import time

import pytest

from fabricd.config import load_job_spec
from fabricd.expect import expected_batches
from fabricd.job import build_planner, open_sources

from ..ranks import receive_ranks
from .test_minimal_spec import fabricctl, write_books

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SPEC = """
[job]
name = "composed"
seed = 11

[topology]
dp_size = {dp}

[batch]
tokens_per_step = 16000
micro_batch_tokens = 4096
compose = "outliers"
max_delay_steps = 3
prefetch = 2

[cost]
attention = 1.0
linear = 64.0

[[buckets]]
name = "default"
max_seq_len = 4096
long_samples = "split"

[[sources]]
name = "books"
path = "data/books"
"""

FIRST, END = 5, 14  # steps [0, 5) at dp 4, then [5, 14) at dp 6


def test_composed_job_resumed_at_another_dp_size(tmp_path, local_daemon):
    write_books(tmp_path / "data" / "books", n=160)
    job2, job3 = tmp_path / "job2.toml", tmp_path / "job3.toml"
    job2.write_text(SPEC.format(dp=4))
    job3.write_text(SPEC.format(dp=6))
    spec2, spec3 = load_job_spec(job2), load_job_spec(job3)

    r = fabricctl(local_daemon.address, "submit", "--wait", "--wait-timeout", "90", str(job2))
    assert r.returncode == 0, r.stderr + local_daemon.tail()
    first = receive_ranks(local_daemon.address, "composed", 4, 0, FIRST)
    time.sleep(1.5)  # let the leader record the trainers' progress

    r = fabricctl(local_daemon.address, "submit", "--wait", "--wait-timeout", "90", str(job3))
    assert r.returncode == 0, r.stderr + local_daemon.tail()
    comp = local_daemon.status()["jobs"]["composed"]["composition"]
    history = tuple(tuple(x) for x in comp["dp_history"])
    assert history[0] == (0, 4) and history[-1][1] == 6 and len(history) == 2, history
    change = history[-1][0]
    assert change % 4 == 0 and change >= FIRST  # a window boundary past the steps the trainers reached
    shown = fabricctl(local_daemon.address, "status")
    assert "composition outliers: max delay 3 steps" in shown.stdout and f"dp 6 from step {change}" in shown.stdout
    second = receive_ranks(local_daemon.address, "composed", 6, FIRST, END)
    # the windows between the resume and the change are composed for 4 ranks, and that differs
    # from composing them for 6 (the test would not notice a planner that ignored the history)
    p2 = build_planner(spec3, open_sources(spec3), history)
    p3 = build_planner(spec3, open_sources(spec3), ((0, 6),))
    assert any(sorted(p2.composed_rows(s, 6).tolist()) != sorted(p3.composed_rows(s, 6).tolist())
               for s in range(FIRST, change))

    want = {b.key(): b for b in expected_batches(spec2, range(FIRST), dp_history=((0, 4),))}
    want.update({b.key(): b for b in expected_batches(spec3, range(FIRST, END), dp_history=history)})
    got = {**first, **second}
    assert sorted(got) == sorted(want), "lost, repeated or extra batches"
    assert all(got[k][0] == want[k].checksum for k in want), "batch content differs from fabricctl expect"
    # a window composed for 4 ranks has steps of 4 units: at dp 6 two ranks get an empty batch
    assert any(not us for k, (_, us) in second.items()), "no step with fewer units than ranks was exercised"

    # nothing lost, nothing repeated: the units of whole windows equal those the sequence drew
    units = collections.Counter(u for k, (_, us) in got.items() for u in us if k[0] < 12)
    planner = build_planner(spec2, open_sources(spec2))
    drawn = collections.Counter()
    for s in range(12):
        src, unit = planner.sequence.step_units(s)
        row = planner._offsets[src] + unit
        drawn.update(zip([0] * row.size, planner._sample_id[row].tolist(), planner._piece[row].tolist()))
    assert units == drawn
