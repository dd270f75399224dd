"""A constructor holds a rank whose unit has a skip record pending (``PlanReply.pending``).

Another constructor reported the unit and its record is not committed yet: if this one delivered
the unit (it loaded fine here), and the record were then committed, the trainer would hold a
batch the log says never existed. So the rank waits until the record is committed (the unit is
dropped) or gone (truncated, refused: the unit is delivered), and in both cases its batches equal
the offline expectation given the committed records.

The constructor runs in-process with real sockets (nothing connects to them); plan replies and
loaded units are fed to it directly.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from fabric_client import protocol
from fabricd.config import load_job_spec
from fabricd.expect import BatchOracle
from fabricd.job import PLAN_COLUMNS
from fabricd.roles.base import RoleArgs
from fabricd.roles.constructor import Constructor
from fabricd.sources.transform import SampleData

from ..conftest import write_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

STEP = 1


@pytest.fixture
def setup(tmp_path: Path, tiny_corpus: Path):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, ranks_per_constructor=2)
    spec = load_job_spec(job_file)
    oracle = BatchOracle(spec)
    plan = oracle.planner.plan(STEP, 2)
    units = []
    for i in range(len(plan.rank)):
        src = int(plan.source[i])
        (unit,) = oracle.loaders[src].load(plan.sample_id[i:i + 1], plan.piece[i:i + 1])
        units.append(unit)
    # a healthy unit of rank 0 that appears once in the step
    target = next(i for i in range(len(plan.rank)) if int(plan.rank[i]) == 0 and isinstance(units[i], SampleData)
                  and int(np.count_nonzero((plan.source == plan.source[i]) & (plan.sample_id == plan.sample_id[i]))) == 1)
    ctx = zmq.Context()
    args = RoleArgs(kind="constructor", role_id="t/constructor/0", daemon="tcp://127.0.0.1:9", job=spec.name,
                    spec_path=str(job_file), spec_origin=str(job_file), bind_host="127.0.0.1", heartbeat_s=1.0,
                    max_message_bytes=64 << 20, extra={"ranks": [0, 1], "fingerprint": ""})
    con = Constructor(args, spec, ctx)
    try:
        yield SimpleNamespace(spec=spec, plan=plan, units=units, target=target, con=con, job_file=job_file)
    finally:
        con.close()
        ctx.term()


def _reply(s: SimpleNamespace, *, skips=(), pending=()) -> tuple[protocol.PlanReply, list]:
    part = s.plan.for_ranks([0, 1])
    frames = [SimpleNamespace(buffer=memoryview(np.ascontiguousarray(getattr(part, n), d))) for n, d in PLAN_COLUMNS]
    msg = protocol.PlanReply(job=s.spec.name, step=STEP, dp_size=2, rows=len(part.rank),
                             columns=[n for n, _ in PLAN_COLUMNS], dtypes=[d for _, d in PLAN_COLUMNS],
                             num_micro=[int(s.plan.num_micro[r]) for r in (0, 1)],
                             skips=list(skips), pending=list(pending))
    return msg, frames


def _unit_key(s: SimpleNamespace) -> tuple[int, int, int]:
    i = s.target
    return (int(s.plan.source[i]), int(s.plan.sample_id[i]), int(s.plan.piece[i]))


def _feed(s: SimpleNamespace, **kw) -> None:
    s.con.plan_requested[STEP] = 0.0
    s.con._on_plan(*_reply(s, **kw))


def _load_everything(s: SimpleNamespace) -> None:
    build = s.con.builds[STEP]
    rows = [i for i in range(len(build.results)) if build.results[i] is None]
    for q in s.con.queue.values():
        q.clear()  # no source loader here: the units are handed over directly
    s.con._resolve(build, np.asarray(rows, np.int64), [s.units[i] for i in rows])


def _checksums(s: SimpleNamespace, rank: int) -> list[str]:
    build = s.con.builds[STEP]
    return [build.batches[(rank, m)].header.checksum for m in range(int(s.plan.num_micro[rank]))]


def _expected(s: SimpleNamespace, rank: int, skips=()) -> list[str]:
    name = s.spec.sources[_unit_key(s)[0]].name
    oracle = BatchOracle(s.spec, skips=[(name, sid, piece, STEP) for _, sid, piece in skips])
    return [b.checksum for b in oracle.step(STEP) if b.dp_rank == rank]


def test_a_rank_with_a_pending_record_waits_and_delivers_the_unit_once_the_record_is_gone(setup):
    s = setup
    key = _unit_key(s)
    _feed(s, pending=[key])
    _load_everything(s)
    build = s.con.builds[STEP]
    assert 0 in build.waiting and 0 not in build.assembled, "a rank with a pending record must not be packed"
    assert 1 in build.assembled, "the other rank has nothing pending"
    _feed(s, pending=[key])  # still pending: still held
    assert 0 not in build.assembled
    _feed(s)  # the record was truncated or refused: nothing skips the unit
    assert 0 in build.assembled and not build.waiting
    assert _checksums(s, 0) == _expected(s, 0)
    assert _checksums(s, 1) == _expected(s, 1)


def test_a_rank_with_a_pending_record_drops_the_unit_once_it_is_committed(setup):
    s = setup
    key = _unit_key(s)
    _feed(s, pending=[key])
    _load_everything(s)
    assert 0 not in s.con.builds[STEP].assembled
    _feed(s, skips=[key])  # committed
    build = s.con.builds[STEP]
    assert 0 in build.assembled and not build.waiting
    assert _checksums(s, 0) == _expected(s, 0, skips=[key]) != _expected(s, 0)
    assert _checksums(s, 1) == _expected(s, 1)


def test_without_pending_records_nothing_waits(setup):
    s = setup
    _feed(s)
    _load_everything(s)
    build = s.con.builds[STEP]
    assert build.assembled == {0, 1} and not build.waiting
    assert _checksums(s, 0) == _expected(s, 0)


def _fail_target_twice(s: SimpleNamespace) -> None:
    """Every unit loads except the target, which fails on the load and on its retry."""
    _load_everything_but_target(s)
    build = s.con.builds[STEP]
    for _ in range(2):
        for q in s.con.queue.values():
            q.clear()
        s.con._resolve(build, np.asarray([s.target], np.int64), ["503 from the object store"])


def _load_everything_but_target(s: SimpleNamespace) -> None:
    build = s.con.builds[STEP]
    rows = [i for i in range(len(build.results)) if build.results[i] is None and i != s.target]
    for q in s.con.queue.values():
        q.clear()
    s.con._resolve(build, np.asarray(rows, np.int64), [s.units[i] for i in rows])


def _subscribe(s: SimpleNamespace, step: int) -> None:
    s.con.delivery.handle(b"trainer-0", protocol.Subscribe(job=s.spec.name, fingerprint="", dp_rank=0, mp_rank=0,
                                                           next_step=step, next_micro=0, credits=0))


def test_a_failed_unit_of_a_batch_a_trainer_needs_is_reported_and_its_rank_held(setup):
    s = setup
    _subscribe(s, STEP)
    _feed(s)
    _fail_target_twice(s)
    build = s.con.builds[STEP]
    assert (STEP, _unit_key(s)) in s.con.reported and 0 in build.waiting and 0 not in build.assembled


def test_a_failed_unit_no_trainer_here_needs_is_held_unreported_until_one_does(setup):
    """The trainer moved on to another constructor, which may deliver the unit: no report."""
    s = setup
    _feed(s)
    _fail_target_twice(s)
    build = s.con.builds[STEP]
    assert not s.con.reported and 0 in build.waiting and 0 not in build.assembled
    _subscribe(s, STEP)  # a trainer of rank 0 (back) here at the step: now the unit is reported
    _feed(s)
    assert (STEP, _unit_key(s)) in s.con.reported and 0 in build.waiting


def test_a_failed_unit_of_a_delivered_batch_is_loaded_again_not_reported(setup):
    """A trainer of rank 0 is past the step (another constructor delivered it before this one
    took over): reporting the unit now would make the log contradict what the trainer holds."""
    s = setup
    _subscribe(s, STEP + 1)
    _feed(s)
    _fail_target_twice(s)
    build = s.con.builds[STEP]
    assert not s.con.reported and s.con.stats["delivered_unit_reloads"] == 1
    assert 0 not in build.assembled and s.target in build.reload
    s.con._chase_skips(build.reload[s.target][0] - 0.01)
    assert not any(s.con.queue.values()), "not before its backoff"
    s.con._chase_skips(build.reload[s.target][0])
    queued = [job for q in s.con.queue.values() for job, step in q if step == STEP]
    assert [r.tolist() for r in (j.rows for j in queued)] == [[s.target]]
    s.con._resolve(build, np.asarray([s.target], np.int64), [s.units[s.target]])  # it loads this time
    assert 0 in build.assembled and _checksums(s, 0) == _expected(s, 0)


def test_a_report_is_re_sent_only_while_a_trainer_here_needs_its_batch(setup):
    s = setup
    _subscribe(s, STEP)
    _feed(s)
    sent = []
    s.con._send_skip = lambda step, key, reason, rank: sent.append((step, key, rank))
    _fail_target_twice(s)
    assert sent == [(STEP, _unit_key(s), 0)]
    due = s.con.reported[(STEP, _unit_key(s))].due
    s.con._chase_skips(due)
    assert len(sent) == 2  # re-sent: the trainer still waits for the batch
    s.con.delivery.handle(b"trainer-0", protocol.Unsubscribe(job=s.spec.name, dp_rank=0, mp_rank=0))
    s.con._chase_skips(due + 3600)
    assert len(sent) == 2, "the trainer left (to a constructor that may deliver the unit): no more re-sends"
