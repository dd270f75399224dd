"""The replicated fabric state, and the records that are deltas of it.

The leader writes every decision as a :class:`Record` to its checkpoint log; shadows replay the
same records in the same order and so hold the same :class:`FabricState`. Applying a record costs
O(the change it describes), never O(state).

A record is ``Record(term, seq, kind, data)``: ``seq`` starts at 1 and grows by one per record
with no gaps; ``term`` is the lease term of the leader that wrote it and never goes down.
``data`` is JSON-typed and its keys are fixed per kind (unknown kinds and unknown keys are
errors; ``int`` fields are non-negative, ``str`` fields non-empty unless noted):

``job_submitted``
    ``job`` str, ``spec_toml`` str (the spec text), ``spec_origin`` str (file it came from),
    ``fingerprint`` str (job spec + source index fingerprint), ``dp_size`` int >= 1,
    optional ``extra`` dict (default ``{}``). The job must be new or cancelled; re-submitting a
    cancelled job keeps its skipped samples and progress only if the fingerprint is unchanged.
``job_cancelled``
    ``job`` str (an active job), ``reason`` str (may be empty).
``sample_skipped``
    ``job`` str (active), ``source`` str, ``sample_id`` int, ``piece`` int, ``step`` int,
    ``reason`` str (may be empty; logged, not kept in the state). Idempotent.
``trainer_progress``
    ``job`` str (active), ``dp_rank`` int < dp_size, ``mp_rank`` int, ``next_step`` int.
    Progress is monotone: a ``next_step`` below the one recorded is ignored, never an error,
    so replay is deterministic whatever order reports reached the leader in. Written by older
    leaders (one record per rank per advance); still applied when replaying their logs.
``job_progress``
    ``job`` str (active), ``floor`` int, ``ahead`` list of ``[dp_rank, mp_rank, next_step]``
    (ints, ``dp_rank`` < dp_size, at most ``MAX_PROGRESS_AHEAD`` items): every rank of the job has
    reached ``floor``; the ranks listed have reached their ``next_step``. One record per job
    describes all its ranks, so progress costs the log O(ranks ahead of the floor), not O(ranks).
    Monotone like ``trainer_progress``: a rank's step is the highest the floor or a record ever
    gave it; lower values are ignored, never an error.
``trainer_host``
    ``job`` str (active), ``dp_rank`` int < dp_size, ``mp_rank`` int, ``host`` str,
    ``declared_ms`` int (wall-clock milliseconds of the trainer's ``Locate``). The host a trainer
    rank runs on, for constructor placement. The latest declaration wins: one older than the
    recorded one is ignored, never an error.
``pool_resized``
    ``job`` str (active), ``source`` str, ``workers`` int >= 1: the source-loader pool size the
    autoscaler chose (until then, or after the job is submitted again, the spec's size).
``role_assigned``
    ``role_id`` str, ``job`` str (active), ``kind`` str (e.g. ``source_loader``,
    ``constructor``), ``node`` str, ``extra`` dict. Assigning an existing ``role_id`` moves it.
``role_released``
    ``role_id`` str (an assigned role), ``reason`` str (may be empty).
``member_seen``
    ``node`` str, ``endpoint`` str: a daemon the leader admitted to the membership.
``plan_changed``
    ``job`` str (active), ``at_step`` int, ``sets`` list of ``{path, value}``, ``points`` list of
    ``{step, weights}``, ``origin`` str, ``term`` int (must equal the record's term): a change of
    the job's plan from ``at_step`` on (``fabricd.plan_changes``; the leader validated it against
    the spec and its frontier). Kept per job in log order; a ``job_submitted`` record drops the
    job's changes unless its ``extra`` says ``keep_plan_changes`` (a resubmission of the same
    content, e.g. at another ``dp_size``).

The state's snapshot (:meth:`FabricState.to_snapshot`) is a JSON-typed dict with sorted,
deterministic contents, so two replicas with the same records produce equal snapshots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from fabricd.errors import FabricdError

from . import records as R
from .records import MAX_PROGRESS_AHEAD, RECORD_TYPES, RecordDataError, check_data

__all__ = [
    "RECORD_KINDS",
    "RECORD_SCHEMAS",
    "MAX_PROGRESS_AHEAD",
    "SNAPSHOT_VERSION",
    "FabricState",
    "JobEntry",
    "MemberEntry",
    "PlanChangeEntry",
    "RoleEntry",
    "decode_snapshot",
    "encode_snapshot",
    "Record",
    "StateError",
]

SNAPSHOT_VERSION = 1
#: Most ranks one ``job_progress`` record lists individually (the rest are covered by its floor).

RECORD_KINDS = (
    "job_submitted",
    "job_cancelled",
    "sample_skipped",
    "trainer_progress",
    "job_progress",
    "trainer_host",
    "pool_resized",
    "role_assigned",
    "role_released",
    "member_seen",
    "plan_changed",
)

#: kind → the typed record its data must convert to (see fabricd.cluster.records)
RECORD_SCHEMAS = RECORD_TYPES


class StateError(FabricdError):
    """A record that cannot be applied (bad shape, out of order, or contradicting the state)."""


@dataclass(frozen=True)
class Record:
    """One logged decision: a delta of :class:`FabricState`."""

    term: int
    seq: int
    kind: str
    data: dict

    def to_dict(self) -> dict[str, Any]:
        return {"term": self.term, "seq": self.seq, "kind": self.kind, "data": self.data}

    @classmethod
    def from_dict(cls, d: Any) -> Record:
        """Parse a record dict (from the log or the wire); raises :class:`StateError` if malformed."""
        if not isinstance(d, dict) or set(d) != {"term", "seq", "kind", "data"}:
            raise StateError(f"malformed record {d!r:.200}: expected keys term, seq, kind, data")
        term, seq, kind, data = d["term"], d["seq"], d["kind"], d["data"]
        if not _is_int(term) or not _is_int(seq) or seq < 1 or not isinstance(kind, str) \
                or not isinstance(data, dict):
            raise StateError(f"malformed record {d!r:.200}")
        return cls(term, seq, kind, data)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_POSITION


_MAX_POSITION = 1 << 53  # a term or a log position


def _check_data(rec: Record) -> Any:
    """The record's data as the typed record of its kind (types and ranges checked, optional
    fields filled in); raises StateError naming the bad key."""
    try:
        return check_data(rec.kind, rec.data)
    except RecordDataError as e:
        raise StateError(f"record seq {rec.seq} ({rec.kind}): {e}") from None


SkippedUnit = tuple[str, int, int, int]  # (source, sample_id, piece, step)

_Seq = Annotated[int, msgspec.Meta(ge=0)]


class JobEntry(msgspec.Struct, frozen=True):
    """A job the state holds: the ``job_submitted`` record that (re)submitted it, at ``term``/``seq``,
    and whether it was cancelled since. Frozen: applying a record replaces the entry."""

    spec_toml: str
    spec_origin: str
    fingerprint: str
    dp_size: Annotated[int, msgspec.Meta(ge=1)]
    extra: dict[str, Any]
    cancelled: bool
    cancel_reason: str
    term: _Seq
    seq: _Seq


class RoleEntry(msgspec.Struct, frozen=True):
    """A role the leader assigned: its job, kind, daemon and arguments, by the ``role_assigned``
    record at ``term``/``seq`` (``seq`` 0 in snapshots written before roles kept it)."""

    job: str
    kind: str
    node: str
    extra: dict[str, Any]
    term: _Seq
    seq: _Seq = 0


class PlanChangeEntry(msgspec.Struct, frozen=True):
    """A plan change the state holds: the record's data and its ``seq`` (a daemon plans with a
    change only once ``seq`` is committed: an uncommitted one can still be truncated)."""

    change: R.PlanChange
    seq: _Seq


class MemberEntry(msgspec.Struct, frozen=True):
    """A daemon the leader admitted to the membership (``member_seen`` in ``term``)."""

    endpoint: str
    term: _Seq


class _Snapshot(msgspec.Struct):
    """The layout of :meth:`FabricState.to_snapshot` (what ``from_snapshot`` converts back)."""

    version: int
    last_term: _Seq
    last_seq: _Seq
    jobs: dict[str, JobEntry]
    skipped: dict[str, list[tuple[str, int, int, int]]]
    progress: dict[str, dict[str, int]]
    roles: dict[str, RoleEntry]
    members: dict[str, MemberEntry]
    progress_floor: dict[str, int] = {}  # absent from snapshots written before job_progress records
    hosts: dict[str, dict[str, tuple[str, int]]] = {}  # absent before trainers declared hosts
    pools: dict[str, dict[str, int]] = {}
    plan_changes: dict[str, list[PlanChangeEntry]] = {}  # absent before plan changes existed


@dataclass
class FabricState:
    """What the leader decided, rebuilt by applying records in order.

    ``jobs``: name -> :class:`JobEntry`; ``skipped``: job -> set of (source, sample_id, piece, step);
    ``progress``: job -> {"dp_rank/mp_rank": next_step} for the ranks ahead of the job's floor;
    ``progress_floor``: job -> the step every rank reached (absent: 0); ``hosts``: job -> {"dp_rank/mp_rank":
    [host, declared_ms]}; ``pools``: job -> {source: workers}; ``roles``: role_id -> :class:`RoleEntry`;
    ``members``: node -> :class:`MemberEntry`; ``plan_changes``: job -> its
    :class:`PlanChangeEntry` list, in log order.
    """

    jobs: dict[str, JobEntry] = field(default_factory=dict)
    skipped: dict[str, set[SkippedUnit]] = field(default_factory=dict)
    progress: dict[str, dict[str, int]] = field(default_factory=dict)
    progress_floor: dict[str, int] = field(default_factory=dict)
    hosts: dict[str, dict[str, list]] = field(default_factory=dict)
    pools: dict[str, dict[str, int]] = field(default_factory=dict)
    roles: dict[str, RoleEntry] = field(default_factory=dict)
    members: dict[str, MemberEntry] = field(default_factory=dict)
    plan_changes: dict[str, list[PlanChangeEntry]] = field(default_factory=dict)
    last_term: int = 0
    last_seq: int = 0

    # -- applying -------------------------------------------------------------------------

    def apply(self, rec: Record) -> None:
        """Apply one record. Validates fully before changing anything: on StateError the state
        is exactly as it was."""
        if rec.seq != self.last_seq + 1:
            raise StateError(f"record seq {rec.seq} does not follow seq {self.last_seq}")
        if rec.term < self.last_term:
            raise StateError(f"record seq {rec.seq} has term {rec.term} < last term {self.last_term}")
        d = _check_data(rec)
        getattr(self, f"_apply_{rec.kind}")(rec, d)
        self.last_seq = rec.seq
        self.last_term = rec.term

    def _active_job(self, rec: Record, job: str) -> JobEntry:
        entry = self.jobs.get(job)
        if entry is None or entry.cancelled:
            raise StateError(f"record seq {rec.seq} ({rec.kind}): job {job!r} is not an active job")
        return entry

    def _apply_job_submitted(self, rec: Record, d: R.JobSubmitted) -> None:
        job = d.job
        old = self.jobs.get(job)
        if old is not None and not old.cancelled:
            raise StateError(f"record seq {rec.seq} (job_submitted): job {job!r} is already active")
        if d.dp_size < 1:
            raise StateError(f"record seq {rec.seq} (job_submitted): dp_size = {d.dp_size} must be >= 1")
        if old is not None and old.fingerprint != d.fingerprint:
            self.skipped.pop(job, None)
            self.progress.pop(job, None)
            self.progress_floor.pop(job, None)
        self.jobs[job] = JobEntry(spec_toml=d.spec_toml, spec_origin=d.spec_origin, fingerprint=d.fingerprint,
                                  dp_size=d.dp_size, extra=d.extra, cancelled=False, cancel_reason="",
                                  term=rec.term, seq=rec.seq)
        self.skipped.setdefault(job, set())
        self.progress.setdefault(job, {})
        self.pools.pop(job, None)  # a (re)submitted job starts from its spec's pool sizes
        if not d.extra.get("keep_plan_changes"):
            self.plan_changes.pop(job, None)

    def _apply_job_cancelled(self, rec: Record, d: R.JobCancelled) -> None:
        entry = self._active_job(rec, d.job)
        self.jobs[d.job] = msgspec.structs.replace(entry, cancelled=True, cancel_reason=d.reason)

    def _apply_sample_skipped(self, rec: Record, d: R.SampleSkipped) -> None:
        self._active_job(rec, d.job)
        self.skipped[d.job].add((d.source, d.sample_id, d.piece, d.step))

    def _trainer_rank(self, rec: Record, d: R.TrainerProgress | R.TrainerHost) -> None:
        entry = self._active_job(rec, d.job)
        if d.dp_rank >= entry.dp_size:
            raise StateError(f"record seq {rec.seq} ({rec.kind}): dp_rank = {d.dp_rank} "
                             f">= dp_size {entry.dp_size} of job {d.job!r}")

    def _apply_trainer_progress(self, rec: Record, d: R.TrainerProgress) -> None:
        self._trainer_rank(rec, d)
        ranks = self.progress[d.job]
        key = f"{d.dp_rank}/{d.mp_rank}"
        if d.next_step > max(ranks.get(key, -1), self.progress_floor.get(d.job, 0)):
            ranks[key] = d.next_step

    def _apply_job_progress(self, rec: Record, d: R.JobProgress) -> None:
        entry = self._active_job(rec, d.job)
        ahead, floor = d.ahead, d.floor  # types and ranges checked (records.JobProgress)
        for item in ahead:
            if item[0] >= entry.dp_size:
                raise StateError(f"record seq {rec.seq} (job_progress): ahead item {list(item)} has "
                                 f"dp_rank >= dp_size {entry.dp_size}")
        job = d.job
        ranks = self.progress[job]
        old_floor = self.progress_floor.get(job, 0)
        if floor > old_floor:
            self.progress_floor[job] = floor
            # ranks the floor caught up with need no entry of their own: O(ranks ahead), not O(ranks)
            for key in [k for k, step in ranks.items() if step <= floor]:
                del ranks[key]
        floor = max(floor, old_floor)
        for dp, mp, step in ahead:
            key = f"{dp}/{mp}"
            if step > max(ranks.get(key, 0), floor):
                ranks[key] = step

    def _apply_trainer_host(self, rec: Record, d: R.TrainerHost) -> None:
        self._trainer_rank(rec, d)
        ranks = self.hosts.setdefault(d.job, {})
        key = f"{d.dp_rank}/{d.mp_rank}"
        if key not in ranks or d.declared_ms > ranks[key][1]:
            ranks[key] = [d.host, d.declared_ms]

    def _apply_pool_resized(self, rec: Record, d: R.PoolResized) -> None:
        self._active_job(rec, d.job)
        if d.workers < 1:
            raise StateError(f"record seq {rec.seq} (pool_resized): workers = {d.workers} must be >= 1")
        self.pools.setdefault(d.job, {})[d.source] = d.workers

    def _apply_role_assigned(self, rec: Record, d: R.RoleAssigned) -> None:
        self._active_job(rec, d.job)
        self.roles[d.role_id] = RoleEntry(job=d.job, kind=d.kind, node=d.node, extra=d.extra,
                                          term=rec.term, seq=rec.seq)

    def _apply_role_released(self, rec: Record, d: R.RoleReleased) -> None:
        if d.role_id not in self.roles:
            raise StateError(f"record seq {rec.seq} (role_released): role {d.role_id!r} is not assigned")
        del self.roles[d.role_id]

    def _apply_plan_changed(self, rec: Record, d: R.PlanChange) -> None:
        self._active_job(rec, d.job)
        if d.term != rec.term:
            raise StateError(f"record seq {rec.seq} (plan_changed): term = {d.term} is not the record's term "
                             f"{rec.term}")
        self.plan_changes.setdefault(d.job, []).append(PlanChangeEntry(change=d, seq=rec.seq))

    def _apply_member_seen(self, rec: Record, d: R.MemberSeen) -> None:
        self.members[d.node] = MemberEntry(endpoint=d.endpoint, term=rec.term)

    # -- queries --------------------------------------------------------------------------

    def committed_plan_changes(self, job: str, commit_seq: int) -> tuple[R.PlanChange, ...]:
        """``job``'s plan changes whose records are committed (seq <= ``commit_seq``), in log order."""
        return tuple(e.change for e in self.plan_changes.get(job, ()) if e.seq <= commit_seq)

    def uncommitted_change_from(self, job: str, commit_seq: int) -> int | None:
        """The earliest step of ``job``'s plan changes appended here and not yet committed (seq >
        ``commit_seq``), or None: steps from it on may yet be planned differently."""
        return min((e.change.at_step for e in self.plan_changes.get(job, ()) if e.seq > commit_seq), default=None)

    def is_active(self, job: str) -> bool:
        """Whether ``job`` is submitted and not cancelled."""
        entry = self.jobs.get(job)
        return entry is not None and not entry.cancelled

    def next_step(self, job: str, dp_rank: int, mp_rank: int = 0) -> int:
        """The step a trainer rank is known to resume at (0 if it never reported). Never goes down
        while the job stays submitted with the same fingerprint."""
        return max(self.progress.get(job, {}).get(f"{dp_rank}/{mp_rank}", 0), self.progress_floor.get(job, 0))

    def floor_step(self, job: str) -> int:
        """The step every rank of ``job`` is known to have reached (0 if none recorded)."""
        return self.progress_floor.get(job, 0)

    def trainer_host(self, job: str, dp_rank: int, mp_rank: int = 0) -> tuple[str, int] | None:
        """The host a trainer rank last declared, with the declaration's time (ms), or None."""
        entry = self.hosts.get(job, {}).get(f"{dp_rank}/{mp_rank}")
        return (entry[0], entry[1]) if entry else None

    def host_is_news(self, job: str, dp_rank: int, mp_rank: int, host: str, declared_ms: int) -> bool:
        """Whether recording this host declaration would change the state: the job is active, the
        rank is inside it, and no declaration of this host, or a newer one, is recorded."""
        if not host or not self.is_active(job) or dp_rank >= self.jobs[job].dp_size:
            return False
        recorded = self.trainer_host(job, dp_rank, mp_rank)
        return recorded is None or (recorded[0] != host and recorded[1] < declared_ms)

    # -- snapshots ------------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        """A JSON-typed, deterministic copy of the whole state (O(state))."""
        return {
            "version": SNAPSHOT_VERSION,
            "last_term": self.last_term,
            "last_seq": self.last_seq,
            "jobs": {k: msgspec.to_builtins(self.jobs[k]) for k in sorted(self.jobs)},
            "skipped": {k: [list(u) for u in sorted(self.skipped[k])] for k in sorted(self.skipped)},
            "progress": {k: dict(sorted(self.progress[k].items())) for k in sorted(self.progress)},
            "progress_floor": dict(sorted(self.progress_floor.items())),
            "hosts": {k: {r: list(v) for r, v in sorted(self.hosts[k].items())} for k in sorted(self.hosts)},
            "pools": {k: dict(sorted(self.pools[k].items())) for k in sorted(self.pools)},
            "roles": {k: msgspec.to_builtins(self.roles[k]) for k in sorted(self.roles)},
            "members": {k: msgspec.to_builtins(self.members[k]) for k in sorted(self.members)},
            **({"plan_changes": {k: msgspec.to_builtins(self.plan_changes[k]) for k in sorted(self.plan_changes)}}
               if self.plan_changes else {}),
        }

    @classmethod
    def from_snapshot(cls, d: Any) -> FabricState:
        """Rebuild a state from :meth:`to_snapshot` output; raises StateError naming what is
        malformed (the key and what it should be)."""
        if isinstance(d, dict) and "version" in d and d["version"] != SNAPSHOT_VERSION:
            raise StateError(f"snapshot version = {d['version']!r:.40}, this daemon reads {SNAPSHOT_VERSION}")
        try:
            snap = msgspec.convert(d, _Snapshot)
        except (msgspec.ValidationError, RecursionError, TypeError) as e:
            raise StateError(f"malformed snapshot: {_name_the_key(d, str(e))[:300]}") from None
        if snap.version != SNAPSHOT_VERSION:
            raise StateError(f"snapshot version = {snap.version}, this daemon reads {SNAPSHOT_VERSION}")
        return cls(
            jobs=snap.jobs,
            skipped={k: set(v) for k, v in snap.skipped.items()},
            progress=snap.progress,
            progress_floor=snap.progress_floor,
            hosts={k: {r: list(v) for r, v in ranks.items()} for k, ranks in snap.hosts.items()},
            pools=snap.pools,
            roles=snap.roles,
            members=snap.members,
            plan_changes={k: list(v) for k, v in snap.plan_changes.items()},
            last_term=snap.last_term,
            last_seq=snap.last_seq,
        )

    def copy(self) -> FabricState:
        """An independent deep copy (O(state))."""
        return FabricState.from_snapshot(self.to_snapshot())


