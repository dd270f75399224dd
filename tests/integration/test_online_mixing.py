"""Online mixing through a real daemon: trainers report a loss that stays high on one source; the
leader's ODM policy raises that source's weight within a bounded number of steps, every change is
a ``plan_changed`` record of origin ``online:odm`` (with the policy's state), and what the trainers
received equals what ``fabricctl expect --log`` replays from the spec and the log."""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import pytest

from ..ranks import receive_ranks
from .test_minimal_spec import books_and_code_spec, fabricctl, write_books

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SPEC = books_and_code_spec("odm", 9, weights="books = 1, code = 1",
                           mixture='online = "odm"\nonline_every_steps = 2\nonline_alpha = 0.5\n')

END = 70         # steps the trainers consume
WITHIN = 45      # the hard source's weight must be up by a change at or before this step
LOSS = {"books": 1.0, "code": 6.0}  # what the "model" finds hard: code


def train(address: str, dp: int) -> dict:
    """Every rank consumes [0, END), reporting per-source losses for each batch like a training
    loop would (from ``source_ids``), at a pace a real step would have."""
    reports: dict = {}

    def report(loader, b) -> None:
        names = loader.source_names
        counts = np.bincount(b["source_ids"], minlength=len(names))
        loader.report({names[i]: (LOSS[names[i]] * int(counts[i]), int(counts[i])) for i in np.flatnonzero(counts)})
        reports[b.dp_rank] = loader.stats["loss_reports"]
        time.sleep(0.15)

    got = receive_ranks(address, "odm", dp, 0, END, on_batch=report, join_s=180)
    assert all(reports.get(r, 0) > 0 for r in range(dp)), reports
    return got


def test_a_source_whose_loss_stays_high_gains_weight_and_the_replay_is_exact(tmp_path, local_daemon):
    write_books(tmp_path / "data" / "books", n=400)
    write_books(tmp_path / "data" / "code", n=400)
    job_file = tmp_path / "odm.toml"
    job_file.write_text(SPEC)
    r = fabricctl(local_daemon.address, "submit", "--wait", "--wait-timeout", "90", str(job_file))
    assert r.returncode == 0, r.stderr + local_daemon.tail()

    got = train(local_daemon.address, 2)
    status = local_daemon.status()["jobs"]["odm"]
    online = [c for c in status["plan_changes"] if c["origin"] == "online:odm"]
    assert len(online) >= 3, (status["plan_changes"], local_daemon.tail())
    local_daemon.stop()

    # the changes, as logged: weights of code rise; each carries the policy's state
    from fabricd.expect import newest_log_state

    state = newest_log_state([local_daemon.workdir / "state" / "log"])
    changes = [e.change for e in state.plan_changes["odm"]]
    assert [c.origin for c in changes] == ["online:odm"] * len(changes)
    assert all(c.policy is not None and c.policy.rounds == i + 1 for i, c in enumerate(changes))
    code_weights = [c.points[0].weights["code"] / sum(c.points[0].weights.values()) for c in changes]
    assert code_weights[0] == pytest.approx(0.5)  # round 1: all exploration, the spec's weights
    assert max(code_weights) > 0.6, code_weights
    raised = [c.at_step for c, w in zip(changes, code_weights) if w > 0.55]
    assert raised and raised[0] <= WITHIN, (raised, code_weights)

    # delivery == the replay from the spec and the log's changes, batch by batch
    from click.testing import CliRunner

    from fabricd.cli import fabricctl_main

    result = CliRunner().invoke(fabricctl_main, ["expect", str(job_file), "--steps", f"0:{END}",
                                                 "--log", str(local_daemon.workdir / "state" / "log")])
    assert result.exit_code == 0, result.output
    want = {(b["step"], b["dp_rank"], b["micro_batch"]): b["checksum"] for b in map(json.loads, result.output.splitlines())}
    assert sorted(got) == sorted(want), "lost, repeated or extra batches"
    assert all(got[k][0] == want[k] for k in want), "delivered content differs from fabricctl expect --log"

    # and the trainers really got more code after the raise than before it
    per = collections.defaultdict(collections.Counter)
    for (step, _r, _m), (_c, units) in got.items():
        per[step >= raised[0]].update(source for source, _, _ in units)
    before, after = (per[k][1] / max(1, sum(per[k].values())) for k in (False, True))
    assert before == pytest.approx(0.5, abs=0.05) and after > before + 0.05, (before, after)
