"""Plan changes at runtime: what ``fabricctl plan update`` may change, and the spec in effect after.

A :class:`~fabricd.cluster.records.PlanChange` (a ``plan_changed`` log record) says: from step
``at_step`` on, for every rank, the job runs under its spec with these keys set and these mixture
points added. The change is applied to the spec *in effect just before* (the job's spec with the
earlier changes applied), and the result is validated exactly as a submitted spec is
(``fabricd.config``: every key, every bound of ``fabricd.spec_bounds``), so a change the spec
could not have said is refused with the file, key and value named.

What may change (``--set PATH=VALUE``; anything else is refused, naming these):

``mixture.weights.SOURCE = W``
    the share of SOURCE in the mix from ``at_step`` on: W is a fraction of the draws (the
    weights set in one change sum to at most 1); the other sources share the rest in the
    proportions they had at ``at_step``. (Every source set: their weights are normalised.)
``mixture.kind = constant | piecewise | linear``
    the curriculum from ``at_step`` on. ``constant`` holds the weights in effect at
    ``at_step`` (with this change's weight sets) for good: later points are dropped.
``buckets.NAME.max_seq_len = L``, ``buckets.NAME.long_samples = split | truncate``
    the context of a bucket's sources from ``at_step`` on: their units change (pieces of the new
    length), so each such source starts a fresh shuffle of its new units at ``at_step``.

``--add-point 'step=S,weights={a=1,b=3}'`` adds (or replaces) a mixture point at ``S >=
at_step`` (raw weights, normalised like the spec's). Any mixture change first pins a point at
``at_step`` holding the weights in effect there, so a ramp or a held weight before
``at_step`` is never altered and a ``linear`` ramp to an added point starts from where the mix is.

:func:`plan_segments` turns a spec and its logged changes into the segments the planner plans
(``fabricd.planner.segments``): pure, so the leader, every daemon and ``fabricctl expect`` get
the same segments from the same log.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import threading
import tomllib
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from fabric_client.limits import MAX_STEP

from .cluster.records import MAX_PLAN_OPS, MixturePoint, PlanChange, RecordDataError, SetOp, check_data
from .config import JobSpec, _build_job
from .errors import ConfigError
from .planner.mixture import MixtureSchedule

__all__ = ["CHANGEABLE", "PlanSegment", "apply_change", "checked", "make_change", "parse_point", "parse_set", "plan_segments", "spec_at",
           "describe_change"]

log = logging.getLogger(__name__)

#: The keys a plan change may set (NAME: a source or bucket name).
CHANGEABLE = ("mixture.weights.SOURCE", "mixture.kind", "buckets.NAME.max_seq_len", "buckets.NAME.long_samples")


@dataclass(frozen=True)
class PlanSegment:
    """Steps ``[start, next segment's start)`` of a job, planned under ``spec``."""

    start: int
    spec: JobSpec


def _where(at_step: int) -> str:
    return f"plan change at step {at_step}"


def parse_set(text: str, *, at_step: int = 0) -> SetOp:
    """``PATH=VALUE`` (``mixture.weights.code=0.3``) as a :class:`SetOp`; the value is read as a
    TOML value (number, boolean, quoted string) and otherwise taken as a bare string
    (``mixture.kind=piecewise``)."""
    path, sep, raw = text.partition("=")
    path, raw = path.strip(), raw.strip()
    if not sep or not path or not raw:
        raise ConfigError(_where(at_step), "--set", text, "expected PATH=VALUE, e.g. mixture.weights.code=0.3")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not isinstance(value, (str, bool, int, float)):
        raise ConfigError(_where(at_step), path, raw, "expected a number, a boolean or a string")
    return SetOp(path=path, value=value)


def parse_point(text: str, *, at_step: int = 0) -> MixturePoint:
    """``step=S,weights={a=1,b=3}`` (a TOML inline table's contents) as a :class:`MixturePoint`."""
    try:
        table = tomllib.loads(f"p = {{{text}}}")["p"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_where(at_step), "--add-point", text,
                          f"expected step=S,weights={{SOURCE=W,...}} ({e})") from None
    step, weights = table.get("step"), table.get("weights")
    if set(table) != {"step", "weights"} or isinstance(step, bool) or not isinstance(step, int) \
            or not isinstance(weights, dict) or not weights:
        raise ConfigError(_where(at_step), "--add-point", text, "expected step=S,weights={SOURCE=W,...}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights.values()):
        raise ConfigError(_where(at_step), "--add-point", text, "weights must be numbers")
    if not 0 <= step <= MAX_STEP:
        raise ConfigError(_where(at_step), "--add-point", text, f"step must lie in [0, MAX_STEP = {MAX_STEP}]")
    return MixturePoint(step=step, weights={str(k): float(v) for k, v in weights.items()})


def make_change(job: str, at_step: int, sets: Iterable[str] = (), points: Iterable[str] = (), *,
                origin: str = "", term: int = 0) -> PlanChange:
    """A :class:`PlanChange` from command-line strings (``--set``, ``--add-point``)."""
    s = [parse_set(x, at_step=at_step) for x in sets]
    p = [parse_point(x, at_step=at_step) for x in points]
    return checked(PlanChange(job=job, at_step=int(at_step), sets=s, points=p, origin=origin, term=term))


def checked(change: PlanChange) -> PlanChange:
    """``change`` if every field is in range as the log requires (a Struct built in code is not
    checked), else ConfigError naming the field."""
    try:
        return check_data("plan_changed", msgspec.to_builtins(change))
    except RecordDataError as e:
        raise ConfigError(_where(change.at_step), "plan change", change.job, str(e)) from None


def describe_change(change: PlanChange) -> str:
    """One line: ``at step 500: mixture.weights.code = 0.3, point at 800 {...} (origin operator:x)``."""
    ops = [f"{op.path} = {op.value!r}" for op in change.sets]
    ops += [f"point at {p.step} {dict(p.weights)}" for p in change.points]
    return f"at step {change.at_step}: {', '.join(ops) or 'nothing'}" + (f" ({change.origin})" if change.origin else "")


def _spec_data(spec: JobSpec) -> dict:
    """The spec as TOML data, its mixture, buckets and batch written out from the parsed spec
    (defaults made explicit), so a change applies to what the job really runs."""
    data = tomllib.loads(spec.text)
    data["mixture"] = {"kind": spec.mixture.kind,
                       "points": [{"step": s, "weights": dict(w)} for s, w in spec.mixture.points]}
    data["buckets"] = [{"name": b.name, "max_seq_len": b.max_seq_len, "long_samples": b.long_samples}
                       for b in spec.buckets]
    b = spec.batch
    batch: dict[str, Any] = {"micro_batch_tokens": b.micro_batch_tokens, "prefetch": b.prefetch,
                             "compression": b.compression, "compose": b.compose}
    batch.update({"tokens_per_step": b.tokens_per_step} if b.tokens_per_step else {"samples_per_step": b.samples_per_step})
    if b.compose != "none":
        batch["max_delay_steps"] = b.max_delay_steps
    data["batch"] = batch
    return data


def weights_at(spec: JobSpec, step: int) -> dict[str, float]:
    """Source name → its (normalised) weight at ``step`` under ``spec``'s schedule."""
    names = [s.name for s in spec.sources]
    w = MixtureSchedule(spec.mixture.kind, spec.mixture.as_points(), names).weights(step)
    return {n: float(x) for n, x in zip(names, w.tolist())}


def _put_point(points: list[dict], step: int, weights: dict[str, float]) -> None:
    """Insert (or replace) the point at ``step``, keeping the points in step order."""
    points[:] = [p for p in points if p["step"] != step] + [{"step": step, "weights": dict(weights)}]
    points.sort(key=lambda p: p["step"])


def _set_shares(where: str, current: dict[str, float], shares: dict[str, float]) -> dict[str, float]:
    """The weights after ``shares`` (source → fraction) are set: the others share the rest in
    their current proportions."""
    total = math.fsum(shares.values())
    others = {n: w for n, w in current.items() if n not in shares}
    rest = math.fsum(others.values())
    if rest > 0 and total > 1 + 1e-12:
        raise ConfigError(where, "mixture.weights", shares,
                          f"the shares set sum to {total:.6g} > 1; the other sources share what is left")
    out = dict(shares)
    for n, w in others.items():
        out[n] = w * max(0.0, 1.0 - total) / rest if rest > 0 else 0.0
    if math.fsum(out.values()) <= 0:
        raise ConfigError(where, "mixture.weights", shares, "weights must not all be 0")
    return out


def apply_change(spec: JobSpec, change: PlanChange) -> JobSpec:
    """The spec in effect from ``change.at_step`` on, given ``spec`` in effect just before.
    Raises ConfigError naming the change, the key and the value for a change that cannot apply
    (an unknown path, a value the spec refuses, a point before ``at_step``)."""
    where = _where(change.at_step)
    if len(change.sets) > MAX_PLAN_OPS or len(change.points) > MAX_PLAN_OPS:
        raise ConfigError(where, "sets", len(change.sets) + len(change.points),
                          f"at most MAX_PLAN_OPS ({MAX_PLAN_OPS}) sets and points")
    if not change.sets and not change.points:
        raise ConfigError(where, "--set", [], "nothing to change: give --set PATH=VALUE or --add-point")
    data = _spec_data(spec)
    names = [s.name for s in spec.sources]
    buckets = {b["name"]: b for b in data["buckets"]}
    kind: str | None = None
    shares: dict[str, float] = {}
    for op in change.sets:
        parts = op.path.split(".")
        if parts[:2] == ["mixture", "weights"] and len(parts) == 3:
            if parts[2] not in names:
                raise ConfigError(where, op.path, op.value, f"not a source of this job (sources: {', '.join(names)})")
            v = op.value
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise ConfigError(where, op.path, v, "expected a share of the mix in [0, 1]")
            shares[parts[2]] = float(v)
        elif parts == ["mixture", "kind"]:
            kind = op.value if isinstance(op.value, str) else repr(op.value)
        elif parts[0] == "buckets" and len(parts) == 3 and parts[2] in ("max_seq_len", "long_samples"):
            if parts[1] not in buckets:
                raise ConfigError(where, op.path, op.value, f"no bucket named {parts[1]!r} (buckets: {', '.join(buckets)})")
            buckets[parts[1]][parts[2]] = op.value
        else:
            raise ConfigError(where, op.path, op.value, f"cannot be changed at runtime; changeable: {', '.join(CHANGEABLE)}")
    for p in change.points:
        if p.step < change.at_step:
            raise ConfigError(where, "--add-point", p.step, f"a point must lie at or after the change's step {change.at_step}")
    if shares or kind is not None or change.points:
        points = data["mixture"]["points"]
        _put_point(points, change.at_step, weights_at(spec, change.at_step))
        if kind is not None:
            data["mixture"]["kind"] = kind
        if shares:
            _put_point(points, change.at_step, _set_shares(where, weights_at(spec, change.at_step), shares))
        for p in change.points:
            _put_point(points, p.step, p.weights)
        if kind == "constant":  # constant from at_step on: the points before stay for the steps before
            if change.points:
                raise ConfigError(where, "--add-point", [p.step for p in change.points],
                                  "a constant mixture takes no further points")
            data["mixture"]["kind"] = "piecewise"
            data["mixture"]["points"] = [p for p in points if p["step"] <= change.at_step]
        if data["mixture"]["kind"] == "constant" and len(data["mixture"]["points"]) > 1:
            data["mixture"]["kind"] = "piecewise"  # a point at at_step > 0: held weights, as constant was
    try:
        out = _build_job(spec.text, data, Path(spec.file))
    except ConfigError as e:
        raise ConfigError(where, e.key, e.value, e.reason) from None
    return out


def spec_at(segments: Sequence[PlanSegment], step: int) -> JobSpec:
    """The spec in effect at ``step`` (what a unit of that step is loaded and transformed under)."""
    return segments[max(0, bisect.bisect_right([seg.start for seg in segments], step) - 1)].spec


#: ``id(spec)`` → (a weak reference to ``spec``, {a change's key → the segment spec it starts}):
#: see :func:`_applied`. An entry goes when its spec does.
_applied_after: dict[int, tuple[weakref.ref, dict[bytes, JobSpec]]] = {}
_applied_lock = threading.RLock()  # re-entrant: a finalizer may run while it is held


def _forget(key: int) -> None:
    with _applied_lock:
        _applied_after.pop(key, None)


def _applied(spec: JobSpec, change: PlanChange) -> JobSpec:
    """The spec of the segment ``change`` starts, given ``spec`` in effect before it:
    ``apply_change(spec, change)`` from its step on (:func:`_from_step`), remembered per ``spec``
    object and the change's step, sets and points, for as long as ``spec`` lives. Why: a job's
    segments are recomputed on every new change (and every online-mixing round); with the earlier
    specs the same objects, every earlier change is found here instead of being applied
    (parsed and validated) again, and the segment specs stay the same objects, which the
    planner's caches key on (``job.SegmentPlans``). Errors are not remembered."""
    key = msgspec.msgpack.encode((change.at_step, change.sets, change.points))
    with _applied_lock:
        entry = _applied_after.get(id(spec))
        if entry is not None and entry[0]() is spec and key in entry[1]:
            return entry[1][key]
    out = _from_step(apply_change(spec, change), change.at_step)
    with _applied_lock:
        entry = _applied_after.get(id(spec))
        if entry is None or entry[0]() is not spec:
            entry = _applied_after[id(spec)] = (weakref.ref(spec), {})
            weakref.finalize(spec, _forget, id(spec))
        return entry[1].setdefault(key, out)


def _from_step(spec: JobSpec, start: int) -> JobSpec:
    """``spec`` as a segment starting at ``start`` needs it: its mixture points before the last
    one at or before ``start`` (``p``) replaced by a copy of ``p`` at step 0. The weights at
    every step from ``p`` on, hence from ``start`` on, are exactly the spec's (a schedule's weights
    at a step depend on the point at or before it and the one after, normalised one by one), and
    so is every later change applied to it; the steps before ``start`` are planned by earlier
    segments. Why: every change pins a point, so a job's spec would otherwise carry every point
    of every change before it (thousands under online mixing: quadratic work and memory over a
    run, and a refusal past ``MAX_MIXTURE_POINTS``)."""
    points = spec.mixture.points
    keep = bisect.bisect_right([st for st, _ in points], start) - 1
    if keep <= 0:
        return spec
    _, weights = points[keep]
    return dataclasses.replace(spec, mixture=dataclasses.replace(spec.mixture,
                                                                 points=((0, weights),) + tuple(points[keep:])))


def plan_segments(spec: JobSpec, changes: Sequence[PlanChange]) -> tuple[PlanSegment, ...]:
    """The job's segments: ``[0, ...)`` under ``spec``, and one from each change's step under the
    spec with every change up to it applied (changes in step order, log order within a step;
    each segment's mixture points before its start summarised, see :func:`_from_step`).
    Raises ConfigError for a change that does not apply. The same spec and an extended list of
    changes give the same segment spec objects for the unaffected prefix (the planner's caches
    key on them), at the cost of applying only the new changes."""
    segments = [PlanSegment(0, spec)]
    for change in sorted(changes, key=lambda c: c.at_step):  # stable: log order within a step
        effective = _applied(segments[-1].spec, change)
        if change.at_step == segments[-1].start:
            segments[-1] = PlanSegment(change.at_step, effective)
        else:
            segments.append(PlanSegment(change.at_step, effective))
    return _split_at_points(segments)


def _split_at_points(segments: Sequence[PlanSegment]) -> tuple[PlanSegment, ...]:
    """``segments``, each with a ``tokens_per_step`` spec also cut at its mixture points (the
    pieces keep the same spec object). Why: a token budget is a number of draws per step at the
    mixture's mean unit length, and that mean moves with the mixture: one draw count for the
    whole schedule would give steps of the wrong size after a point that favours shorter or
    longer units. A segment's draws are computed at its start (see ``job._segment_schedule``),
    so a cut at every point gives each piece of the schedule its own."""
    out: list[PlanSegment] = []
    for i, seg in enumerate(segments):
        out.append(seg)
        if not seg.spec.batch.tokens_per_step:
            continue
        end = segments[i + 1].start if i + 1 < len(segments) else None
        out.extend(PlanSegment(step, seg.spec) for step, _ in seg.spec.mixture.points
                   if step > seg.start and (end is None or step < end))
    return tuple(out)