def _name_the_key(snapshot: Any, reason: str) -> str:
    """msgspec's "... - at `$.jobs[...].dp_size`" with the key of the bad entry: `$.jobs['j'].dp_size`."""
    where = reason.rpartition(" - at `$.")[2]
    section = where.partition("[...]")[0]
    section_type = next((f.type for f in msgspec.structs.fields(_Snapshot) if f.name == section), None)
    if "[...]" not in where or section_type is None or not isinstance(snapshot.get(section), dict):
        return reason
    for key, value in snapshot[section].items():  # only on a malformed snapshot: O(section) is fine
        try:
            msgspec.convert({key: value}, section_type)
        except (msgspec.ValidationError, RecursionError, TypeError):
            return reason.replace(f"$.{section}[...]", f"$.{section}[{key!r:.80}]", 1)
    return reason


def encode_snapshot(snapshot: dict[str, Any]) -> bytes:
    """The canonical bytes of a :meth:`FabricState.to_snapshot` dict: compact JSON with sorted
    keys, so equal states encode to equal bytes (what the log stores and the leader streams)."""
    return json.dumps(snapshot, separators=(",", ":"), sort_keys=True).encode()


def decode_snapshot(data: bytes) -> FabricState:
    """The state in :func:`encode_snapshot` output; raises StateError if it is not one."""
    try:
        snapshot = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise StateError(f"malformed snapshot: not JSON ({e})") from e
    return FabricState.from_snapshot(snapshot)

