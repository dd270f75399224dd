"""The planner: one step's units, balanced over DP ranks and packed into micro-batches."""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from fabricd.errors import PlanError
from fabricd.planner.balance import (BALANCERS, balance, descending_rank, pack_micro_batches_grouped,
                                     rows_by_rank_and_micro, stable_order)
from fabricd.planner.compose import (COMPOSE_MODES, MAX_DELAY_STEPS, check_dp_history, compose_window,
                                     composition_dp, split_by_step, step_dtype, window_bounds)
from fabricd.planner.cost import CostModel
from fabricd.planner.mixture import MixtureSchedule
from fabricd.planner.sequence import GlobalSequence, SourceUnits
from fabricd.planner.threads import plan_threads

__all__ = ["StepPlan", "Planner", "draws_for_tokens"]

#: Composed windows a planner keeps, least recently used out first: the one being planned, and the
#: one before (for late requests) or a second one ahead, beside the next one (both composed ahead
#: by the plan worker: ``prepare``). A window at DP 4096 and 64k tokens a rank is ~80 MB of row
#: numbers.
WINDOW_CACHE = 3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """Which units every DP rank receives at one step, in which micro-batch. Rows sorted by (rank, micro, position).

    ``position`` is a unit's place in the step's global unit order, so the order of rows inside
    a micro-batch is fixed by the global sequence, not by the balancer.
    """

    step: int
    dp_size: int
    rank: np.ndarray  # int32[n]
    micro: np.ndarray  # int32[n]
    source: np.ndarray  # int32[n] index into the planner's sources
    sample_id: np.ndarray  # int64[n]
    piece: np.ndarray  # int32[n]
    tokens: np.ndarray  # int32[n]
    cost: np.ndarray  # float64[n]
    num_micro: np.ndarray  # int32[dp_size] micro-batches of each rank (>= 1; one empty one for a rank without units)

    def __len__(self) -> int:
        return int(self.rank.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (what keeping the plan costs)."""
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))

    def rank_costs(self) -> np.ndarray:
        """float64[dp_size]: total cost of each rank's units."""
        return np.bincount(self.rank, weights=self.cost, minlength=self.dp_size).astype(np.float64)

    def for_ranks(self, ranks: Sequence[int]) -> "StepPlan":
        """The rows of those ranks only (same step, dp_size and num_micro), in row order.

        A leader answers every constructor's plan request with this (at DP 4096, 512 requests
        of 8 ranks a step), so it costs the rows it returns, not the plan's: each rank's rows
        are one run of the rank-sorted rows, found by binary search."""
        wanted = np.unique(np.asarray(list(ranks), dtype=np.int64))
        if wanted.size and (int(wanted[0]) < 0 or int(wanted[-1]) >= self.dp_size):
            raise ValueError(f"ranks must lie in [0, {self.dp_size}), got {wanted.tolist()!r}")
        if self._rank_sorted():
            keys = wanted.astype(self.rank.dtype)  # in the rows' own type: no cast of every row
            lo = np.searchsorted(self.rank, keys, side="left")
            size = np.searchsorted(self.rank, keys, side="right") - lo
            # every wanted rank's run, one after another: lo[j], lo[j] + 1, ... for each j
            keep = np.arange(int(size.sum()), dtype=np.int64) + np.repeat(lo - (np.cumsum(size) - size), size)
        else:  # rows not in rank order: only a hand-made plan (the planner sorts its rows)
            keep = np.flatnonzero(np.isin(self.rank, wanted))
        return StepPlan(
            step=self.step,
            dp_size=self.dp_size,
            rank=self.rank[keep],
            micro=self.micro[keep],
            source=self.source[keep],
            sample_id=self.sample_id[keep],
            piece=self.piece[keep],
            tokens=self.tokens[keep],
            cost=self.cost[keep],
            num_micro=self.num_micro,
        )

    def _rank_sorted(self) -> bool:
        """Whether the rows are in rank order (checked once per plan: a plan is immutable)."""
        known = self.__dict__.get("_sorted")
        if known is None:
            known = bool(self.rank.size < 2 or (self.rank[1:] >= self.rank[:-1]).all())
            object.__setattr__(self, "_sorted", known)  # a cache, not a field: equal either way
        return known

    def micro_batches(self, rank: int) -> list[np.ndarray]:
        """Row indices of each micro-batch of ``rank``, in micro-batch order."""
        if not 0 <= int(rank) < self.dp_size:
            raise ValueError(f"rank must lie in [0, {self.dp_size}), got {rank!r}")
        lo = int(np.searchsorted(self.rank, rank, side="left"))
        hi = int(np.searchsorted(self.rank, rank, side="right"))
        micro = self.micro[lo:hi]
        bounds = np.searchsorted(micro, np.arange(int(self.num_micro[rank]) + 1), side="left")
        return [np.arange(lo + bounds[i], lo + bounds[i + 1], dtype=np.int64) for i in range(bounds.size - 1)]


def draws_for_tokens(tokens_per_step: int, schedule: MixtureSchedule, sources: Sequence[SourceUnits]) -> int:
    """Units drawn per step for a global batch of ``tokens_per_step`` tokens: the budget over the
    mean unit length of the schedule's first piece (at least 1). The mean unit length is the
    weights' mean of each source's mean; over a ``linear`` piece the weights (rows summing to 1)
    and so that mean move linearly, and the piece's mean is the mean of its two ends; otherwise
    it is the first point's. A pure function of metadata. A job's plan is cut at every mixture
    point under a token budget (:func:`fabricd.plan_changes.plan_segments`), so each piece gets
    its own count."""
    by_name = {s.name: s for s in sources}
    per_unit = np.array([float(np.sum(by_name[n].tokens, dtype=np.float64)) / len(by_name[n]) if len(by_name[n]) else 0.0
                         for n in schedule.sources], dtype=np.float64)
    rows = schedule.rows[:2] if schedule.kind == "linear" else schedule.rows[:1]
    mean = math.fsum(math.fsum((row * per_unit).tolist()) for row in rows) / len(rows)
    if mean <= 0:
        raise PlanError("tokens_per_step needs units with tokens under the mixture's first point")
    return max(1, int(round(int(tokens_per_step) / mean)))


#: Windows of at least this many units draw their steps on several threads (smaller ones: the
#: threads would cost more than they save).
DRAW_THREADS_FROM = 1 << 18


def _draw_threads() -> int:
    """Threads for a window's draws: ``plan_threads()`` (a bad ``FABRICD_PLAN_THREADS``, which
    stops a daemon at start, plans on one thread elsewhere, e.g. ``fabricctl expect``)."""
    try:
        return plan_threads()
    except ValueError:
        return 1


class Planner:
    """Plans steps: global sequence → (composition) → costs → balance over DP ranks →
    micro-batch packing.

    Promises: ``plan(step, dp_size)`` is a pure function of the constructor inputs and its
    arguments. Without composition the multiset of units of a step does not depend on
    ``dp_size``; with ``compose = "outliers"`` it depends on the composition DP size of the step's
    window (``dp_history``, or ``dp_size`` when no history is given), never on call order.

    A planner may plan one *segment* of a job's steps, ``[start_step, end_step)`` (a plan change
    starts a new segment; see :mod:`fabricd.planner.segments`): its mixture schedule is then read
    in steps from ``start_step``, its sources' draws continue from ``start_draws`` (in schedule
    order, permutations keyed by ``source_keys``), and its composition windows start at
    ``start_step`` and stop at ``end_step`` (the last one shorter), so no window mixes two
    segments' units.
    """

    def __init__(
        self,
        *,
        seed: int,
        samples_per_step: int,
        micro_batch_tokens: int,
        schedule: MixtureSchedule,
        cost: CostModel,
        method: str,
        sources: Sequence[SourceUnits],
        compose: str = "none",
        max_delay_steps: int = 0,
        size_by_tokens: bool = False,
        dp_history: Sequence[tuple[int, int]] = (),
        start_step: int = 0,
        end_step: int | None = None,
        start_draws: Sequence[int] = (),
        source_keys: Sequence[int] = (),
    ) -> None:
        if compose not in COMPOSE_MODES:
            raise ValueError(f"unknown compose mode {compose!r}; expected one of {list(COMPOSE_MODES)}")
        if isinstance(max_delay_steps, bool) or int(max_delay_steps) != max_delay_steps \
                or not 0 <= int(max_delay_steps) <= MAX_DELAY_STEPS:
            raise ValueError(f"max_delay_steps must be an integer in [0, {MAX_DELAY_STEPS}], got {max_delay_steps!r}")
        history = check_dp_history(dp_history)
        self.compose = compose
        self.window = int(max_delay_steps) + 1 if compose != "none" else 1
        self.size_by_tokens = bool(size_by_tokens)
        self.dp_history = history
        self.start_step = int(start_step)
        self.end_step = None if end_step is None else int(end_step)
        if self.start_step < 0 or (self.end_step is not None and self.end_step <= self.start_step):
            raise ValueError(f"a plan segment needs 0 <= start_step < end_step, got [{start_step}, {end_step})")
        self._windows: OrderedDict[tuple[int, int], list[np.ndarray]] = OrderedDict()
        self._window_lock = threading.Lock()  # guards _windows and _composing, never held while composing
        self._composing: dict[tuple[int, int], threading.Event] = {}  # set when that window is done (or failed)
        if method not in BALANCERS:
            raise ValueError(f"unknown balance method {method!r}; expected one of {sorted(BALANCERS)}")
        if isinstance(micro_batch_tokens, bool) or int(micro_batch_tokens) != micro_batch_tokens or int(micro_batch_tokens) < 1:
            raise ValueError(f"micro_batch_tokens must be an integer >= 1, got {micro_batch_tokens!r}")
        self.sources: tuple[SourceUnits, ...] = tuple(sources)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise PlanError(f"source names must be unique, got {names!r}")
        if sorted(names) != sorted(schedule.sources):
            raise PlanError(f"planner sources {names!r} differ from the mixture schedule's {list(schedule.sources)!r}")
        self.micro_batch_tokens = int(micro_batch_tokens)
        self.schedule = schedule
        for s in self.sources:
            if len(s) and int(s.tokens.max()) > self.micro_batch_tokens:
                raise PlanError(
                    f"source {s.name!r} has a unit of {int(s.tokens.max())} tokens, "
                    f"more than micro_batch_tokens {self.micro_batch_tokens}"
                )
        by_name = {s.name: i for i, s in enumerate(self.sources)}
        # The global sequence indexes sources in schedule order; rows report planner order.
        self._seq_to_planner = np.asarray([by_name[n] for n in schedule.sources], dtype=np.int32)
        ordered = [self.sources[i] for i in self._seq_to_planner]
        self.sequence = GlobalSequence(
            seed=seed, samples_per_step=samples_per_step, schedule=schedule, source_sizes=[len(s) for s in ordered],
            start_draws=start_draws, source_keys=source_keys,
        )
        self.cost = cost
        self.method = method
        self.samples_per_step = int(samples_per_step)
        # Per-unit metadata concatenated once, so a step gathers with one fancy index.
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in ordered])]).astype(np.int64)
        self._sample_id = np.concatenate([s.sample_id for s in ordered]).astype(np.int64, copy=False)
        self._piece = np.concatenate([s.piece for s in ordered]).astype(np.int32, copy=False)
        # each unit's source, in planner order (a gather per step instead of a binary search)
        self._unit_source = np.repeat(self._seq_to_planner.astype(np.min_scalar_type(max(1, len(ordered)))),
                                      [len(s) for s in ordered])
        self._tokens = np.concatenate([s.tokens for s in ordered]).astype(np.int32, copy=False)
        self._images = np.concatenate([s.images for s in ordered]).astype(np.int32, copy=False)
        self._patches = self._patches_sq = None  # vision work per unit, when the cost model weighs it
        if (cost.vision_attention or cost.vision_linear) and any(s.patches is not None for s in ordered):
            zeros = lambda s: np.zeros(len(s), np.float64)  # noqa: E731
            self._patches = np.concatenate([s.patches if s.patches is not None else zeros(s) for s in ordered])
            self._patches_sq = np.concatenate([s.patches_sq if s.patches_sq is not None else zeros(s)
                                               for s in ordered])
        self._unit_cost = cost(self._tokens, self._images, self._patches, self._patches_sq)
        # each unit's place among the distinct unit costs, largest 0: a step sorts its units by
        # cost with radix passes over these (one up to 2**16 distinct costs), not by comparing floats
        self._unit_rank = descending_rank(self._unit_cost)

    def plan(self, step: int, dp_size: int) -> StepPlan:
        """The plan of ``step`` for ``dp_size`` DP ranks."""
        if isinstance(dp_size, bool) or int(dp_size) != dp_size or int(dp_size) < 1:
            raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")
        dp = int(dp_size)
        if self.samples_per_step < dp:
            raise PlanError(
                f"samples_per_step {self.samples_per_step} < dp_size {dp}: some DP rank would get no data"
            )
        if self.compose == "none":
            src, unit = self.sequence.step_units(self._local(step))
            row = self._offsets[src] + unit
        else:
            row = self.composed_rows(step, dp)
        tokens = self._tokens[row]
        cost = self._cost(row)
        by_cost = stable_order(self._unit_rank[row])  # = np.argsort(-cost, kind="stable")
        rank = balance(cost, dp, self.method, order=by_cost)
        micro, num_micro = pack_micro_batches_grouped(rank, dp, tokens, cost, self.micro_batch_tokens,
                                                      by_cost=by_cost)
        order, rank, micro = rows_by_rank_and_micro(rank, micro, dp)  # = np.lexsort((micro, rank))
        row = row[order]
        return StepPlan(
            step=int(step),
            dp_size=dp,
            rank=rank,
            micro=micro,
            source=self._unit_source[row].astype(np.int32),
            sample_id=self._sample_id[row],
            piece=self._piece[row],
            tokens=tokens[order],
            cost=cost[order],
            # a rank without units (a composed step with fewer units than ranks, after a DP-size
            # change) still gets one, empty, micro-batch: every rank receives every step
            num_micro=np.maximum(num_micro, 1).astype(np.int32, copy=False),
        )

    # the segmented planner's interface (fabricd.planner.segments), for a planner of one segment
    @property
    def starts(self) -> tuple[int, ...]:
        """The steps its segments start at: just its own start."""
        return (self.start_step,)

    def segment(self, step: int) -> "Planner":
        return self

    def sources_at(self, step: int) -> tuple[SourceUnits, ...]:
        """The units the sources have at ``step``: the same at every step."""
        return self.sources

    def _local(self, step: int) -> int:
        """``step`` counted from the segment's start; PlanError for a step outside the segment."""
        step = self.sequence._check_step(step)
        if step < self.start_step or (self.end_step is not None and step >= self.end_step):
            raise PlanError(f"step {step} is outside this plan segment [{self.start_step}, {self.end_step})")
        return step - self.start_step

    def _cost(self, row: np.ndarray) -> np.ndarray:
        # the cost model is elementwise: gathering each unit's cost, computed once, gives the same
        # values as computing it for the gathered units
        return self._unit_cost[row]

    def composition_dp(self, step: int, dp_size: int) -> int:
        """The DP size the window of ``step`` is composed for (``dp_size`` without a history)."""
        if not self.dp_history:
            return int(dp_size)
        local = int(step) - self.start_step
        return composition_dp(self.dp_history, self.start_step + (local // self.window) * self.window)

    def composed_rows(self, step: int, dp_size: int) -> np.ndarray:
        """Global unit rows of ``step`` under composition, in draw order (see
        :mod:`fabricd.planner.compose`); the window is composed once and kept."""
        local = self._local(step)
        k = local // self.window
        return self._window(k, self.composition_dp(step, dp_size))[local - k * self.window]

    def prepare(self, step: int, dp_size: int) -> None:
        """Compose the window holding ``step`` now, if it is not (a plan of any of its steps then
        finds it ready): the plan worker calls it for the next window while other threads plan
        this one's steps. Nothing without composition."""
        if self.compose != "none":
            self.composed_rows(step, dp_size)

    def next_window(self, step: int) -> int | None:
        """The first step of the composition window after the one holding ``step``, or None
        (no composition, or ``step``'s window is the segment's last)."""
        self._local(step)
        if self.compose == "none":
            return None
        nxt = window_bounds((self.start_step,), self.window, int(step))[1]
        return None if self.end_step is not None and nxt >= self.end_step else nxt

    def _window(self, k: int, cdp: int) -> list[np.ndarray]:
        """The ``k``-th window's steps' rows, composed for ``cdp`` ranks: cached, or composed by
        this thread, or awaited from the thread composing it. Composing holds no lock, so plans of
        other windows' steps go on meanwhile; a failed composition is tried again by a waiter
        (raising the same error in its turn: composing is a pure function)."""
        key = (k, cdp)
        while True:
            with self._window_lock:
                parts = self._windows.get(key)
                if parts is not None:
                    self._windows.move_to_end(key)
                    return parts
                busy = self._composing.get(key)
                if busy is None:
                    busy = self._composing[key] = threading.Event()
                    break
            busy.wait()
        try:
            parts = self._compose(k, cdp)
            with self._window_lock:
                self._windows[key] = parts
                while len(self._windows) > WINDOW_CACHE:
                    self._windows.popitem(last=False)
            return parts
        finally:
            with self._window_lock:
                del self._composing[key]
            busy.set()

    def _compose(self, k: int, dp: int) -> list[np.ndarray]:
        W = self.window
        if self.end_step is not None:  # the segment's last window ends with the segment
            W = min(W, self.end_step - self.start_step - k * self.window)
        B = self.samples_per_step  # every step draws exactly this many: the window's rows, written in place
        row = np.empty(W * B, dtype=np.int64)
        first = k * self.window

        def draw(i: int) -> None:
            src, unit = self.sequence.step_units(first + i)
            np.add(self._offsets[src], unit, out=row[i * B:(i + 1) * B])

        threads = min(W, _draw_threads()) if W * B >= DRAW_THREADS_FROM else 1
        if threads > 1:  # each step's draws into its own slice: the same rows, sooner
            with ThreadPoolExecutor(threads, thread_name_prefix="plan-draws") as pool:
                list(pool.map(draw, range(W)))
        else:
            for i in range(W):
                draw(i)
        drawn = np.repeat(np.arange(W, dtype=step_dtype(W)), B)
        size = self._tokens[row] if self.size_by_tokens else np.ones(row.size, dtype=np.int8)
        where = compose_window(self._cost(row), size, steps=W, dp=dp, drawn=drawn)
        return split_by_step(where, W, values=row)
