"""A unit that fails to load once: its skip is recorded in the log before its step is delivered,
and what trainers receive equals the offline expectation computed with the log's skip records.

A real daemon (one source-loader worker per source, so a unit's loads all reach the one process
the failpoint ``loader.transient_error`` is armed in), real Loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fabricd.config import load_job_spec
from fabricd.expect import BatchOracle, skips_from_logs
from fabricd.failpoints import ROLE_ENV
from fabricd.localnode import LocalDaemon
from fabricd.sources.transform import SampleData

from ..conftest import write_job
from .test_data_path import assert_exact, run_ranks, submit

pytestmark = [pytest.mark.integration]

STEPS = 6
FAIL_STEP = 2


def pick_unit(job_file: Path) -> tuple[int, str, int]:
    """A healthy single-piece unit planned at FAIL_STEP and at no other step of the run:
    (dp rank that gets it, source name, sample id)."""
    spec = load_job_spec(job_file)
    oracle = BatchOracle(spec)
    plans = {s: oracle.planner.plan(s, spec.topology.dp_size) for s in range(STEPS)}
    elsewhere = {(int(src), int(sid)) for s, p in plans.items() if s != FAIL_STEP
                 for src, sid in zip(p.source, p.sample_id)}
    plan = plans[FAIL_STEP]
    for i in range(len(plan.rank)):
        src, sid = int(plan.source[i]), int(plan.sample_id[i])
        same = (plan.source == src) & (plan.sample_id == sid)
        if (src, sid) in elsewhere or int(np.count_nonzero(same)) != 1:
            continue
        (unit,) = oracle.loaders[src].load(np.array([sid]), np.array([int(plan.piece[i])]))
        if isinstance(unit, SampleData):
            return int(plan.rank[i]), spec.sources[src].name, sid
    raise AssertionError("no suitable unit in the tiny corpus")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("failures", [2, 1], ids=["fails-twice-recorded", "fails-once-retry-delivers"])
def test_transient_read_error_is_recorded_and_delivery_matches_the_log(tmp_path, tiny_corpus, failures):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2)
    rank, source, sample_id = pick_unit(job_file)
    daemon = LocalDaemon(tmp_path / "node", node_id="test",
                         extra_env={ROLE_ENV: f"loader.transient_error=fail({source}:{sample_id}*{failures})"})
    daemon.start()
    try:
        submit(daemon, job_file)
        got = run_ranks(daemon.address, "t", 2, 1, STEPS)
    finally:
        daemon.stop()
    skips = skips_from_logs([daemon.workdir / "state" / "log"], "t")
    spec = load_job_spec(job_file)
    with_log = BatchOracle(spec, skips=skips)
    want = {b.key(): b for s in range(STEPS) for b in with_log.step(s)}
    assert with_log.unrecorded == 0, "every unit that failed offline is recorded in the log"
    for (d, _m), records in got.items():
        assert_exact(records, want, d)
    fired = daemon.log_path.read_text(errors="replace").count(f"{source}:{sample_id} fails (")
    assert fired == failures, f"the failpoint fired {fired} times, not {failures}"
    recorded = (source, sample_id, 0, FAIL_STEP) in skips
    delivered = {u for (k, _c, units, _m) in got[(rank, 0)] if k[0] == FAIL_STEP for u in units}
    src_index = [s.name for s in spec.sources].index(source)
    if failures == 2:  # the retry failed too: recorded in the log first, then dropped from its step
        assert recorded and (src_index, sample_id, 0) not in delivered
        plain = {b.key(): b.checksum for b in BatchOracle(spec, skips=skips - {(source, sample_id, 0, FAIL_STEP)})
                 .step(FAIL_STEP)}
        assert any(plain[k] != want[k].checksum for k in plain if k[1] == rank), "the skip changed nothing"
        from click.testing import CliRunner

        from fabricd.cli import fabricctl_main

        result = CliRunner().invoke(fabricctl_main, ["expect", str(job_file), "--steps", f"{FAIL_STEP}:{FAIL_STEP + 1}",
                                                     "--log", str(daemon.workdir / "state" / "log")])
        assert result.exit_code == 0, result.output
        cli = {(b["step"], b["dp_rank"], b["micro_batch"]): b["checksum"]
               for b in map(json.loads, result.output.splitlines())}
        assert cli == {k: b.checksum for k, b in want.items() if k[0] == FAIL_STEP}, "fabricctl expect ignores the log"
    else:  # the retry loaded it before anything was reported: delivered, nothing recorded
        assert not recorded and (src_index, sample_id, 0) in delivered
