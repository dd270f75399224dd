"""Plans off the control loop: PlanWorker (look-ahead, bounds, deadline, errors, stop) and the
job's plan path (NOT_READY at once, BAD_REQUEST past MAX_STEP, the same plan as the planner)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fabric_client import protocol
from fabric_client.limits import MAX_STEP

from fabricd.config import parse_job_spec
from fabricd.corpus import job_toml, make_dataset
from fabricd.job import JobRuntime, NoRoles, build_planner, open_sources
from fabricd.planner.plan import Planner, StepPlan
from fabricd.planner.threads import plan_threads
from fabricd.planner.worker import PlanWorker

pytestmark = pytest.mark.unit

WAIT_S = 20.0  # an upper bound on waiting for a background thread, never asserted as a speed


def _until(cond, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


class FakePlanner:
    """Records which steps were planned on which thread; a step in ``hold`` waits for its event."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []
        self.hold: dict[int, threading.Event] = {}
        self.fail: set[int] = set()

    def plan(self, step: int, dp_size: int) -> tuple[int, int]:
        self.calls.append((step, dp_size, threading.current_thread().name))
        if step in self.hold:
            assert self.hold[step].wait(WAIT_S)
        if step in self.fail:
            raise ValueError(f"cannot plan step {step}")
        return (step, dp_size)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _worker(planner: FakePlanner, **kw) -> PlanWorker:
    args = dict(name="j", cache_steps=8, ahead_steps=3, queue_steps=4, deadline_s=30.0)
    args.update(kw)
    return PlanWorker(planner, 4, **args)  # type: ignore[arg-type]


def test_get_answers_at_once_then_plans_ahead_on_the_worker_thread() -> None:
    p = FakePlanner()
    w = _worker(p)
    try:
        assert w.get(10) is None  # not computed yet: the caller never waits
        _until(lambda: w.get(10) is not None, "step 10")
        assert w.get(10) == (10, 4)
        _until(lambda: len(p.calls) == 4, "look-ahead")
        assert sorted(c[0] for c in p.calls) == [10, 11, 12, 13]
        assert all(c[2] == "plan-j" for c in p.calls)
        assert w.counters["plans_computed"] == 4
        assert w.status()["cached"] == 4 and w.status()["alive"]
    finally:
        w.close()
    assert w.join(WAIT_S)


def test_queue_and_cache_are_bounded() -> None:
    p = FakePlanner()
    p.hold[0] = threading.Event()
    w = _worker(p, ahead_steps=0, queue_steps=3, cache_steps=2)
    try:
        w.get(0)
        _until(lambda: w.status()["running"] is not None, "step 0 to start")
        for s in (9, 5, 7, 8):  # queue holds 3: the farthest (9) is dropped
            w.get(s)
        assert w.status()["queued"] == 3
        p.hold[0].set()
        _until(lambda: len(p.calls) == 4, "queued steps")
        assert [c[0] for c in p.calls] == [0, 5, 7, 8]  # lowest first
        assert w.status()["cached"] == 2  # least recently used went first
        assert w.get(8) == (8, 4) and w.get(7) == (7, 4)
    finally:
        w.close()


