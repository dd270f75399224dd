"""Expected batches, computed offline from the job spec alone (no daemon, no sockets).

The same planner (``fabricd.job.build_planner``), the same sample loader and the same assembly
function (``fabricd.assemble``) as the fabric's data path, run in this process. Comparing what
trainers received with this, batch for batch, is how delivery is verified: nothing lost,
nothing repeated, nothing altered.

The log's plan changes are part of the input too (``plan_changes``, see :func:`log_plan_changes`):
the planner is segmented at them exactly as the daemons' is, and a unit is transformed under the
spec in effect at its step.

The log's skip records are part of the input (the determinism contract): pass them as ``skips``
(``(source, sample_id, piece, step)``, as ``FabricState.skipped[job]`` holds them; see
:func:`skips_from_logs` to read them from checkpoint-log directories). A recorded unit is dropped
from its step whether or not it loads here; a unit that fails here without a record is dropped
too (the fabric records such a unit before it delivers the step) and counted in
``BatchOracle.unrecorded``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .assemble import UnitKey, apply_skip_records, assemble_micro_batch
from .config import JobSpec
from .cluster.records import PlanChange
from .plan_changes import plan_segments, spec_at
from .job import build_planner, check_vocabulary, dp_history_of, job_tokenizer, open_sources, transform_spec
from .planner import Planner
from .sources.transform import SampleLoader

__all__ = ["ExpectedBatch", "BatchOracle", "expected_batches", "skips_from_logs", "newest_log_state", "log_skips",
           "log_dp_history", "log_plan_changes"]

log = logging.getLogger(__name__)

SkipRecord = tuple[str, int, int, int]  # (source, sample_id, piece, step), as the log records a skip


@dataclass(frozen=True)
class ExpectedBatch:
    step: int
    dp_rank: int
    micro_batch: int
    num_micro_batches: int
    checksum: str
    samples: int
    tokens: int
    skipped: int

    def key(self) -> tuple[int, int, int]:
        return (self.step, self.dp_rank, self.micro_batch)

    def to_dict(self) -> dict:
        return asdict(self)


class BatchOracle:
    """Computes any (step, rank) batch of a job in-process, exactly as the fabric builds it."""

    def __init__(self, spec: JobSpec, *, dp_size: int | None = None, progress: bool = False,
                 skips: Iterable[SkipRecord] = (), dp_history: Sequence[tuple[int, int]] = (),
                 plan_changes: Sequence[PlanChange] = ()) -> None:
        self.spec = spec
        self.segments = plan_segments(spec, plan_changes)
        self.dp_size = dp_size or spec.topology.dp_size
        self.unrecorded = 0  # units that failed here without a skip record (dropped all the same)
        self.skips: dict[int, set[UnitKey]] = {}
        index = {s.name: i for i, s in enumerate(spec.sources)}
        for source, sample_id, piece, step in skips:
            if source not in index:
                log.warning("skip record of unknown source %r (sample %d, step %d) ignored", source, sample_id, step)
                continue
            self.skips.setdefault(int(step), set()).add((index[source], int(sample_id), int(piece)))
        tokenizer = job_tokenizer(spec)
        indexes = open_sources(spec, progress=progress, tokenizer=tokenizer)
        check_vocabulary(indexes, tokenizer)  # the job would fail: so does its expectation
        self.planner: Planner = build_planner(spec, indexes, dp_history, plan_changes)
        self._indexes, self._tokenizer = indexes, tokenizer
        self._loaders: dict[tuple, SampleLoader] = {}  # (source, its transform) → loader
        self.loaders = [self.loader(i, 0) for i in range(len(spec.sources))]  # under the spec's own transform

    def loader(self, source: int, step: int) -> SampleLoader:
        """The loader of the ``source``-th source under the spec in effect at ``step``."""
        name = self.spec.sources[source].name
        transform = transform_spec(spec_at(self.segments, step), name)
        key = (name, transform)
        if key not in self._loaders:
            self._loaders[key] = SampleLoader(self._indexes[name], transform, tokenizer=self._tokenizer)
        return self._loaders[key]

    def step(self, step: int) -> Iterator[ExpectedBatch]:
        """Every micro-batch of every rank at ``step``, in (rank, micro) order."""
        plan = self.planner.plan(step, self.dp_size)
        loaded: list = [None] * len(plan.rank)
        for src in np.unique(plan.source).tolist():
            sel = np.flatnonzero(plan.source == src)
            for i, unit in zip(sel.tolist(), self.loader(src, step).load(plan.sample_id[sel], plan.piece[sel])):
                loaded[i] = unit if not isinstance(unit, Exception) else unit.reason
        loaded, unrecorded = apply_skip_records(loaded, source_ids=plan.source, sample_ids=plan.sample_id,
                                                pieces=plan.piece, recorded=self.skips.get(step, ()))
        self.unrecorded += len(unrecorded)
        for rank in range(self.dp_size):
            micro_rows = plan.micro_batches(rank)
            for micro, rows in enumerate(micro_rows):
                mb = assemble_micro_batch([loaded[i] for i in rows.tolist()], source_ids=plan.source[rows],
                                          sample_ids=plan.sample_id[rows], pieces=plan.piece[rows],
                                          images=self.spec.images)
                yield ExpectedBatch(step=step, dp_rank=rank, micro_batch=micro, num_micro_batches=len(micro_rows),
                                    checksum=mb.checksum, samples=mb.samples, tokens=mb.tokens,
                                    skipped=len(mb.skipped))


def expected_batches(spec: JobSpec, steps: Iterable[int], *, dp_size: int | None = None,
                     progress: bool = False, skips: Iterable[SkipRecord] = (),
                     dp_history: Sequence[tuple[int, int]] = (),
                     plan_changes: Sequence[PlanChange] = ()) -> Iterator[ExpectedBatch]:
    """The expected batches of ``steps``, for ``dp_size`` ranks (the spec's by default), given
    the log's skip records ``skips``, composition DP-size history ``dp_history`` and plan
    changes ``plan_changes``."""
    oracle = BatchOracle(spec, dp_size=dp_size, progress=progress, skips=skips, dp_history=dp_history,
                         plan_changes=plan_changes)
    for step in steps:
        yield from oracle.step(step)


def newest_log_state(directories: Iterable[Path]):
    """The cluster state in the most up-to-date of these checkpoint-log directories (highest
    (term, seq): the one that holds every committed record).

    Read logs no daemon is writing (a stopped daemon's, or a copy): opening a log cuts a torn
    tail. Raises ``LogError`` for a log that cannot be read and ``ValueError`` for no directory.
    """
    from .cluster.log import CheckpointLog

    best = None
    for directory in directories:
        lg = CheckpointLog(Path(directory), fsync=False)
        try:
            state = lg.open()
            position = lg.last_position
        finally:
            lg.close()
        if best is None or position > best[0]:
            best = (position, state)
    if best is None:
        raise ValueError("no checkpoint-log directory given")
    return best[1]


def log_skips(state, job: str) -> set[SkipRecord]:
    """The skip records of ``job`` in a cluster state (see :func:`newest_log_state`)."""
    return set(state.skipped.get(job, ()))


def log_dp_history(state, job: str) -> tuple[tuple[int, int], ...]:
    """The composition DP-size history of ``job`` in a cluster state (``(from_step, dp_size)``
    pairs; empty: the spec's dp_size throughout)."""
    entry = state.jobs.get(job)
    return dp_history_of(entry.extra) if entry is not None else ()


def log_plan_changes(state, job: str) -> tuple[PlanChange, ...]:
    """The plan changes of ``job`` in a cluster state, in log order. Every record of a log a
    stopped daemon left is taken (the most up-to-date log holds every committed one)."""
    return state.committed_plan_changes(job, state.last_seq)


def skips_from_logs(directories: Iterable[Path], job: str) -> set[SkipRecord]:
    """The skip records of ``job`` in the most up-to-date of these checkpoint-log directories."""
    return log_skips(newest_log_state(directories), job)
