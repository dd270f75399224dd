"""Plans computed off the caller's thread: a few worker threads per job, a few steps ahead.

The daemon's control loop must never wait on a plan (a step of 10^7 samples takes tens of
seconds). ``PlanWorker.get(step)`` answers at once: the cached plan, or None after asking the
workers for it. The workers plan asked-for steps lowest first, then a few steps past the highest
step asked for, and keep the last ``cache_steps`` plans, at most ``cache_bytes`` of them (a step
at DP 4096 and 64k tokens a rank is 23 MB of plan: 128 steps would be 3 GB). Each thread plans one step at a time;
``threads`` of them plan different steps at once (a plan is a pure function of its step, and
the planner's compiled loops and numpy's release the GIL, so two threads plan about 1.75 steps
in the time of one at DP 4096). With step composition, a window's first plan composes the whole
window (~0.8 s at DP 4096, 16 steps): with more than one thread, a free thread composes the *next*
window (``planner.prepare``; from 8 threads on, the next two at once) while the others plan this
one's steps, so no step waits for it and the composing overlaps planning (with one thread it
comes after the look-ahead). A plan running past ``deadline_s`` is logged and counted (it cannot
be interrupted: the planner is pure computation); an exception is kept per step and in
``status()``, never lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from typing import Any

import msgspec
from fabric_client.limits import MAX_STEP

from fabricd.planner.plan import WINDOW_CACHE, Planner, StepPlan
from fabricd.planner.quality import StepBalance, step_balance
from fabricd.planner.threads import MAX_THREADS

__all__ = ["PlanWorker"]

log = logging.getLogger(__name__)

_FAILED_KEPT = 32  # most recent failed steps remembered (each is answered with its error)
BALANCE_KEPT = 16  # the balance of the most recently planned steps, shown by status (fabricctl top)


def _nbytes(plan: Any) -> int:
    """What keeping a plan costs (anything else a planner returns, as tests' fakes do: nothing)."""
    return plan.nbytes if isinstance(plan, StepPlan) else 0


class PlanWorker:
    """Computes ``planner.plan(step, dp_size)`` on ``threads`` background threads.

    Promises: ``get``, ``failure`` and ``status`` never block on a computation; at most
    ``queue_steps`` steps wait to be planned (past that the farthest waiting step is dropped: its
    caller asks again); at most ``cache_steps`` plans, and no more than ``cache_bytes`` of them,
    are kept (least recently used go first; the newest stays whatever its size);
    no step is planned by two threads at once; nothing the workers raise escapes them: the error
    is kept for its step and shown by ``status()``. ``close()`` stops the threads after the plans
    in progress. ``planner.plan`` must be safe to call from several threads at once for
    ``threads > 1`` (``Planner`` and ``SegmentedPlanner`` are).
    """

    def __init__(self, planner: Planner, dp_size: int, *, name: str, cache_steps: int, ahead_steps: int,
                 queue_steps: int, deadline_s: float, counters: MutableMapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, threads: int = 1,
                 cache_bytes: int | None = None) -> None:
        if isinstance(threads, bool) or int(threads) != threads or not 1 <= int(threads) <= MAX_THREADS:
            raise ValueError(f"threads must be an integer from 1 to {MAX_THREADS}, got {threads!r}")
        self.planner = planner
        self.dp_size = int(dp_size)
        self.name = name
        self.cache_steps = max(1, int(cache_steps))
        self.cache_bytes = None if cache_bytes is None else max(0, int(cache_bytes))
        self.ahead_steps = max(0, int(ahead_steps))
        self.queue_steps = max(1, int(queue_steps))
        self.deadline_s = float(deadline_s)
        self.clock = clock
        self.counters = counters if counters is not None else {}
        for key, zero in (("plans_computed", 0), ("plan_ms_max", 0.0), ("plans_over_deadline", 0),
                          ("plan_errors", 0)):
            self.counters.setdefault(key, zero)
        self._cond = threading.Condition()
        self._cache: OrderedDict[int, StepPlan] = OrderedDict()
        self._wanted: set[int] = set()
        self._failed: OrderedDict[int, str] = OrderedDict()
        self._balance: OrderedDict[int, StepBalance] = OrderedDict()  # step → its plan's balance
        self._highest = -1
        self._running: dict[int, float] = {}  # step → started, of each plan in progress
        self._overdue_counted: set[int] = set()  # the running steps counted past their deadline
        # composing ahead (planners with ``prepare`` and ``next_window``): the first step of the
        # latest window taken, the windows being composed now, and how many windows past the
        # look-ahead's may be: more from 8 threads on (one composition at a time then bounds the
        # steps/s), as many as a planner's window cache holds beside the window being planned
        self._prepared = -1
        self._preparing: set[int] = set()
        self._prepare_depth = min(WINDOW_CACHE - 1, 1 + int(threads) // 8)
        self._stopped = False
        self.error: str | None = None  # the last failure (a step's plan, or a thread itself)
        self.last_overdue: dict[str, Any] | None = None
        self._threads = [threading.Thread(target=self._run, name=f"plan-{name}" + (f"-{i}" if i else ""), daemon=True)
                         for i in range(int(threads))]
        for thread in self._threads:
            thread.start()

    # -- the owner's side (never blocks on a computation) ---------------------------------------

    def get(self, step: int) -> StepPlan | None:
        """The plan of ``step`` if computed, else None (and the worker is asked to compute it)."""
        step = int(step)
        with self._cond:
            self._check_overdue()
            plan = self._cache.get(step)
            if plan is not None:
                self._cache.move_to_end(step)
                return plan
            if step in self._failed or self._stopped:
                return None
            self._highest = max(self._highest, step)
            if step not in self._running and step not in self._wanted:
                self._wanted.add(step)
                if len(self._wanted) > self.queue_steps:
                    self._wanted.discard(max(self._wanted))
            self._cond.notify_all()  # the asked step, and look-ahead past it for idle threads
            return None

    def latest_balance(self) -> StepBalance | None:
        """The balance of the highest step planned so far (exported as a metric), or None;
        computed once per plan, never blocks on a computation."""
        with self._cond:
            return self._balance[max(self._balance)] if self._balance else None

    def cached_bytes(self) -> int:
        """Bytes of the plans kept now (exported as a metric); never blocks on a computation."""
        with self._cond:
            return self._cache_size()

    def _cache_size(self) -> int:
        """Bytes of the cached plans (lock held; at most ``cache_steps`` of them to add up)."""
        return sum(_nbytes(plan) for plan in self._cache.values())

    def failure(self, step: int) -> str | None:
        """Why planning ``step`` failed, or None. A failed step is not retried."""
        with self._cond:
            return self._failed.get(int(step))

    def status(self) -> dict[str, Any]:
        """What the workers are doing: the plan in progress longest and for how long (``running``)
        and the steps of every plan in progress, queue and cache sizes, whether they are alive,
        and their last error and overdue plan."""
        with self._cond:
            self._check_overdue()
            now = self.clock()
            running = None
            if self._running:
                step, started = min(self._running.items(), key=lambda item: (item[1], item[0]))
                running = {"step": step, "running_s": round(now - started, 3), "overdue": now - started > self.deadline_s}
            alive = all(thread.is_alive() for thread in self._threads) and not self._stopped
            return {"alive": alive, "running": running, "running_steps": sorted(self._running),
                    "threads": len(self._threads), "preparing_windows": sorted(self._preparing),
                    "queued": len(self._wanted), "cached": len(self._cache), "cached_bytes": self._cache_size(),
                    "deadline_s": self.deadline_s,
                    "error": self.error, "last_overdue": self.last_overdue,
                    "balance": [msgspec.to_builtins(b) for b in sorted(self._balance.values(), key=lambda b: b.step)]}

    def close(self) -> None:
        """Stop the threads (after the plans in progress, if any) and drop the cache."""
        with self._cond:
            self._stopped = True
            self._wanted.clear()
            self._cache.clear()
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the threads to end (``timeout`` for them all); True when they have."""
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # -- the worker thread --------------------------------------------------------------------

    def _check_overdue(self) -> None:
        """Count and log each plan in progress once it runs past the deadline (lock held)."""
        now = self.clock()
        for step, started in self._running.items():
            elapsed = now - started
            if step not in self._overdue_counted and elapsed > self.deadline_s:
                self._overdue_counted.add(step)
                self.counters["plans_over_deadline"] += 1
                self.last_overdue = {"step": step, "seconds": round(elapsed, 3), "finished": False}
                log.warning("job %s: plan of step %d has run %.1f s, past its %.0f s deadline", self.name, step,
                            elapsed, self.deadline_s)

    def _next(self) -> tuple[str, int] | None:
        """What to do next (lock held): ``("plan", step)`` for the lowest asked-for step, else
        ``("prepare", step)`` to compose the window after the one the look-ahead is in (before
        the look-ahead when other threads can plan meanwhile, after it with one thread), else
        ``("plan", step)`` for the next look-ahead step."""
        if self._wanted:
            step = min(self._wanted)
            self._wanted.discard(step)
            return "plan", step
        if self._highest < 0:
            return None
        ahead = None  # the first look-ahead step still to plan
        for step in range(self._highest + 1, min(self._highest + 1 + self.ahead_steps, MAX_STEP + 1)):
            if step not in self._cache and step not in self._failed and step not in self._running:
                ahead = step
                break
        if ahead is None or len(self._threads) > 1:
            window = self._next_window(self._highest + self.ahead_steps if ahead is None else ahead)
            if window is not None:
                return "prepare", window
        return None if ahead is None else ("plan", ahead)

    def _next_window(self, step: int) -> int | None:
        """The first step of the next window to compose ahead: among the ``_prepare_depth``
        windows after the one holding ``step``, the first not yet taken, when the planner composes
        windows and fewer than ``_prepare_depth`` are being composed now (lock held; marks it
        taken)."""
        next_window = getattr(self.planner, "next_window", None)
        if next_window is None or len(self._preparing) >= self._prepare_depth or step > MAX_STEP:
            return None
        window = step
        for _ in range(self._prepare_depth):
            try:
                window = next_window(window)
            except Exception:  # noqa: BLE001 - a step past the planner's range: its plan reports that
                return None
            if window is None or window > MAX_STEP:
                return None
            if window > self._prepared:
                self._prepared = window
                self._preparing.add(window)
                return window
        return None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    task = self._next()
                    while task is None and not self._stopped:
                        self._cond.wait()
                        task = self._next()
                    if self._stopped:
                        return
                    kind, step = task
                    if kind == "plan":
                        self._running[step] = self.clock()
                if kind == "plan":
                    self._plan_one(step)
                else:
                    self._prepare_one(step)
        except BaseException as e:  # noqa: BLE001 - a thread itself broke: the owner sees it in status
            with self._cond:
                self.error = f"plan worker died: {type(e).__name__}: {e}"
                self._stopped = True
                self._cond.notify_all()  # the other threads stop too
            log.exception("job %s: plan worker died", self.name)

    def _prepare_one(self, step: int) -> None:
        """Compose the window holding ``step`` ahead of its plans. A failure is only logged: the
        plans of its steps fail with it and are reported per step."""
        try:
            self.planner.prepare(step, self.dp_size)
        except Exception as e:  # noqa: BLE001 - its steps' plans raise it again, where it is kept
            log.warning("job %s: composing the window of step %d ahead failed: %s: %s", self.name, step,
                        type(e).__name__, e)
        finally:
            with self._cond:
                self._preparing.discard(step)
                self._cond.notify_all()

    def _plan_one(self, step: int) -> None:
        started = self.clock()
        plan: StepPlan | None = None
        err: str | None = None
        try:
            plan = self.planner.plan(step, self.dp_size)
        except Exception as e:  # noqa: BLE001 - kept for the step and shown in status
            err = f"plan of step {step} failed: {type(e).__name__}: {e}"
            log.exception("job %s: %s", self.name, err)
        seconds = self.clock() - started
        balance = step_balance(plan) if isinstance(plan, StepPlan) else None  # off the clock: not planning time
        with self._cond:
            self._check_overdue()
            self._running.pop(step, None)
            if step in self._overdue_counted:
                self._overdue_counted.discard(step)
                self.last_overdue = {"step": step, "seconds": round(seconds, 3), "finished": True}
            elif seconds > self.deadline_s:  # ran past the deadline between two looks
                self.counters["plans_over_deadline"] += 1
                self.last_overdue = {"step": step, "seconds": round(seconds, 3), "finished": True}
                log.warning("job %s: plan of step %d took %.1f s, past its %.0f s deadline", self.name, step,
                            seconds, self.deadline_s)
            if err is not None:
                self.error = err
                self.counters["plan_errors"] += 1
                self._failed[step] = err
                while len(self._failed) > _FAILED_KEPT:
                    self._failed.popitem(last=False)
                return
            if self._stopped:
                return
            self.counters["plans_computed"] += 1
            self.counters["plan_ms_max"] = max(self.counters["plan_ms_max"], round(seconds * 1e3, 2))
            self._cache[step] = plan
            if balance is not None:
                self._balance[step] = balance
                self._balance.move_to_end(step)
                while len(self._balance) > BALANCE_KEPT:
                    self._balance.popitem(last=False)
            while len(self._cache) > self.cache_steps:
                self._cache.popitem(last=False)
            if self.cache_bytes is not None:
                size = self._cache_size()
                while size > self.cache_bytes and len(self._cache) > 1:
                    size -= _nbytes(self._cache.popitem(last=False)[1])