class SizedPlanner:
    """Plans of ``rows`` rows each (real StepPlans: the cache weighs their arrays)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def plan(self, step: int, dp_size: int) -> StepPlan:
        z32, z64 = np.zeros(self.rows, np.int32), np.zeros(self.rows, np.int64)
        return StepPlan(step=step, dp_size=dp_size, rank=z32, micro=z32, source=z32, sample_id=z64, piece=z32,
                        tokens=z32, cost=np.zeros(self.rows), num_micro=np.ones(dp_size, np.int32))


def test_the_cache_keeps_no_more_bytes_than_its_budget() -> None:
    """Plans of 100 rows weigh 100 × 36 bytes + the ranks' counts: a budget of 2.5 plans keeps
    the two most recently used; a plan over the whole budget is still kept alone (the newest)."""
    one = SizedPlanner(100).plan(0, 4).nbytes
    assert one == 100 * (4 * 5 + 8 * 2) + 4 * 4
    w = PlanWorker(SizedPlanner(100), 4, name="j", cache_steps=8, ahead_steps=0, queue_steps=8, deadline_s=30.0,
                   cache_bytes=int(2.5 * one))
    try:
        for s in range(5):
            w.get(s)
            _until(lambda: w.get(s) is not None, f"step {s}")
        assert w.status()["cached"] == 2 and w.status()["cached_bytes"] == 2 * one
        assert w.get(4) is not None and w.get(3) is not None  # the two newest stayed
        assert w.get(2) is None  # it left; asked again, it is planned again
        _until(lambda: w.get(2) is not None, "step 2 again")
        assert w.status()["cached"] == 2 and w.counters["plans_computed"] == 6
    finally:
        w.close()
    w = PlanWorker(SizedPlanner(100), 4, name="j", cache_steps=8, ahead_steps=0, queue_steps=8, deadline_s=30.0,
                   cache_bytes=one // 2)
    try:
        for s in range(3):
            w.get(s)
            _until(lambda: w.get(s) is not None, f"step {s}")
            assert w.status()["cached"] == 1 and w.status()["cached_bytes"] == one
    finally:
        w.close()


def test_a_failing_plan_is_kept_for_its_step_and_shown_in_status() -> None:
    p = FakePlanner()
    p.fail.add(3)
    w = _worker(p, ahead_steps=0)
    try:
        w.get(3)
        _until(lambda: w.failure(3) is not None, "the failure")
        assert "ValueError: cannot plan step 3" in w.failure(3)
        assert w.get(3) is None and [c[0] for c in p.calls] == [3]  # not retried
        assert w.status()["error"] == w.failure(3) and w.counters["plan_errors"] == 1
        assert w.status()["alive"]
        w.get(4)
        _until(lambda: w.get(4) is not None, "a later step")  # the worker lives on
    finally:
        w.close()


def test_plan_past_deadline_is_counted_once_and_shown_while_it_runs() -> None:
    p = FakePlanner()
    p.hold[1] = threading.Event()
    clock = FakeClock()
    counters: dict = {}
    w = _worker(p, ahead_steps=0, deadline_s=30.0, clock=clock, counters=counters)
    try:
        w.get(1)
        _until(lambda: w.status()["running"] is not None, "step 1 to start")
        assert not w.status()["running"]["overdue"] and counters["plans_over_deadline"] == 0
        clock.now += 31.0
        st = w.status()
        assert st["running"] == {"step": 1, "running_s": 31.0, "overdue": True}
        assert counters["plans_over_deadline"] == 1 and st["last_overdue"]["finished"] is False
        w.status()
        w.get(2)
        assert counters["plans_over_deadline"] == 1  # counted once per plan
        p.hold[1].set()
        _until(lambda: w.get(1) is not None, "step 1")
        assert w.status()["last_overdue"] == {"step": 1, "seconds": 31.0, "finished": True}
        _until(lambda: w.get(2) is not None, "step 2")
        assert counters["plans_over_deadline"] == 1
    finally:
        w.close()


def test_close_stops_the_thread_after_the_plan_in_progress() -> None:
    p = FakePlanner()
    p.hold[0] = threading.Event()
    w = _worker(p)
    w.get(0)
    _until(lambda: w.status()["running"] is not None, "step 0 to start")
    w.close()
    assert not w.join(0.05)  # still inside the plan
    p.hold[0].set()
    assert w.join(WAIT_S)
    assert w.get(0) is None and [c[0] for c in p.calls] == [0]


def test_threads_plan_different_steps_at_once_and_never_one_step_twice() -> None:
    p = FakePlanner()
    for s in (0, 1, 2):
        p.hold[s] = threading.Event()
    w = _worker(p, ahead_steps=3, threads=3)
    try:
        assert w.get(0) is None
        _until(lambda: w.status()["running_steps"] == [0, 1, 2], "three steps at once")
        st = w.status()
        assert st["threads"] == 3 and st["alive"] and st["running"]["step"] == 0
        assert w.get(1) is None and w.get(2) is None  # running: not queued again (the look-ahead now ends at 5)
        assert st["queued"] == 0 and w.status()["queued"] == 0
        for s in (2, 1, 0):
            p.hold[s].set()
        _until(lambda: all(w.get(s) is not None for s in range(6)), "the look-ahead")
        time.sleep(0.1)  # anything planned twice would be by now
        assert sorted(c[0] for c in p.calls) == list(range(6))  # each once
        assert {c[2] for c in p.calls} <= {"plan-j", "plan-j-1", "plan-j-2"}
        assert len({c[2] for c in p.calls[:3]}) == 3
        assert [w.get(s) for s in range(6)] == [(s, 4) for s in range(6)]
        assert w.counters["plans_computed"] == 6 and w.status()["running_steps"] == []
    finally:
        w.close()
    assert w.join(WAIT_S)


def test_each_running_plan_past_its_deadline_is_counted_once() -> None:
    p = FakePlanner()
    p.hold[0], p.hold[1] = threading.Event(), threading.Event()
    clock = FakeClock()
    counters: dict = {}
    w = _worker(p, ahead_steps=1, deadline_s=30.0, clock=clock, counters=counters, threads=2)
    try:
        w.get(0)
        _until(lambda: w.status()["running_steps"] == [0, 1], "both steps to start")
        clock.now += 31.0
        assert w.status()["running"]["overdue"] and counters["plans_over_deadline"] == 2
        w.status()
        assert counters["plans_over_deadline"] == 2
        p.hold[1].set()
        _until(lambda: w.get(1) is not None, "step 1")
        assert w.status()["last_overdue"] == {"step": 1, "seconds": 31.0, "finished": True}
        p.hold[0].set()
        _until(lambda: w.get(0) is not None, "step 0")
        assert counters["plans_over_deadline"] == 2
    finally:
        w.close()


def test_threads_are_bounded_and_the_environment_chooses_them() -> None:
    with pytest.raises(ValueError, match="threads"):
        _worker(FakePlanner(), threads=0)
    assert plan_threads({"FABRICD_PLAN_THREADS": "3"}) == 3
    assert 1 <= plan_threads({}) <= 4
    for bad in ("0", "65", "two", "-1"):
        with pytest.raises(ValueError, match="FABRICD_PLAN_THREADS"):
            plan_threads({"FABRICD_PLAN_THREADS": bad})


def test_threaded_worker_gives_the_planners_plans_across_composition_windows(specs) -> None:
    # a composed job (windows of 4 steps): three threads plan steps of the same and of different
    # windows at once; every plan must equal the one planned alone, in order
    spec = specs["composed"]
    assert spec.batch.compose == "outliers"
    alone = build_planner(spec, specs["indexes"])
    want = {s: alone.plan(s, 2) for s in range(14)}
    w = PlanWorker(build_planner(spec, specs["indexes"]), 2, name="pj", cache_steps=32, ahead_steps=13,
                   queue_steps=32, deadline_s=30.0, threads=3)
    try:
        w.get(0)
        _until(lambda: all(w.get(s) is not None for s in range(14)), "14 steps")
        for s, plan in want.items():
            got = w.get(s)
            for name in ("rank", "micro", "source", "sample_id", "piece", "tokens", "num_micro"):
                assert np.array_equal(getattr(got, name), getattr(plan, name)), (s, name)
        assert w.status()["error"] is None
    finally:
        w.close()
    assert w.join(WAIT_S)


def test_segment_planners_wanted_by_several_threads_are_built_once(specs, monkeypatch: pytest.MonkeyPatch) -> None:
    import fabricd.job as job_module

    plans = job_module.SegmentPlans(specs["plain"], specs["indexes"])
    real = job_module._head_planner

    def slow(*args, **kw):
        time.sleep(0.2)  # long enough for every thread to want it while it is built
        return real(*args, **kw)

    monkeypatch.setattr(job_module, "_head_planner", slow)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(plans.planner())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert plans.counters["planners_built"] == 1


# --------------------------------------------------------------------------- the job's plan path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_dataset(out, 30, seed=3, progress=False)
    return out


def test_job_plans_off_the_caller_thread_and_refuses_bad_steps(corpus: Path, tmp_path: Path) -> None:
    spec = parse_job_spec(job_toml(corpus, name="pj", seed=4, dp_size=4, samples_per_step=16, prefetch=2),
                          tmp_path / "pj.toml")
    job = JobRuntime(spec, index_dir=tmp_path, directory=NoRoles())
    try:
        _until(lambda: job.state != "indexing", "indexing")
        assert job.state == "ready", job.error
        planned_on: list[str] = []
        real = job.planner.plan

        def spy(step: int, dp: int):
            planned_on.append(threading.current_thread().name)
            return real(step, dp)

        job.planner.plan = spy  # type: ignore[method-assign]
        req = protocol.PlanRequest(job="pj", step=5, ranks=[1, 3])
        reply, frames = job.plan(req)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == protocol.ErrorCode.NOT_READY
        assert reply.reason == "step 5 is being planned" and frames == ()
        _until(lambda: isinstance(job.plan(req)[0], protocol.PlanReply), "the plan of step 5")
        reply, frames = job.plan(req)
        want = build_planner(spec, open_sources(spec)).plan(5, 4).for_ranks([1, 3])
        assert reply.rows == len(want) and reply.num_micro == [int(want.num_micro[1]), int(want.num_micro[3])]
        cols = {n: f for n, f in zip(reply.columns, frames)}
        assert np.array_equal(cols["sample_id"], want.sample_id) and np.array_equal(cols["rank"], want.rank)
        assert planned_on and all(name == "plan-pj" for name in planned_on)
        for step, ranks, quoted in ((MAX_STEP + 1, [0], "MAX_STEP"), (2**62, [0], "MAX_STEP"), (-1, [0], "-1"),
                                    (0, [4], "rank 4")):
            r, _ = job.plan(protocol.PlanRequest(job="pj", step=step, ranks=ranks))
            assert r.code == protocol.ErrorCode.BAD_REQUEST and quoted in r.reason, r
        _until(lambda: job.status()["planning"]["cached"] >= 1 + 4, "look-ahead")  # step 5 and 6..9
        st = job.status()
        assert st["counters"]["plans_not_ready"] >= 1 and st["planning"]["error"] is None
    finally:
        job.close()
    assert job.plan_worker.join(WAIT_S)
    r, _ = job.plan(protocol.PlanRequest(job="pj", step=5, ranks=[0]))
    assert r.code == protocol.ErrorCode.NOT_READY


def test_constructor_asks_again_soon_for_a_step_being_planned() -> None:
    from fabricd.roles.constructor import PLAN_RETRY_S, PLAN_TIMEOUT_S, Constructor

    c = object.__new__(Constructor)  # only the plan bookkeeping is exercised
    sent = time.monotonic()
    c.plan_requested = {7: sent, 8: sent}
    c._on_refused(protocol.ErrorReply(code=protocol.ErrorCode.NOT_READY, reason="step 7 is being planned"))
    # due again PLAN_RETRY_S after the refusal instead of PLAN_TIMEOUT_S after the request
    assert c.plan_requested[7] + PLAN_TIMEOUT_S <= time.monotonic() + PLAN_RETRY_S
    assert c.plan_requested[7] + PLAN_TIMEOUT_S > sent
    assert c.plan_requested[8] == sent
    c._on_refused(protocol.ErrorReply(code=protocol.ErrorCode.BAD_REQUEST, reason="step 8 is being planned"))
    c._on_refused(protocol.ErrorReply(code=protocol.ErrorCode.NOT_READY, reason="step 9 is being planned"))
    assert c.plan_requested[8] == sent and 9 not in c.plan_requested


class SkipRecords(NoRoles):
    """Committed and uncommitted skip records of job "pj", and one report the leader holds."""

    def __init__(self) -> None:
        self.committed = {("code", 1, 0, 5), ("ocr", 2, 0, 6)}
        self.uncommitted = {("code", 3, 0, 5)}
        self.reported = {5: {("ocr", 4, 1), ("code", 3, 0)}}  # the second also in the log's tail

    def skip_records(self, job: str) -> tuple[object, set, set]:
        return (len(self.committed), len(self.uncommitted)), self.committed, self.uncommitted

    def reported_skips(self, job: str, step: int) -> set:
        return self.reported.get(step, set())


def test_plan_replies_name_committed_skips_and_pending_ones_apart(corpus: Path, tmp_path: Path) -> None:
    spec = parse_job_spec(job_toml(corpus, name="pj", seed=4, dp_size=4, samples_per_step=16, prefetch=2),
                          tmp_path / "pj.toml")
    records = SkipRecords()
    job = JobRuntime(spec, index_dir=tmp_path, directory=records)
    try:
        names = {s.name: i for i, s in enumerate(spec.sources)}
        code, ocr = names["code"], names["ocr"]
        assert job.step_skips(5) == ([[code, 1, 0]], sorted([[code, 3, 0], [ocr, 4, 1]]))
        assert job.step_skips(6) == ([[ocr, 2, 0]], [])
        records.committed |= records.uncommitted  # the tail is committed; the leader's report is not yet
        records.uncommitted = set()
        assert job.step_skips(5) == (sorted([[code, 1, 0], [code, 3, 0]]), [[ocr, 4, 1]])
    finally:
        job.close()


def test_a_window_drawn_on_several_threads_is_the_window_drawn_on_one(specs, monkeypatch: pytest.MonkeyPatch) -> None:
    import fabricd.planner.plan as plan_module

    monkeypatch.setattr(plan_module, "DRAW_THREADS_FROM", 1)  # this small window too
    plans = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("FABRICD_PLAN_THREADS", threads)
        planner = build_planner(specs["composed"], specs["indexes"])
        drew_on: set[str] = set()
        real = planner.sequence.step_units

        def spy(step: int, real=real, drew_on=drew_on):
            drew_on.add(threading.current_thread().name.split("_")[0])
            return real(step)

        planner.sequence.step_units = spy  # type: ignore[method-assign]
        plans[threads] = [planner.plan(s, 2) for s in range(10)]  # windows of 4: three composed
        assert drew_on == ({"MainThread"} if threads == "1" else {"plan-draws"})
    for one, three in zip(plans["1"], plans["3"]):
        for name in ("rank", "micro", "source", "sample_id", "piece", "tokens", "num_micro"):
            assert np.array_equal(getattr(one, name), getattr(three, name)), name


# --------------------------------------------------------------------------- composing ahead


class WindowedFakePlanner(FakePlanner):
    """A FakePlanner whose steps fall in windows of ``window`` steps; ``prepare`` records in
    ``events`` (with each plan) and may be held or fail."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.events: list[tuple[str, int]] = []
        self.prepared: list[int] = []
        self.prepare_hold: threading.Event | None = None
        self.prepare_fails = False
        self.next_window_fails_from: int | None = None

    def plan(self, step: int, dp_size: int) -> tuple[int, int]:
        self.events.append(("plan", step))
        return super().plan(step, dp_size)

    def next_window(self, step: int) -> int:
        if self.next_window_fails_from is not None and step >= self.next_window_fails_from:
            raise ValueError(f"step {step} is outside this plan segment")
        return (step // self.window + 1) * self.window

    def prepare(self, step: int, dp_size: int) -> None:
        self.events.append(("prepare", step))
        self.prepared.append(step)
        if self.prepare_hold is not None:
            assert self.prepare_hold.wait(WAIT_S)
        if self.prepare_fails:
            raise ValueError(f"cannot compose the window of step {step}")


def test_a_free_thread_composes_the_next_window_while_another_plans() -> None:
    p = WindowedFakePlanner(window=4)
    p.hold[0] = threading.Event()  # step 0's plan runs until released
    p.prepare_hold = threading.Event()
    w = _worker(p, threads=2, ahead_steps=2, cache_steps=32)
    try:
        w.get(0)
        # the other thread composes window [4, 8) meanwhile, before the look-ahead (steps 1 and
        # 2 need step 0's window, which is at hand long before the next one would be)
        _until(lambda: p.prepared == [4], "window 4 composed ahead")
        assert w.status()["preparing_windows"] == [4] and w.status()["running_steps"] == [0]
        assert [c[0] for c in p.calls] == [0]
        p.prepare_hold.set()
        p.hold[0].set()
        _until(lambda: all(w.get(s) is not None for s in (0, 1, 2)), "steps 0-2")
        _until(lambda: w.status()["preparing_windows"] == [], "composing done")
        w.get(5)  # the look-ahead enters window [4, 8): window [8, 12) is composed ahead
        _until(lambda: all(w.get(s) is not None for s in (5, 6, 7)), "steps 5-7")
        _until(lambda: p.prepared == [4, 8], "window 8 composed ahead")
        assert sorted(c[0] for c in p.calls) == [0, 1, 2, 5, 6, 7]  # composing ahead planned no step
        assert w.status()["error"] is None and w.counters["plan_errors"] == 0
    finally:
        p.prepare_hold.set()
        p.hold[0].set()
        w.close()
    assert w.join(WAIT_S)


def test_eight_threads_compose_two_windows_ahead_at_once_and_no_more() -> None:
    p = WindowedFakePlanner(window=4)
    p.prepare_hold = threading.Event()
    w = _worker(p, threads=8, ahead_steps=2, cache_steps=32)
    try:
        w.get(0)
        _until(lambda: sorted(p.prepared) == [4, 8], "windows 4 and 8 composed ahead")
        _until(lambda: all(w.get(s) is not None for s in (0, 1, 2)), "steps 0-2")
        time.sleep(0.05)  # idle threads: none may take a third window, nor one twice
        assert sorted(p.prepared) == [4, 8] and w.status()["preparing_windows"] == [4, 8]
        p.prepare_hold.set()
        w.get(6)  # the look-ahead (7, 8) reaches window [8, 12): the next two are 12 (8 is done)
        _until(lambda: sorted(p.prepared) == [4, 8, 12, 16], "windows 12 and 16")
    finally:
        p.prepare_hold.set()
        w.close()
    assert w.join(WAIT_S)


def test_one_thread_composes_ahead_only_after_its_look_ahead() -> None:
    p = WindowedFakePlanner(window=4)
    w = _worker(p, threads=1, ahead_steps=2)
    try:
        w.get(0)
        _until(lambda: len(p.events) == 4, "three plans and a window")
        assert p.events == [("plan", 0), ("plan", 1), ("plan", 2), ("prepare", 4)]
    finally:
        w.close()
    assert w.join(WAIT_S)


def test_composing_ahead_that_fails_is_logged_and_the_worker_goes_on() -> None:
    p = WindowedFakePlanner(window=4)
    p.prepare_fails = True
    p.next_window_fails_from = 6  # a step past a segmented planner's range: no window to compose
    w = _worker(p, threads=2, ahead_steps=2, cache_steps=32)
    try:
        w.get(0)
        _until(lambda: all(w.get(s) is not None for s in (0, 1, 2)), "steps 0-2")
        _until(lambda: p.prepared == [4], "window 4 tried")
        w.get(6)
        _until(lambda: all(w.get(s) is not None for s in (6, 7, 8)), "steps 6-8")
        st = w.status()
        assert st["alive"] and st["error"] is None and w.counters["plan_errors"] == 0
        assert p.prepared == [4]  # next_window raised for the look-ahead from 7 on: nothing composed
    finally:
        w.close()
    assert w.join(WAIT_S)


def test_a_window_composed_ahead_is_the_window_and_is_composed_once(specs, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = specs["composed"]
    composed: list[int] = []
    real = Planner._compose

    def counted(self, k, dp):
        composed.append(k)
        return real(self, k, dp)

    alone = build_planner(spec, specs["indexes"])
    want = {s: alone.plan(s, 2) for s in range(12)}
    monkeypatch.setattr(Planner, "_compose", counted)
    p = build_planner(spec, specs["indexes"])
    assert p.window == 4
    assert [p.next_window(s) for s in (0, 3, 4, 7, 8)] == [4, 4, 8, 8, 12]
    p.prepare(5, 2)
    p.prepare(6, 2)  # the same window: already composed
    assert composed == [1]
    for s in range(4, 8):
        got = p.plan(s, 2)
        for name in ("rank", "micro", "source", "sample_id", "piece", "tokens", "num_micro"):
            assert np.array_equal(getattr(got, name), getattr(want[s], name)), (s, name)
    assert composed == [1]
    plain = build_planner(specs["plain"], specs["indexes"])
    assert plain.next_window(3) is None
    plain.prepare(3, 2)  # nothing to compose


def test_composing_one_window_does_not_hold_up_plans_of_another(specs, monkeypatch: pytest.MonkeyPatch) -> None:
    p = build_planner(specs["composed"], specs["indexes"])
    alone = build_planner(specs["composed"], specs["indexes"])
    p.plan(0, 2)  # window [0, 4) composed
    entered, release = threading.Event(), threading.Event()
    composed: list[int] = []
    real = Planner._compose

    def slow(self, k, dp):
        composed.append(k)
        if k == 1:
            entered.set()
            assert release.wait(WAIT_S)
        return real(self, k, dp)

    monkeypatch.setattr(Planner, "_compose", slow)
    results: dict[str, object] = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: BLE001 - the test asserts on it
            results[name] = e

    ahead = threading.Thread(target=run, args=("ahead", lambda: p.prepare(4, 2)))
    ahead.start()
    try:
        assert entered.wait(WAIT_S)
        other = threading.Thread(target=run, args=("step 1", lambda: p.plan(1, 2)))
        other.start()
        other.join(WAIT_S)  # window [0, 4) is at hand: its step is planned while [4, 8) composes
        assert not other.is_alive() and not isinstance(results["step 1"], BaseException)
        waiter = threading.Thread(target=run, args=("step 5", lambda: p.plan(5, 2)))
        waiter.start()
        time.sleep(0.1)
        assert waiter.is_alive()  # step 5 waits for its window rather than composing it again
    finally:
        release.set()
    ahead.join(WAIT_S)
    waiter.join(WAIT_S)
    assert not ahead.is_alive() and not waiter.is_alive()
    assert composed == [1]
    for step, key in ((1, "step 1"), (5, "step 5")):
        assert np.array_equal(results[key].source, alone.plan(step, 2).source)
        assert np.array_equal(results[key].sample_id, alone.plan(step, 2).sample_id)


def test_a_failed_composition_fails_every_step_that_waited_for_it(specs, monkeypatch: pytest.MonkeyPatch) -> None:
    p = build_planner(specs["composed"], specs["indexes"])
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def broken(self, k, dp):
        calls.append(k)
        entered.set()
        assert release.wait(WAIT_S)
        raise MemoryError("no room for the window")

    monkeypatch.setattr(Planner, "_compose", broken)
    errors: list[BaseException] = []

    def plan(step):
        try:
            p.plan(step, 2)
        except MemoryError as e:
            errors.append(e)

    first = threading.Thread(target=plan, args=(0,))
    first.start()
    assert entered.wait(WAIT_S)
    second = threading.Thread(target=plan, args=(1,))
    second.start()
    time.sleep(0.05)
    release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert len(errors) == 2 and calls == [0, 0]  # the waiter composed again, and failed the same way
    assert p._composing == {}
