"""The planner: one step's units, balanced over DP ranks and packed into micro-batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fabricd.errors import PlanError
from fabricd.planner.balance import BALANCERS, balance, pack_micro_batches_grouped
from fabricd.planner.cost import CostModel
from fabricd.planner.mixture import MixtureSchedule
from fabricd.planner.sequence import GlobalSequence, SourceUnits

__all__ = ["StepPlan", "Planner"]

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
    num_micro: np.ndarray  # int32[dp_size] micro-batches of each rank (>= 1 whenever the rank has units)

    def __len__(self) -> int:
        return int(self.rank.shape[0])

    def rank_costs(self) -> np.ndarray:
        """float64[dp_size]: total cost of each rank's units."""
        return np.bincount(self.rank, weights=self.cost, minlength=self.dp_size).astype(np.float64)

    def for_ranks(self, ranks: Sequence[int]) -> "StepPlan":
        """The rows of those ranks only (same step, dp_size and num_micro)."""
        wanted = np.asarray(list(ranks), dtype=np.int64)
        if wanted.size and (int(wanted.min()) < 0 or int(wanted.max()) >= self.dp_size):
            raise ValueError(f"ranks must lie in [0, {self.dp_size}), got {wanted.tolist()!r}")
        keep = np.isin(self.rank, wanted)
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

    def micro_batches(self, rank: int) -> list[np.ndarray]:
        """Row indices of each micro-batch of ``rank``, in micro-batch order."""
        if not 0 <= int(rank) < self.dp_size:
            raise ValueError(f"rank must lie in [0, {self.dp_size}), got {rank!r}")
        lo = int(np.searchsorted(self.rank, rank, side="left"))
        hi = int(np.searchsorted(self.rank, rank, side="right"))
        micro = self.micro[lo:hi]
        bounds = np.searchsorted(micro, np.arange(int(self.num_micro[rank]) + 1), side="left")
        return [np.arange(lo + bounds[i], lo + bounds[i + 1], dtype=np.int64) for i in range(bounds.size - 1)]


class Planner:
    """Plans steps: global sequence → costs → balance over DP ranks → micro-batch packing.

    Promises: ``plan(step, dp_size)`` is a pure function of the constructor inputs and its
    arguments; the multiset of units of a step does not depend on ``dp_size``.
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
    ) -> None:
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
            seed=seed, samples_per_step=samples_per_step, schedule=schedule, source_sizes=[len(s) for s in ordered]
        )
        self.cost = cost
        self.method = method
        self.samples_per_step = int(samples_per_step)
        # Per-unit metadata concatenated once, so a step gathers with one fancy index.
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in ordered])]).astype(np.int64)
        self._sample_id = np.concatenate([s.sample_id for s in ordered]).astype(np.int64, copy=False)
        self._piece = np.concatenate([s.piece for s in ordered]).astype(np.int32, copy=False)
        self._tokens = np.concatenate([s.tokens for s in ordered]).astype(np.int32, copy=False)
        self._images = np.concatenate([s.images for s in ordered]).astype(np.int32, copy=False)
        self._patches = self._patches_sq = None  # vision work per unit, when the cost model weighs it
        if (cost.vision_attention or cost.vision_linear) and any(s.patches is not None for s in ordered):
            zeros = lambda s: np.zeros(len(s), np.float64)  # noqa: E731
            self._patches = np.concatenate([s.patches if s.patches is not None else zeros(s) for s in ordered])
            self._patches_sq = np.concatenate([s.patches_sq if s.patches_sq is not None else zeros(s)
                                               for s in ordered])

    def plan(self, step: int, dp_size: int) -> StepPlan:
        """The plan of ``step`` for ``dp_size`` DP ranks."""
        if isinstance(dp_size, bool) or int(dp_size) != dp_size or int(dp_size) < 1:
            raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")
        dp = int(dp_size)
        if self.samples_per_step < dp:
            raise PlanError(
                f"samples_per_step {self.samples_per_step} < dp_size {dp}: some DP rank would get no data"
            )
        src, unit = self.sequence.step_units(step)
        row = self._offsets[src] + unit
        tokens = self._tokens[row]
        vision = (self._patches[row], self._patches_sq[row]) if self._patches is not None else (None, None)
        cost = self.cost(tokens, self._images[row], *vision)
        rank = balance(cost, dp, self.method)
        micro, num_micro = pack_micro_batches_grouped(rank, dp, tokens, cost, self.micro_batch_tokens)
        order = np.lexsort((np.arange(row.size), micro, rank))
        row = row[order]
        return StepPlan(
            step=int(step),
            dp_size=dp,
            rank=rank[order].astype(np.int32, copy=False),
            micro=micro[order].astype(np.int32, copy=False),
            source=self._seq_to_planner[src[order]],
            sample_id=self._sample_id[row],
            piece=self._piece[row],
            tokens=tokens[order],
            cost=cost[order],
            num_micro=num_micro.astype(np.int32, copy=False),
        )
