"""A submitted job on a daemon: its sources' indexes, its planner, its role processes.

``open_sources`` and ``build_planner`` are shared with ``fabricd.expect`` so the offline expected
checksums come from the very planner the daemon runs.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np

from fabric_client import protocol
from fabric_client.limits import MAX_LIST_ITEMS, MAX_STEP

from .cluster.placement import constructor_id, loader_prefix
from .config import JobSpec
from . import spec_bounds as B
from .errors import FabricdError, PlanError, SourceError
from .images import ImageSpec
from .planner import CostModel, MixtureSchedule, Planner, build_units
from .cluster.records import PlanChange
from .plan_changes import describe_change, plan_segments, spec_at
from .planner.compose import check_dp_history
from .planner.segments import SegmentHead, SegmentedPlanner, localize_points
from .planner.plan import StepPlan, draws_for_tokens
from .planner.units import SourceUnits
from .planner.worker import PlanWorker
from .sources.index import SourceIndex, open_index, require_samples, skip_reasons
from .sources.transform import TransformSpec, image_tokens_per_sample, truncated_lengths
from .text import Tokenizer, load_tokenizer

__all__ = ["JobRuntime", "SegmentPlans", "open_sources", "build_planner", "dp_history_of", "job_tokenizer", "transform_spec", "source_units", "check_vocabulary", "PLAN_COLUMNS"]

log = logging.getLogger(__name__)

PLAN_COLUMNS = (("rank", "int32"), ("micro", "int32"), ("source", "int32"), ("sample_id", "int64"),
                ("piece", "int32"))
#: one skip record: (source name, sample_id, piece, step), as ``FabricState.skipped[job]`` holds them
SkipUnit = tuple[str, int, int, int]

#: Plans a job's plan worker keeps (every constructor asks for each step; a late one finds it here)...
PLAN_CACHE_STEPS = 128
#: ...and at most this many bytes of them: 22 steps at DP 4096 with 64k tokens a rank (23 MB a
#: plan), all 128 up to DP ~700. A step asked for again after it left is planned again.
PLAN_CACHE_BYTES = 512 << 20
#: Steps planned past the highest step asked for, so the next requests find their plan ready.
PLAN_AHEAD_STEPS = 4
#: Most steps waiting to be planned; past it the farthest is dropped (its constructor asks again).
PLAN_QUEUE_STEPS = 256
#: A plan running longer than this is logged, counted (plans_over_deadline) and shown in status.
PLAN_DEADLINE_S = 30.0


def plan_columns(part: StepPlan) -> tuple[np.ndarray, ...]:
    """The ``PlanReply`` frames of a plan's rows: its ``PLAN_COLUMNS``, contiguous, in their wire types."""
    return tuple(np.ascontiguousarray(getattr(part, name), dtype) for name, dtype in PLAN_COLUMNS)


def _by_step(units: Collection[SkipUnit], names: Mapping[str, int]) -> dict[int, list[list[int]]]:
    by_step: dict[int, list[list[int]]] = {}
    for source, sample_id, piece, at in units:
        if source in names:
            by_step.setdefault(at, []).append([names[source], sample_id, piece])
    for rows in by_step.values():
        rows.sort()
    return by_step


