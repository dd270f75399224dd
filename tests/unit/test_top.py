"""``fabricctl top``'s frames, rendered from status documents with rich's recording console (no
daemon), its poll's "unreachable since" bookkeeping, and the two numbers of a step's balance."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from fabricd.planner.plan import StepPlan
from fabricd.planner.quality import step_balance
from fabricd.planner.worker import PlanWorker
from fabricd.top import Snapshot, counter_delta, job_view, poll_snapshot, render

pytestmark = pytest.mark.unit


def status_doc(*, units: int, batches: int, tokens: int, wait_s: float, step: int, cpu: float = 12.0,
               term: int = 7, busy_s: float = 0.0) -> dict[str, Any]:
    """A status document as ``build_status`` makes it (the fields top reads), for one job ``j``
    of two sources on two nodes: node ``a`` answered, ``b`` is known from its heartbeat."""
    loader = {"rss_mb": 90.0, "cpu_percent": 1.0, "units": units, "requests": 3, "busy_s": 0.5}
    constructor = {"rss_mb": 80.0, "cpu_percent": 2.0, "built_batches": batches, "batches_sent": batches,
                   "tokens_sent": tokens, "load_queue": {"text": 3, "img": 0}, "busy_s": busy_s,
                   "trainer_waits": [[0, 0, step, wait_s], [1, 0, step + 5, 0.0]]}
    tel_a = {"cpu_percent": cpu, "mem_used_percent": 41.0, "mem_available_mb": 2048, "roles": 2,
             "role_processes": {"j/loader/text/0": loader, "j/constructor/0": constructor}}
    tel_b = {"cpu_percent": 88.0, "mem_used_percent": 10.0, "mem_available_mb": 4096, "roles": 1,
             "role_processes": {"j/loader/img/0": {**loader, "units": units // 2}}}
    roles = [{"id": "j/constructor/0", "kind": "constructor", "node": "a", "alive": True, "source": None},
             {"id": "j/loader/img/0", "kind": "source_loader", "node": "b", "alive": True, "source": "img"},
             {"id": "j/loader/img/1", "kind": "source_loader", "node": "b", "alive": False, "source": "img"},
             {"id": "j/loader/text/0", "kind": "source_loader", "node": "a", "alive": True, "source": "text"}]
    return {
        "node": "a", "version": "0.1.0", "endpoint": "tcp://10.0.0.1:7700", "leader": "b", "term": term,
        "telemetry": tel_a,
        "cluster": {"degraded": None, "members": {
            "a": {"alive": True, "last_beat_s_ago": None, "telemetry": {**tel_a, "cpu_percent": 99.0}},
            "b": {"alive": True, "last_beat_s_ago": 0.4, "telemetry": tel_b}}},
        "jobs": {"j": {"state": "ready", "serving": True, "error": None, "fingerprint": "f00d",
                       "topology": {"dp_size": 2, "mp_size": 1, "constructors": 1}, "roles": roles,
                       "progress_floor": step - 1,
                       "planning": {"balance": [{"step": s, "max_over_mean": 1.25, "bound": 1.125}
                                                for s in range(step, step + 6)]}}},
    }


def text(renderable) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(renderable)
    return console.export_text()


def line_with(frame: str, *words: str) -> str:
    found = [line for line in frame.splitlines() if all(w in line for w in words)]
    assert found, f"no line with {words} in:\n{frame}"
    return found[0]


def test_a_frame_shows_leader_members_pools_trainers_balance_and_rates() -> None:
    before = Snapshot(at=1000.0, status=status_doc(units=100, batches=10, tokens=1_000, wait_s=1.0, step=40,
                                                   busy_s=3.0))
    now = Snapshot(at=1002.0, status=status_doc(units=300, batches=50, tokens=9_000, wait_s=2.0, step=42,
                                                busy_s=4.5))
    frame = text(render(now, before))
    assert "busiest constructor 75% busy" in frame  # 1.5 s of the last 2 s working
    assert "leader b" in frame and "term 7" in frame and "answered by a" in frame
    assert line_with(frame, "a ", "alive").split()[2] == "12"  # its own, current telemetry, not the beat's 99
    assert line_with(frame, "b ", "alive leader").split()[3] == "88"
    # units/s: text 100 -> 300 and img 50 -> 150 over 2 s; batches 40/2 s; tokens 8000/2 s
    assert "20.0 batches/s" in frame and "150.0 units/s" in frame and "4,000 tokens/s" in frame
    # pools and trainers side by side: source, workers up/total, queue, units, units/s | dp/mp,
    # step, data wait s, wait % (1 s of the last 2 s waited: 50 %), the slowest trainer first
    assert line_with(frame, "img ").split()[:9] == ["img", "1/2", "0", "150", "50.0", "0/0", "42", "2.0", "50"]
    assert line_with(frame, "text ").split()[:9] == ["text", "1/1", "3", "300", "100.0", "1/0", "47", "0.0", "0"]
    assert "all at step >= 41" in frame
    steps = [line.split()[-3] for line in frame.splitlines() if line.split()[-2:] == ["1.250", "1.125"]]
    assert steps == ["44", "45", "46", "47"]  # the newest four planned steps


def test_the_first_frame_has_no_rates_and_a_restarted_role_counts_from_zero() -> None:
    only = Snapshot(at=5.0, status=status_doc(units=100, batches=10, tokens=10, wait_s=0.0, step=3))
    frame = text(render(only, None))
    assert "rates: - batches/s  - units/s  - tokens/s  busiest constructor -% busy" in frame
    old = {"r": {"units": 500}, "s": {"units": 10}}
    new = {"r": {"units": 20}, "s": {"units": 15}, "t": {"units": 4}}  # r restarted, t is new
    assert counter_delta(new, old, ["r", "s", "t"], "units") == 20 + 5 + 4


def test_the_busiest_constructor_is_shown_and_flagged_near_its_limit() -> None:
    def tel(busy: dict[str, float]) -> dict[str, Any]:
        doc = status_doc(units=1, batches=1, tokens=1, wait_s=0.0, step=3)
        roles = doc["jobs"]["j"]["roles"]
        for c, b in busy.items():
            doc["telemetry"]["role_processes"][c] = {"busy_s": b}
            if c not in {r["id"] for r in roles}:
                roles.append({"id": c, "kind": "constructor", "node": "a", "alive": True, "source": None})
        return doc

    before = Snapshot(at=10.0, status=tel({"j/constructor/0": 1.0, "j/constructor/1": 7.0}))
    now = Snapshot(at=12.0, status=tel({"j/constructor/0": 1.5, "j/constructor/1": 0.9}))  # 1 restarted: 0.9 s
    assert "busiest constructor 45% busy" in text(render(now, before))
    now = Snapshot(at=12.0, status=tel({"j/constructor/0": 3.0, "j/constructor/1": 7.5}))  # 2 s of 2 s
    view = job_view("j", now.status["jobs"]["j"], now.status["telemetry"]["role_processes"],
                    before.status["telemetry"]["role_processes"], 2.0)
    assert view.rates.constructor_busy_pct == 100.0
    assert "busiest constructor 100% busy" in text(render(now, before))


def test_unreachable_says_since_when_over_the_last_answer_and_clears_when_it_answers() -> None:
    clock = iter([100.0, 103.0, 107.0, 110.0]).__next__
    answers: list[Any] = [status_doc(units=1, batches=1, tokens=1, wait_s=0.0, step=9),
                          OSError("no answer from tcp://10.0.0.1:7700"), OSError("still nothing"),
                          status_doc(units=2, batches=2, tokens=2, wait_s=0.0, step=9, term=8)]

    def fetch() -> dict[str, Any]:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    good = poll_snapshot(fetch, None, (OSError,), clock)
    down = poll_snapshot(fetch, good, (OSError,), clock)
    still = poll_snapshot(fetch, down, (OSError,), clock)
    assert (down.unreachable_since, still.unreachable_since) == (103.0, 103.0) and still.error == "still nothing"
    frame = text(render(still, good))
    since = time.strftime("%H:%M:%S", time.localtime(103.0))
    assert f"unreachable since {since} (4s): still nothing" in frame
    assert "showing the last answer" in frame and "term 7" in frame  # the last answer's content
    back = poll_snapshot(fetch, still, (OSError,), clock)
    assert back.unreachable_since is None and "unreachable" not in text(render(back, good))
    assert "no status yet" in text(render(down, None))


def _plan(rank: list[int], cost: list[float], step: int = 3) -> StepPlan:
    n = len(rank)
    zeros = np.zeros(n, np.int32)
    return StepPlan(step=step, dp_size=2, rank=np.asarray(rank, np.int32), micro=zeros, source=zeros,
                    sample_id=np.arange(n, dtype=np.int64), piece=zeros, tokens=np.ones(n, np.int32),
                    cost=np.asarray(cost, np.float64), num_micro=np.ones(2, np.int32))


def test_step_balance_is_max_over_mean_and_the_bound_of_the_largest_unit() -> None:
    b = step_balance(_plan([0, 1, 1], [3.0, 0.5, 0.5]))  # ranks 3 and 1: mean 2
    assert (b.step, b.max_over_mean, b.bound) == (3, 1.5, 1.5)
    b = step_balance(_plan([0, 0, 1, 1], [1.0, 2.0, 1.5, 1.5]))  # ranks 3 and 3; largest unit 2 < mean 3
    assert (b.max_over_mean, b.bound) == (1.0, 1.0)
    assert step_balance(_plan([], [])).max_over_mean == 1.0  # nothing to balance


def test_the_plan_worker_reports_the_balance_of_the_steps_it_planned() -> None:
    class Planner:
        def plan(self, step: int, dp_size: int) -> StepPlan:
            return _plan([0, 1, 1], [3.0, 0.5, 0.5], step=step)

    worker = PlanWorker(Planner(), 2, name="j", cache_steps=4, ahead_steps=2, queue_steps=4,  # type: ignore[arg-type]
                        deadline_s=30.0)
    try:
        end = time.monotonic() + 20
        while worker.get(0) is None or len(worker.status()["balance"]) < 3:
            assert time.monotonic() < end, worker.status()
            time.sleep(0.005)
        rows = worker.status()["balance"]
        assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
        assert rows[0] == {"step": 0, "max_over_mean": 1.5, "bound": 1.5}
    finally:
        worker.close()


def test_a_trainer_two_constructors_report_is_shown_once_where_it_is_now() -> None:
    """A trainer that moved to its group's standby may still be listed by the primary for a beat."""
    job = {"roles": [{"id": "j/constructor/0", "kind": "constructor", "alive": True},
                     {"id": "j/constructor/0/standby", "kind": "constructor", "alive": True}]}
    tel = {"j/constructor/0": {"trainer_waits": [[0, 0, 5, 1.0]]},
           "j/constructor/0/standby": {"trainer_waits": [[0, 0, 9, 0.5]]}}
    view = job_view("j", job, tel, None, None)
    assert [(t.rank, t.step, t.constructor) for t in view.trainers] == [("0/0", 9, "j/constructor/0/standby")]


def test_a_status_document_it_cannot_read_is_a_frame_saying_so() -> None:
    doc = status_doc(units=1, batches=1, tokens=1, wait_s=0.0, step=2)
    doc["jobs"]["j"]["roles"][0] = {"id": "j/constructor/0"}  # no kind
    frame = text(render(Snapshot(at=1.0, status=doc), None))
    assert "cannot show the status document" in frame and "KeyError: 'kind'" in frame
    doc["cluster"] = "garbled"
    assert "AttributeError" in text(render(Snapshot(at=1.0, status=doc), None))
