"""The skip rule: a step drops exactly the units the log records for it, whatever loads."""

from __future__ import annotations

import numpy as np
import pytest

from fabricd.assemble import RECORDED_SKIP, apply_skip_records
from fabricd.config import load_job_spec
from fabricd.expect import BatchOracle
from fabricd.sources.transform import SampleData

from ..conftest import write_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_recorded_units_drop_whatever_they_loaded_and_unrecorded_failures_are_named():
    a, c = object(), object()  # loaded units (SampleData on the data path)
    units = [a, "bad utf-8", c, "503"]
    out, unrecorded = apply_skip_records(units, source_ids=np.array([0, 0, 1, 1]), sample_ids=np.array([5, 6, 7, 8]),
                                         pieces=np.array([0, 0, 1, 0]), recorded={(0, 5, 0), (1, 8, 0), (1, 7, 0)})
    assert out == [RECORDED_SKIP, "bad utf-8", c, RECORDED_SKIP]  # (1, 7, 0) is not this unit's piece
    assert unrecorded == [1]
    with pytest.raises(ValueError, match="3 units for 4 plan rows"):
        apply_skip_records(units[:3], source_ids=np.zeros(4), sample_ids=np.zeros(4), pieces=np.zeros(4), recorded=())


def test_expectation_follows_the_log_skip_records_per_step(tmp_path, tiny_corpus):
    spec = load_job_spec(write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2))
    plain = BatchOracle(spec)
    plan = plain.planner.plan(1, 2)
    row = next(i for i in range(len(plan.rank))
               if isinstance(plain.loaders[int(plan.source[i])].load(plan.sample_id[i:i + 1], plan.piece[i:i + 1])[0],
                             SampleData))
    unit = (spec.sources[int(plan.source[row])].name, int(plan.sample_id[row]), int(plan.piece[row]))
    skipped = BatchOracle(spec, skips=[(*unit, 1), ("no-such-source", 1, 0, 1)])
    for step in (0, 1, 2):
        a = {b.key(): b for b in plain.step(step)}
        b = {b.key(): b for b in skipped.step(step)}
        changed = {k for k in a if a[k].checksum != b[k].checksum}
        if step == 1:  # only the micro-batch that held the unit changes, by exactly one skipped unit
            (key,) = changed
            assert key[1] == int(plan.rank[row]) and b[key].skipped == a[key].skipped + 1
        else:
            assert not changed
    assert skipped.unrecorded == plain.unrecorded  # corrupt units (if any): dropped, counted, not recorded here