def dp_history_of(extra: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """The composition DP-size history a ``job_submitted`` record carries in its ``extra``
    (``dp_history``: [[from_step, dp_size], ...]); empty when it has none or it is malformed
    (then the spec's dp_size holds from step 0, and a warning says so)."""
    raw = extra.get("dp_history") if isinstance(extra, Mapping) else None
    if raw is None:
        return ()
    try:
        return check_dp_history(raw)
    except (TypeError, ValueError):
        log.warning("ignoring a malformed dp_history in a job record: %r", raw)
        return ()


def job_tokenizer(spec: JobSpec, *, roots: Sequence[Path] | None = None, parallel: bool = True) -> Tokenizer:
    """The job's tokenizer (``[tokenizer]``), its file confined to ``roots`` when given."""
    return load_tokenizer(spec.tokenizer, roots=roots, parallel=parallel)


def transform_spec(spec: JobSpec, source: str) -> TransformSpec:
    """How the units of ``source`` are made: its bucket's context and policy, the job's images."""
    s = next(x for x in spec.sources if x.name == source)
    bucket = spec.bucket(s.bucket)
    return TransformSpec(max_seq_len=bucket.max_seq_len, long_samples=bucket.long_samples, images=spec.images)


def open_sources(spec: JobSpec, *, index_dir: Path | None = None, progress: bool = False,
                 roots: Sequence[Path] | None = None, tokenizer: Tokenizer | None = None) -> dict[str, SourceIndex]:
    """Open (building or reusing) the index of every source of ``spec`` under the job's tokenizer
    (``tokenizer``, loaded from the spec when None).

    Indexes live next to their source; ``index_dir`` is where they go when a source is read-only.
    ``roots``: the node's data roots, which every source must resolve inside (None: not confined,
    for offline tools).
    """
    tok = tokenizer if tokenizer is not None else job_tokenizer(spec, roots=roots)
    return {s.name: open_index(s.name, s.path, format=s.format, index_dir=index_dir, progress=progress, roots=roots,
                               tokenizer=tok)
            for s in spec.sources}


def source_units(name: str, idx: SourceIndex, images: ImageSpec, *, max_seq_len: int, long_samples: str,
                 vision: bool = False) -> SourceUnits:
    """The units of one source and their lengths, from its index alone: what the planner plans.
    ``vision``: whether the cost model weighs vision work (then units carry their patch counts)."""
    image_tokens, patches, patches_sq = image_tokens_per_sample(idx, images)
    return build_units(name, idx.text_tokens, idx.num_images, max_seq_len=max_seq_len, long_samples=long_samples,
                       image_tokens=image_tokens, patches=patches if vision else None,
                       patches_sq=patches_sq if vision else None, exact=truncated_lengths(idx, images, max_seq_len))


def check_vocabulary(indexes: Mapping[str, SourceIndex], tokenizer: Tokenizer) -> None:
    """Refuse (SourceError) a pre-tokenized source whose largest token id, known from its index,
    lies outside the job tokenizer's vocabulary: it was tokenized with another tokenizer, and
    every sample would fail to load. (Where the index does not know it, the loader checks each
    sample and skips one that does not fit, naming the id.)"""
    for name, idx in indexes.items():
        if idx.max_token_id >= tokenizer.vocab_size:
            raise SourceError(f"source {name!r} holds token id {idx.max_token_id}, outside the job tokenizer's "
                              f"vocabulary of {tokenizer.vocab_size} ([tokenizer] kind = {tokenizer.kind!r}); "
                              "set [tokenizer] to the tokenizer the source was tokenized with")


def build_planner(spec: JobSpec, indexes: Mapping[str, SourceIndex],
                  dp_history: Sequence[tuple[int, int]] = (),
                  plan_changes: Sequence[PlanChange] = ()) -> Planner | SegmentedPlanner:
    """The job's planner from its spec, its sources' metadata, the log's DP-size history
    (``(from_step, dp_size)`` pairs; empty: the spec's dp_size from step 0) and the log's plan
    changes (committed ones, in log order), nothing else: a :class:`Planner` without changes,
    else a :class:`SegmentedPlanner` of one planner per segment (``fabricd.planner.segments``),
    each built when first used (:class:`SegmentPlans`)."""
    return SegmentPlans(spec, indexes, dp_history).planner(plan_changes)


#: Segment planners a job keeps built: the segments its steps are being planned in (a boundary
#: or two) and the one a change was just checked in. Any other is rebuilt, the same, when asked.
KEEP_SEGMENT_PLANNERS = 4


class SegmentPlans:
    """A job's planners across its plan changes, built once and reused as changes come.

    Why: online mixing logs a plan change every few steps, thousands over a run; rebuilding every
    segment's planner for each new change is work quadratic in the changes, and holding one
    planner (its unit arrays) per segment is memory linear in them. Here

    - each source's units under each context (``max_seq_len``, ``long_samples``) are built once;
    - a segment's :class:`SegmentHead` (its carried draws, schedule, draws per step) is kept,
      keyed by the previous segment's head, its start and its spec object (``plan_segments``
      returns the same spec objects for an unchanged prefix of changes), so a change appended at
      step N computes one new head: every earlier one is found, never recomputed;
    - a segment's planner is built from its head and end only when a step of it is planned, and
      only the ``keep`` most recently used are kept (an appended change truncates the last
      segment: the one planner rebuilt with its new end).

    The planners are those :func:`build_planner` built before (same inputs, same order): plans
    are identical. Safe to use from several threads (the plan worker, a replan, the leader's
    check of a change).
    """

    def __init__(self, spec: JobSpec, indexes: Mapping[str, SourceIndex],
                 dp_history: Sequence[tuple[int, int]] = (), *, keep: int = KEEP_SEGMENT_PLANNERS) -> None:
        self.spec, self.indexes, self.dp_history = spec, indexes, tuple(dp_history)
        self.keep = max(1, int(keep))
        self._vision = bool(spec.cost.vision_attention or spec.cost.vision_linear)
        self._lock = threading.RLock()
        self._units: dict[tuple[str, int, str], SourceUnits] = {}
        # (id(previous head) or 0, start, id(spec)) → (previous head, spec, head): the first two
        # held, so their ids are nobody else's while the entry lives
        self._heads: OrderedDict[tuple[int, int, int], tuple[SegmentHead | None, JobSpec, SegmentHead]] = OrderedDict()
        self._planners: OrderedDict[tuple[int, int | None], tuple[SegmentHead, Planner]] = OrderedDict()
        # a segment planner being built → its builder's lock: another thread wanting the same
        # one waits for it rather than building a second (whose windows would be composed again)
        self._building: dict[tuple[int, int | None], threading.Lock] = {}
        #: heads computed and segment planners built, over this object's life (tests count them)
        self.counters = {"heads_built": 0, "planners_built": 0}

    def planner(self, changes: Sequence[PlanChange] = (), *, check: bool = False) -> Planner | SegmentedPlanner:
        """The job's planner with ``changes`` (as :func:`build_planner`). ``check``: also build
        the planner of every segment whose head is new here (an appended change: the last one),
        so a change that cannot be planned (PlanError) is refused now, not met by a plan worker."""
        segments = plan_segments(self.spec, changes)
        heads: list[SegmentHead] = []
        fresh: list[int] = []
        with self._lock:
            for seg in segments:
                before = self.counters["heads_built"]
                heads.append(self._head(heads[-1] if heads else None, seg.start, seg.spec))
                if self.counters["heads_built"] != before:
                    fresh.append(len(heads) - 1)
            while len(self._heads) > 2 * len(heads) + 64:  # the current chain was just used: it stays
                self._heads.popitem(last=False)
        if len(heads) == 1:
            return self.segment_planner(heads[0], None)
        spec = self.spec
        planner = SegmentedPlanner(heads, self.segment_planner, compose=spec.batch.compose,
                                   window=spec.batch.max_delay_steps + 1 if spec.batch.compose != "none" else 1,
                                   dp_history=check_dp_history(self.dp_history or ((0, spec.topology.dp_size),)))
        if check:
            for i in fresh:
                self.segment_planner(heads[i], planner.end(i))
        return planner

    def segment_planner(self, head: SegmentHead, end: int | None) -> Planner:
        """The planner of steps ``[head.start, end)``: kept, or built now (and kept)."""
        key = (id(head), end)
        with self._lock:
            hit = self._kept(key, head)
            if hit is not None:
                return hit
            building = self._building.setdefault(key, threading.Lock())
        with building:  # only this segment's builder holds it: the loop thread never waits on another's
            try:
                with self._lock:
                    hit = self._kept(key, head)  # built meanwhile, by the thread this one waited for
                if hit is not None:
                    return hit
                built = _head_planner(head, self.dp_history, end)  # outside self._lock
                with self._lock:
                    self.counters["planners_built"] += 1
                    self._planners[key] = (head, built)
                    self._planners.move_to_end(key)
                    while len(self._planners) > self.keep:
                        self._planners.popitem(last=False)
                return built
            finally:
                with self._lock:
                    if self._building.get(key) is building:
                        del self._building[key]

    def _kept(self, key: tuple[int, int | None], head: SegmentHead) -> Planner | None:
        """The kept planner of ``key`` built from ``head`` (lock held), marked recently used."""
        hit = self._planners.get(key)
        if hit is None or hit[0] is not head:
            return None
        self._planners.move_to_end(key)
        return hit[1]

    def _head(self, prev: SegmentHead | None, start: int, spec: JobSpec) -> SegmentHead:
        key = (0 if prev is None else id(prev), int(start), id(spec))
        hit = self._heads.get(key)
        if hit is not None and hit[0] is prev and hit[1] is spec:
            self._heads.move_to_end(key)
            return hit[2]
        units = self._units_of(spec)
        draws, keys = prev.carry(start, units) if prev is not None else ((), ())
        schedule, samples = _segment_schedule(spec, units, start)
        head = SegmentHead.make(start=start, spec=spec, units=units, schedule=schedule, samples_per_step=samples,
                                seed=spec.seed, start_draws=draws, source_keys=keys)
        self._heads[key] = (prev, spec, head)
        self.counters["heads_built"] += 1
        return head

    def _units_of(self, spec: JobSpec) -> list[SourceUnits]:
        """The units of ``spec``'s sources under its buckets, each built once."""
        units = []
        for s in spec.sources:
            bucket = spec.bucket(s.bucket)
            key = (s.name, bucket.max_seq_len, bucket.long_samples)
            if key not in self._units:
                self._units[key] = source_units(s.name, self.indexes[s.name], self.spec.images,
                                                max_seq_len=bucket.max_seq_len, long_samples=bucket.long_samples,
                                                vision=self._vision)
            units.append(self._units[key])
        return units


def _segment_schedule(spec: JobSpec, units: Sequence[SourceUnits], start: int) -> tuple[MixtureSchedule, int]:
    """The mixture schedule of the segment starting at ``start`` under ``spec`` (read from
    ``start``) and its units drawn per step."""
    names = [s.name for s in spec.sources]
    points = spec.mixture.as_points() if start == 0 else localize_points(spec.mixture.kind, spec.mixture.as_points(),
                                                                           names, start)
    schedule = MixtureSchedule(spec.mixture.kind, points, names)
    draws = spec.batch.samples_per_step
    if spec.batch.tokens_per_step:
        draws = draws_for_tokens(spec.batch.tokens_per_step, schedule, units)
        if draws > B.MAX_SAMPLES_PER_STEP:
            raise PlanError(f"tokens_per_step {spec.batch.tokens_per_step} is {draws} units per step at the mixture's "
                            f"mean unit length, more than MAX_SAMPLES_PER_STEP ({B.MAX_SAMPLES_PER_STEP})")
        draws = max(draws, spec.topology.dp_size)
    return schedule, draws


def _head_planner(head: SegmentHead, dp_history: Sequence[tuple[int, int]], end: int | None) -> Planner:
    """The planner of steps ``[head.start, end)`` from the segment's head."""
    return _planner(head.spec, head.units, head.schedule, head.samples_per_step, dp_history, start=head.start,
                    end=end, start_draws=head.start_draws, source_keys=head.source_keys)


def _planner(spec: JobSpec, units: Sequence[SourceUnits], schedule: MixtureSchedule, draws: int,
             dp_history: Sequence[tuple[int, int]], *, start: int, end: int | None, start_draws: Sequence[int],
             source_keys: Sequence[int]) -> Planner:
    return Planner(
        seed=spec.seed,
        samples_per_step=draws,
        micro_batch_tokens=spec.batch.micro_batch_tokens,
        schedule=schedule,
        cost=CostModel(attention=spec.cost.attention, linear=spec.cost.linear, per_image=spec.cost.per_image,
                       vision_attention=spec.cost.vision_attention, vision_linear=spec.cost.vision_linear),
        method=spec.balance,
        sources=units,
        compose=spec.batch.compose,
        max_delay_steps=spec.batch.max_delay_steps,
        size_by_tokens=bool(spec.batch.tokens_per_step),
        dp_history=dp_history or ((0, spec.topology.dp_size),),
        start_step=start,
        end_step=end,
        start_draws=start_draws,
        source_keys=source_keys,
    )


class RoleDirectory(Protocol):
    """Where a job's roles can be reached now (answered from the cluster's role records)."""

    def endpoint(self, role_id: str) -> str | None: ...     # endpoint of a live role, or None
    def role_ids(self, job: str) -> list[str]: ...           # every role assigned for ``job``
    # the job's skip records (source, sample_id, piece, step), committed and not yet committed,
    # with a key that changes whenever either does
    def skip_records(self, job: str) -> tuple[object, Collection[SkipUnit], Collection[SkipUnit]]: ...
    # (source, sample_id, piece) reported at ``step`` and not yet in the log (on the leader)
    def reported_skips(self, job: str, step: int) -> Collection[tuple[str, int, int]]: ...


class NoRoles:
    """A :class:`RoleDirectory` with no roles and no skips: a runtime that only plans (offline
    tools, benchmarks, tests)."""

    def endpoint(self, role_id: str) -> str | None:
        return None

    def role_ids(self, job: str) -> list[str]:
        return []

    def skip_records(self, job: str) -> tuple[object, Collection[SkipUnit], Collection[SkipUnit]]:
        return 0, (), ()

    def reported_skips(self, job: str, step: int) -> Collection[tuple[str, int, int]]:
        return ()


class JobRuntime:
    """One job on this daemon: its indexes and planner (indexing → ready, or failed).

    Where the job's roles run is the cluster's decision (role records in the checkpoint log);
    ``directory`` says where a role can be reached now, so ``locate`` and ``pools`` answer for
    roles on any daemon.
    """

    def __init__(self, spec: JobSpec, *, index_dir: Path, directory: RoleDirectory, record_seq: int = -1,
                 data_roots: Sequence[Path] | None = None, dp_history: Sequence[tuple[int, int]] = (),
                 plan_changes: Sequence[PlanChange] = (), plan_threads: int = 1) -> None:
        self.spec = spec
        self.plan_threads = int(plan_threads)  # the plan worker's threads (the daemon's plan_threads())
        # the log's committed plan changes the planner is built with (see update_plan)
        self.plan_changes: tuple[PlanChange, ...] = tuple(plan_changes)
        self._replanned: tuple[tuple[PlanChange, ...], Planner | SegmentedPlanner] | None = None
        self._planned_with: tuple[PlanChange, ...] | None = None  # the changes self.planner was built with
        self._replanning_from: int | None = None  # while they are not plan_changes: steps from here wait
        #: the earliest step of a plan change in this daemon's log not yet committed (set by the
        #: daemon's reconcile pass): steps from it on wait, for it may yet commit (and a new leader
        #: commits what a majority holds) or be dropped; None: no such change
        self.hold_from: int | None = None
        self._segments_of: tuple[tuple[PlanChange, ...], tuple] | None = None
        # the log's composition DP sizes; none recorded: the spec's dp_size from step 0
        self.dp_history = tuple(dp_history) or ((0, spec.topology.dp_size),)
        self.data_roots = data_roots  # the node's; a source outside them fails the job here
        self.record_seq = record_seq  # seq of the job_submitted record this runtime runs
        self.index_dir = index_dir
        self.directory = directory
        self.state = "indexing"
        self.error: str | None = None
        self.fingerprint = ""
        self.indexes: dict[str, SourceIndex] = {}
        self.planner: Planner | SegmentedPlanner | None = None
        self.plans: SegmentPlans | None = None  # its segments' planners, kept across plan changes (once ready)
        self.groups = spec.topology.groups()
        self.counters = {"plans_computed": 0, "plan_requests": 0, "skipped_units": 0, "plan_ms_max": 0.0,
                         "plans_over_deadline": 0, "plan_errors": 0, "plans_not_ready": 0}
        self.plan_worker: PlanWorker | None = None  # started by the first plan request once ready
        self._closed = False
        self.skips: list[dict[str, Any]] = []  # most recent skip reports, bounded
        self._skips_key: object | None = None       # committed skip records by step, for PlanReply.skips
        self._skips_by_step: dict[int, list[list[int]]] = {}
        self._uncommitted_by_step: dict[int, list[list[int]]] = {}  # ... and records not yet committed
        self._source_index = {s.name: i for i, s in enumerate(spec.sources)}  # name → index in the spec
        self._thread = threading.Thread(target=self._prepare, name=f"index-{spec.name}", daemon=True)
        self._thread.start()

    def _prepare(self) -> None:
        try:
            started = time.monotonic()
            tokenizer = job_tokenizer(self.spec, roots=self.data_roots)
            indexes = open_sources(self.spec, index_dir=self.index_dir, progress=sys.stderr.isatty(),
                                   roots=self.data_roots, tokenizer=tokenizer)
            check_vocabulary(indexes, tokenizer)
            weighted = {name for _, weights in self.spec.mixture.points for name, w in weights if w > 0}
            for name in sorted(weighted, key=[s.name for s in self.spec.sources].index):
                require_samples(indexes[name])  # the real reason (file, column, type), not "0 units"
            changes = self.plan_changes
            self.plans = SegmentPlans(self.spec, indexes, self.dp_history)
            planner = self.plans.planner(changes)
            self.fingerprint = self.spec.fingerprint({n: i.fingerprint for n, i in indexes.items()})
            self.indexes, self.planner, self._planned_with = indexes, planner, changes
            log.info("job %s: %d sources indexed in %.1fs (fingerprint %s)", self.spec.name, len(indexes),
                     time.monotonic() - started, self.fingerprint)
            self.state = "ready"
            if changes != self.plan_changes:  # a change committed while indexing
                self._replan(self.plan_changes)
        except FabricdError as e:  # the job's data or spec: the message says what is wrong
            log.error("job %s failed: %s", self.spec.name, e)
            self.error = f"{type(e).__name__}: {e}"
            self.state = "failed"
        except Exception as e:  # surfaced through status and Locate; the daemon keeps serving
            log.exception("job %s failed to prepare", self.spec.name)
            self.error = f"{type(e).__name__}: {e}"
            self.state = "failed"

    def update_plan(self, changes: Sequence[PlanChange]) -> None:
        """The log's committed plan changes of this job are now ``changes`` (in log order): plan
        with them. The planner is rebuilt off the caller's thread; until it is swapped in (by
        :meth:`plan`, on the daemon's thread), steps from the earliest new change on are not
        planned (NOT_READY: constructors ask again), and steps before it are planned as before,
        which they are under the new planner too."""
        changes = tuple(changes)
        if changes == self.plan_changes:
            return
        old = self.plan_changes
        if changes[:len(old)] == old:  # the log grew: the new changes are the ones after
            new = list(changes[len(old):]) or list(changes)
        else:
            seen = {msgspec.msgpack.encode(c) for c in old}
            new = [c for c in changes if msgspec.msgpack.encode(c) not in seen] or list(changes)
        start = min(c.at_step for c in new)
        pending = self._replanning_from if self._planned_with != self.plan_changes else None
        self._replanning_from = start if pending is None else min(start, pending)
        self.plan_changes = changes
        log.warning("job %s: %d plan change(s) committed, the earliest at step %d; replanning", self.spec.name,
                    len(new), start)
        if self.state == "ready":
            threading.Thread(target=self._replan, args=(changes,), name=f"replan-{self.spec.name}", daemon=True).start()

    def _replan(self, changes: tuple[PlanChange, ...]) -> None:
        try:
            planner = self.plans.planner(changes)  # reuses every segment the new changes leave as it was
        except Exception as e:  # validated by the leader: a failure here is a bug, surfaced as the job's
            log.exception("job %s: cannot plan with its committed plan changes", self.spec.name)
            self.error, self.state = f"plan change: {type(e).__name__}: {e}", "failed"
            return
        if changes == self.plan_changes:  # else a newer rebuild is under way
            self._replanned = (changes, planner)

    def _swap_planner(self) -> None:
        """Take the rebuilt planner if it is the one for the current changes (daemon thread)."""
        done = self._replanned
        if done is None or done[0] != self.plan_changes:
            return
        self._replanned, self._replanning_from = None, None
        self.planner, self._planned_with = done[1], done[0]
        if self.plan_worker is not None:  # its cache may hold steps planned the old way
            self.plan_worker.close()
            self.plan_worker = None

    def constructor_endpoint(self, dp_rank: int, avoid: list[str] = ()) -> tuple[str, bool] | None:
        """The live constructor of ``dp_rank`` not in ``avoid`` — its primary, else its standby —
        as ``(endpoint, is_standby)``; None when neither is up."""
        group = dp_rank // self.spec.topology.ranks_per_constructor
        live = [(e, standby) for standby in (False, True)
                if (e := self.directory.endpoint(constructor_id(self.spec.name, group, standby=standby))) is not None]
        # an avoided endpoint may only be slow, not dead: still better than nothing
        return next((x for x in live if x[0] not in avoid), live[0] if live else None)

    # -- requests -------------------------------------------------------------------------------

    def locate(self, req: protocol.Locate) -> protocol.Message:
        topo = self.spec.topology
        if self.state == "failed":
            return protocol.ErrorReply(code=protocol.ErrorCode.INVALID_SPEC, reason=f"job {self.spec.name} failed: {self.error}")
        if req.dp_size != topo.dp_size:
            return protocol.ErrorReply(code=protocol.ErrorCode.BAD_REQUEST,
                                       reason=f"job {self.spec.name} runs with dp_size {topo.dp_size}, not {req.dp_size}")
        if not 0 <= req.dp_rank < topo.dp_size or not 0 <= req.mp_rank < topo.mp_size:
            return protocol.ErrorReply(code=protocol.ErrorCode.BAD_REQUEST,
                                       reason=f"rank dp={req.dp_rank} mp={req.mp_rank} outside dp_size {topo.dp_size} × mp_size {topo.mp_size}")
        if self.state != "ready":
            return protocol.ErrorReply(code=protocol.ErrorCode.NOT_READY, reason=f"job {self.spec.name} is {self.state}")
        found = self.constructor_endpoint(req.dp_rank, req.avoid)
        if found is None:
            return protocol.ErrorReply(code=protocol.ErrorCode.NOT_READY,
                                       reason=f"the constructor of dp rank {req.dp_rank} is starting or moving")
        endpoint, standby = found
        return protocol.Located(job=self.spec.name, fingerprint=self.fingerprint, endpoint=endpoint,
                                dp_size=topo.dp_size, mp_size=topo.mp_size, prefetch=self.spec.batch.prefetch,
                                standby=standby, sources=[s.name for s in self.spec.sources])

    def _not_ready(self, reason: str) -> tuple[protocol.Message, tuple]:
        """NOT_READY for a step that waits: ``reason`` starts "step N is being planned" or "step N: ",
        which a constructor asks again for soon (``constructor._PLANNING``), not after its timeout."""
        self.counters["plans_not_ready"] += 1
        return protocol.ErrorReply(code=protocol.ErrorCode.NOT_READY, reason=reason), ()

    def plan(self, req: protocol.PlanRequest) -> tuple[protocol.Message, tuple]:
        """The requested ranks' rows of one step's plan, never computed here: a step not yet
        planned is NOT_READY at once and the job's plan worker is asked to compute it."""
        self.counters["plan_requests"] += 1
        self._swap_planner()
        if self.planner is None or self._closed:
            return protocol.ErrorReply(code=protocol.ErrorCode.NOT_READY, reason="planner not ready"), ()
        dp_size = self.spec.topology.dp_size
        if isinstance(req.step, bool) or not isinstance(req.step, int) or not 0 <= req.step <= MAX_STEP:
            return protocol.ErrorReply(code=protocol.ErrorCode.BAD_REQUEST,
                                       reason=f"step {req.step} outside [0, MAX_STEP = {MAX_STEP}]"), ()
        bad = next((r for r in req.ranks if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < dp_size), None)
        if bad is not None:
            return protocol.ErrorReply(code=protocol.ErrorCode.BAD_REQUEST,
                                       reason=f"rank {bad!r} outside dp_size {dp_size}"), ()
        if self._planned_with != self.plan_changes and self._replanning_from is not None \
                and req.step >= self._replanning_from:
            return self._not_ready(f"step {req.step} is being planned")
        if self.hold_from is not None and req.step >= self.hold_from:
            return self._not_ready(f"step {req.step}: waits for the plan change at step {self.hold_from} "
                                   "to be committed")
        if self.plan_worker is None:
            self.plan_worker = PlanWorker(self.planner, dp_size, name=self.spec.name, cache_steps=PLAN_CACHE_STEPS,
                                          ahead_steps=PLAN_AHEAD_STEPS, queue_steps=PLAN_QUEUE_STEPS,
                                          deadline_s=PLAN_DEADLINE_S, counters=self.counters,
                                          threads=self.plan_threads, cache_bytes=PLAN_CACHE_BYTES)
        plan = self.plan_worker.get(req.step)
        if plan is None:
            failed = self.plan_worker.failure(req.step)
            if failed is not None:
                return protocol.ErrorReply(code=protocol.ErrorCode.INTERNAL, reason=f"job {self.spec.name}: {failed}"), ()
            return self._not_ready(f"step {req.step} is being planned")
        part = plan.for_ranks(req.ranks)
        frames = plan_columns(part)
        skips, pending = self.step_skips(req.step)
        reply = protocol.PlanReply(job=self.spec.name, step=req.step, dp_size=plan.dp_size, rows=len(part.rank),
                                   columns=[n for n, _ in PLAN_COLUMNS], dtypes=[d for _, d in PLAN_COLUMNS],
                                   num_micro=[int(plan.num_micro[r]) for r in req.ranks],
                                   skips=skips, pending=pending, contexts=self.step_contexts(req.step))
        return reply, frames

    def step_contexts(self, step: int) -> list[tuple[int, int, str]]:
        """``PlanReply.contexts``: the sources whose units at ``step`` are made under another
        context than the spec's (a logged change of their bucket), as (source index, max_seq_len,
        long_samples)."""
        if not self.plan_changes:
            return []
        effective = spec_at(self._segments(), step)
        out = []
        for i, s in enumerate(self.spec.sources):
            t = transform_spec(effective, s.name)
            if t != transform_spec(self.spec, s.name):
                out.append((i, t.max_seq_len, t.long_samples))
        return out

    def _segments(self):
        """The job's plan segments under its committed changes (cached per change list)."""
        if self._segments_of is None or self._segments_of[0] != self.plan_changes:
            self._segments_of = (self.plan_changes, plan_segments(self.spec, self.plan_changes))
        return self._segments_of[1]

    def step_skips(self, step: int) -> tuple[list[list[int]], list[list[int]]]:
        """The skip records of ``step`` as ``[source index, sample_id, piece]``, sorted: the
        committed ones (``PlanReply.skips``: what a constructor must drop) and the pending ones
        (``PlanReply.pending``: records not yet committed and, on the leader, reports not yet
        appended: what a constructor must not deliver until they are settled), at most
        ``MAX_LIST_ITEMS`` each (a step plans far fewer units than that)."""
        key, committed, uncommitted = self.directory.skip_records(self.spec.name)
        names = self._source_index
        if key != self._skips_key:
            self._skips_key = key
            self._skips_by_step, self._uncommitted_by_step = _by_step(committed, names), _by_step(uncommitted, names)
        skips = self._skips_by_step.get(step, [])
        pending = list(self._uncommitted_by_step.get(step, []))
        reported = self.directory.reported_skips(self.spec.name, step)
        if reported:
            have = {tuple(u) for u in skips} | {tuple(u) for u in pending}
            pending += [[names[source], sample_id, piece] for source, sample_id, piece in reported
                        if source in names and (names[source], sample_id, piece) not in have]
            pending.sort()
        return skips[:MAX_LIST_ITEMS], pending[:MAX_LIST_ITEMS]

    def close(self) -> None:
        """The job was dropped or cancelled here: stop its plan worker (after the plan in progress)."""
        self._closed = True
        if self.plan_worker is not None:
            self.plan_worker.close()

    def pools(self) -> dict[str, list[str]]:
        """Source name → endpoints of its live source-loader workers."""
        ids = self.directory.role_ids(self.spec.name)
        out = {}
        for s in self.spec.sources:
            prefix = loader_prefix(self.spec.name, s.name)
            out[s.name] = [e for rid in ids if rid.startswith(prefix) and (e := self.directory.endpoint(rid)) is not None]
        return out

    def on_skip(self, msg: protocol.SkipReport) -> None:
        self.counters["skipped_units"] += 1
        log.warning("job %s step %d: skipped %s sample %d piece %d: %s", msg.job, msg.step, msg.source,
                    msg.sample_id, msg.piece, msg.reason)
        self.skips = (self.skips + [{"step": msg.step, "source": msg.source, "sample_id": msg.sample_id,
                                     "piece": msg.piece, "reason": msg.reason}])[-20:]

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "error": self.error,
            "fingerprint": self.fingerprint,
            "topology": {"dp_size": self.spec.topology.dp_size, "mp_size": self.spec.topology.mp_size,
                         "constructors": len(self.groups)},
            "tokenizer": self.spec.tokenizer.kind,
            "images": self.spec.images.mode,
            "sources": {n: {"samples": i.num_samples, "format": i.format, "tokens": int(i.text_tokens.sum()),
                            "images": int(i.num_images.sum()), "files_skipped": len(i.files_skipped),
                            "files_skipped_reasons": skip_reasons(i), "rows_skipped": i.rows_skipped}
                        for n, i in self.indexes.items()},
            "counters": dict(self.counters),
            "planning": None if self.plan_worker is None else self.plan_worker.status(),
            "recent_skips": list(self.skips),
            "plan_changes": [{"at_step": c.at_step, "change": describe_change(c), "origin": c.origin, "term": c.term}
                             for c in self.plan_changes],
            "defaults_applied": list(self.spec.defaults_applied),
            "composition": None if self.spec.batch.compose == "none" else {
                "mode": self.spec.batch.compose, "max_delay_steps": self.spec.batch.max_delay_steps,
                "dp_history": [list(x) for x in self.dp_history],
                "samples_per_step": self.planner.samples_per_step if self.planner is not None else None},
        }
