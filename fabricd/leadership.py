"""What the leader decides, once per loop turn, while it holds the lease.

- Skipped samples reported by constructors (anywhere) are recorded, so a replay drops them too.
  Each report is checked on its own (a known active job, a step in ``[0, MAX_STEP]``, a source of
  the job, a sample id of that source, a piece of that sample); a bad one is dropped and counted,
  the others go on. A report stays pending until the record that holds it is appended (a refused
  proposal keeps it); at most ``MAX_PENDING_SKIPS`` wait, and a report past that is dropped and
  counted: safe, because a constructor re-sends its report until it sees the skip committed.
- Trainers' host declarations, passed on in the members' heartbeats, are recorded
  (``trainer_host``), newest per rank.
- Source-loader pools are resized from the loaders' counters (see ``cluster.autoscale``).
- Every ``PLACE_EVERY_S``, every job's roles are placed (see ``cluster.placement``): new roles,
  roles of dead daemons, constructors away from their trainers' host; roles no job wants any
  more are released.
- Trainer progress, as the constructors report it, is recorded every ``PROGRESS_EVERY_S``: one
  ``job_progress`` record per job (a floor and the ranks far ahead of it, see ``cluster.progress``).
- Plan changes (``fabricctl plan update``, or an online mixing policy running in the leader) go
  through one entry point, :meth:`Leadership.propose_plan_change`: checked (``plan_control``),
  then recorded as a ``plan_changed`` record stamped with this leader's term.
- Online mixing (``[mixture] online``): the trainers' loss reports feed the job's policy, whose
  rounds become plan changes at future steps (see ``online_mixing``).

Nothing here touches a socket: decisions go through ``propose`` (the daemon's: append to the
checkpoint log and replicate), and the replicated state is where they take effect.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping

import msgspec

import numpy as np

from fabric_client import protocol
from fabric_client.limits import MAX_STEP

from .cluster.autoscale import (
    EVALUATE_EVERY_S,
    PoolAutoscaler,
    PoolReading,
    pool_bounds,
    weights_now_and_ahead,
)
from .cluster.controller import SYNC_SLACK_S, ClusterController
from .cluster.records import PlanChange
from .cluster.progress import progress_record
from .cluster.placement import (
    MEMORY_GUARD_PERCENT,
    group_hosts,
    loader_prefix,
    nodes_by_host,
    place_roles,
    pool_prefix,
    wanted_roles,
)
from .config import NodeConfig
from .job import JobRuntime
from .errors import ConfigError
from .plan_changes import checked, describe_change, plan_segments, spec_at, weights_at
from .plan_control import PlanChangeRefused, changeable_from, check_plan_change
from .online_mixing import ONLINE_ORIGIN, OnlineMixer
from .planner.online import OdmState
from .spec_bounds import role_slots

__all__ = ["PROGRESS_EVERY_S", "MAX_PENDING_SKIPS", "Leadership"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
PLACE_EVERY_S = 0.25  # placement passes (O(roles + trainer ranks)) at most this often, not every loop turn
MAX_PENDING_SKIPS = 10_000  # skip reports waiting to be recorded; constructors re-send the ones dropped
MAX_SKIP_REASON_CHARS = 500
#: Seconds of trainer progress a plan change's frontier keeps clear of, past what the leader has
#: seen (added as steps at the job's recent rate; nothing for trainers that stand still), on top
#: of the time a daemon may go on answering plans without the change (see ``advance_margin``):
#: for the rate's jitter and the replan.
PLAN_CHANGE_SLACK_S = 1.0
#: Seconds of positions the rate of a job's trainers is measured over.
RATE_WINDOW_S = 10.0

Entries = list[tuple[str, dict]]


class Leadership:
    """The leader's duties for the daemon ``cfg.node_id``; ``jobs`` is the daemon's (live) job table."""

    def __init__(self, cfg: NodeConfig, cluster: ClusterController, jobs: Mapping[str, JobRuntime],
                 propose: Callable[[Entries, float], bool]) -> None:
        self.cfg, self.cluster, self.jobs, self.propose = cfg, cluster, jobs, propose
        self.pending_skips: list[dict] = []  # skip reports received while leader, not yet recorded
        # the same reports by (job, step) → (source, sample_id, piece): what plan replies name pending
        self._pending_units: dict[tuple, set[tuple]] = {}
        self.counters = {"skips_invalid": 0, "skips_overflowed": 0, "skips_recorded": 0, "skips_refused_delivered": 0,
                         "plan_changes_recorded": 0, "plan_changes_refused": 0}
        self._next_progress = 0.0
        self._next_autoscale = 0.0
        self._next_placement = 0.0
        self._autoscaler: tuple[float | None, PoolAutoscaler] | None = None  # (leader since, its autoscaler)
        self._seen: dict[str, deque[tuple[float, int]]] = {}  # job → (time, furthest trainer position), recent
        self.mixers: dict[str, OnlineMixer] = {}  # job → its online-mixing policy (jobs with [mixture] online)
        self.counters.update(losses_ignored=0, online_rounds=0, online_refused=0)

    def run(self, now: float) -> None:
        """One turn of the leader's duties (call only while this daemon holds the lease)."""
        if self.pending_skips:
            self._record_skips(now)
        self._record_hosts(now)
        if not self.cluster.settled(now):
            return  # wait until every live member had a chance to say so before moving roles
        live = self.cluster.members.live(now)
        if now >= self._next_autoscale:
            self._next_autoscale = now + EVALUATE_EVERY_S
            resizes = self._autoscale(now, live)
            if resizes:
                self.propose(resizes, now)  # applied at once: the placement below sees the new sizes
        if now >= self._next_placement:
            self._next_placement = now + PLACE_EVERY_S
            self._place(now, live)
        if now >= self._next_progress:
            self._next_progress = now + PROGRESS_EVERY_S
            self._record_progress(now)
            self._online_mix(now)

    def add_skip(self, report: dict) -> bool:
        """Queue one skip report (keys of a ``sample_skipped`` record) to be recorded. Returns False
        when it was dropped because ``MAX_PENDING_SKIPS`` reports already wait (counted; the
        constructor re-sends it). A report already pending is not queued twice."""
        at, unit = _pending_key(report)
        if unit in self._pending_units.get(at, ()):
            return True
        if len(self.pending_skips) >= MAX_PENDING_SKIPS:
            self.counters["skips_overflowed"] += 1
            if self.counters["skips_overflowed"] in (1, 10, 100) or self.counters["skips_overflowed"] % 1000 == 0:
                log.warning("%d skip reports dropped: %d already wait to be recorded",
                            self.counters["skips_overflowed"], MAX_PENDING_SKIPS)
            return False
        self.pending_skips.append(report)
        self._pending_units.setdefault(at, set()).add(unit)
        return True

    def propose_plan_change(self, job_id: str, change: PlanChange, *, origin: str,
                            now: float | None = None) -> PlanChange | PlanChangeRefused:
        """Validate ``change`` of ``job_id``'s plan and record it: the one way a plan changes.

        Returns the record as logged (``job`` = ``job_id``, ``origin``, ``term`` = this leader's
        term), in effect from ``change.at_step`` on for every rank once committed; or a
        :class:`~fabricd.plan_control.PlanChangeRefused` (``code`` ``not_leader``,
        ``unknown_job``, ``not_ready``, ``too_late`` with the first changeable step in
        ``frontier``, or ``invalid`` naming the key and value). Call it on the daemon's loop thread
        (it reads the replicated state and appends to the log); to check the change it builds the
        planner of the segment the change starts, the job's other segments reused
        (``job.SegmentPlans``), so it costs about one segment's planner build, never a wait on the
        network.
        """
        now = time.monotonic() if now is None else now
        if not self.cluster.is_leader(now):
            return self._refused(PlanChangeRefused("not_leader", f"{self.cfg.node_id} is not the leader; leader: "
                                                                 f"{self.cluster.leader or 'unknown'}"))
        try:
            change = checked(msgspec.structs.replace(change, job=job_id, origin=origin, term=self.cluster.term))
        except ConfigError as e:
            return self._refused(PlanChangeRefused("invalid", str(e)))
        runtime = self.jobs.get(job_id)
        margin = self.advance_margin(job_id, runtime, now) if runtime is not None else 0
        _, refused = check_plan_change(self.cluster.state, runtime, change, self.trainer_positions(job_id), margin)
        if refused is not None:
            return self._refused(refused)
        if not self.propose([("plan_changed", msgspec.to_builtins(change))], now):
            return self._refused(PlanChangeRefused("not_leader", "the change could not be recorded (lost the lease, "
                                                                 "or the log refused it; see the daemon log)"))
        self.counters["plan_changes_recorded"] += 1
        log.warning("job %s: plan change recorded %s", job_id, describe_change(change))
        return change

    def changeable_from(self, job: str, now: float | None = None) -> int:
        """The first step of ``job`` a plan change may take effect at now (see ``plan_control``)."""
        runtime = self.jobs[job]
        logged = [e.change for e in self.cluster.state.plan_changes.get(job, ())]
        return changeable_from(self.cluster.state, runtime, self.trainer_positions(job), logged,
                               self.advance_margin(job, runtime, time.monotonic() if now is None else now))

    def advance_margin(self, job: str, runtime: JobRuntime, now: float) -> int:
        """Steps ``job``'s trainers may advance past what this leader has seen before a change
        is in effect everywhere or nowhere: their recent rate × ``change_horizon_s()``."""
        seen = self._seen.get(job)
        if not seen or len(seen) < 2:
            return 0
        (t0, s0), (t1, s1) = seen[0], seen[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
        return math.ceil(max(0.0, rate) * self.change_horizon_s())

    def change_horizon_s(self) -> float:
        """Seconds from a change's acceptance until no daemon answers a plan without it. A daemon
        holding the change's record holds its steps until the record is committed (``JobRuntime.
        hold_from``); one that never got it (the leader died first) answers plans only while in
        touch: at most ``lease_duration_s`` + ``SYNC_SLACK_S`` after its last sync, which came
        before the change. The leader's view of the trainers is up to two heartbeats old (a
        constructor's beat to its daemon, the daemon's to the leader)."""
        return (2 * self.cfg.heartbeat_s + self.cfg.cluster.lease_duration_s + SYNC_SLACK_S
                + PLAN_CHANGE_SLACK_S)

    def _note_positions(self, now: float, positions: Mapping[str, Mapping[tuple[int, int], int]]) -> None:
        """Remember each job's furthest trainer position over the last ``RATE_WINDOW_S``."""
        for job, ranks in positions.items():
            if ranks:
                seen = self._seen.setdefault(job, deque())
                seen.append((now, max(ranks.values())))
                while len(seen) > 2 and now - seen[0][0] > RATE_WINDOW_S:
                    seen.popleft()
        for job in [j for j in self._seen if j not in positions]:
            del self._seen[job]

    def _refused(self, refused: PlanChangeRefused) -> PlanChangeRefused:
        self.counters["plan_changes_refused"] += 1
        log.info("plan change refused (%s): %s", refused.code, refused.reason)
        return refused

    def trainer_positions(self, job: str) -> dict[tuple[int, int], int]:
        """(dp, mp) → the furthest step a trainer of ``job`` is known to be at, from the
        constructors' heartbeats (not yet recorded progress included)."""
        return self._trainer_positions().get(job, {})
    def add_losses(self, msg: protocol.LossReport) -> None:
        """Feed a (constructor-merged) loss report to its job's online-mixing policy; a report of
        a job without ``[mixture] online`` is dropped and counted here, one naming a source the
        job lacks by the job's mixer."""
        runtime = self.jobs.get(msg.job)
        if runtime is None or not runtime.spec.online.enabled or not self.cluster.state.is_active(msg.job):
            self.counters["losses_ignored"] += 1
            return
        self._mixer(msg.job, runtime).add(msg)

    def online_status(self) -> dict[str, dict]:
        """Per job with online mixing on this leader: reports kept, refused, and rounds run."""
        return {job: {**m.counters, "rounds": m.state.rounds if m.state is not None else 0,
                      "next_round_step": m.next_round} for job, m in sorted(self.mixers.items())}

    def _mixer(self, job: str, runtime: JobRuntime) -> OnlineMixer:
        mixer = self.mixers.get(job)
        if mixer is None or mixer.spec is not runtime.spec:  # new, or resubmitted with another spec
            mixer = self.mixers[job] = OnlineMixer(runtime.spec)
            logged = [e.change for e in self.cluster.state.plan_changes.get(job, ())
                      if e.change.origin == ONLINE_ORIGIN and e.change.policy is not None]
            if logged:  # a new leader, or a restart: continue the policy where the log has it
                last = logged[-1]
                try:
                    mixer.resume(OdmState.from_record(last.policy, len(runtime.spec.sources)), last.at_step)
                except ValueError as e:
                    log.warning("job %s: online mixing starts afresh: the logged policy state is unusable: %s", job, e)
        return mixer

    def _online_mix(self, now: float) -> None:
        """One policy round for every job whose slowest trainer passed its next round step; its
        new weights are proposed as a plan change at the first step still changeable (plus the
        job's ``online_lead_steps``). A refused change (say the trainers outran the frontier)
        is tried again at the next pass, with the reports kept."""
        state = self.cluster.state
        for job in [j for j in self.mixers if j not in self.jobs or not state.is_active(j)]:
            del self.mixers[job]
        for job, mixer in sorted(self.mixers.items()):
            runtime = self.jobs[job]
            floor = state.progress_floor.get(job, 0)
            if not mixer.due(floor) or runtime.state != "ready":
                continue
            logged = [e.change for e in state.plan_changes.get(job, ())]
            # past the policy's own last change too: the frontier can fall back when the trainers
            # slow down, and an older round must never override a newer one (changes apply in step order)
            last = max((c.at_step for c in logged if c.origin == ONLINE_ORIGIN), default=-1)
            at_step = max(self.changeable_from(job, now) + runtime.spec.online.lead_steps, last + 1)
            segments = plan_segments(runtime.spec, logged)
            drawn = weights_at(spec_at(segments, floor), floor)
            change = mixer.round(at_step, [drawn[s.name] for s in runtime.spec.sources])
            result = self.propose_plan_change(job, mixer.change_record(change), origin=ONLINE_ORIGIN, now=now)
            if isinstance(result, PlanChangeRefused):
                self.counters["online_refused"] += 1
                log.warning("job %s: online mixing change refused (%s): %s", job, result.code, result.reason)
                continue
            mixer.applied(change, floor)
            self.counters["online_rounds"] += 1
            log.info("job %s: online mixing round %d: weights %s from step %d", job, change.state.rounds,
                     dict(change.weights), change.at_step)

    def pending_units(self, job: str, step: int) -> set[tuple[str, int, int]]:
        """``(source, sample_id, piece)`` of ``job``'s reports for ``step`` waiting to be appended."""
        return self._pending_units.get((job, step), set())

    def _record_skips(self, now: float) -> None:
        """Propose the valid pending skip reports; they leave the pending list only once appended."""
        state = self.cluster.state
        entries, waiting = [], []
        delivered: dict[tuple[str, int], int] = {}  # (job, dp rank) → the furthest step a trainer of it is at
        for job, ranks in self._trainer_positions().items():
            for (dp, _mp), step in ranks.items():
                delivered[(job, dp)] = max(step, delivered.get((job, dp), -1))
        for report in self.pending_skips:
            verdict = self._check_skip(report)
            if verdict == "wait":
                waiting.append(report)
            elif verdict:
                self.counters["skips_invalid"] += 1
                log.warning("skip report dropped: %s: %.300r", verdict, report)
            elif (report["source"], report["sample_id"], report["piece"], report["step"]) \
                    in state.skipped.get(report["job"], ()):
                continue
            elif delivered.get((report["job"], report.get("dp_rank")), -1) > report["step"]:
                # a trainer of the unit's rank is past the step: some constructor delivered the
                # batch with the unit (a late or re-sent report, say from behind a partition)
                self.counters["skips_refused_delivered"] += 1
                log.warning("skip report refused: a trainer of dp rank %s is at step %d, past step %d: %.300r",
                            report.get("dp_rank"), delivered[(report["job"], report.get("dp_rank"))],
                            report["step"], report)
            else:
                data = {k: v for k, v in report.items() if k != "dp_rank"}
                entries.append(("sample_skipped", {**data, "reason": report["reason"][:MAX_SKIP_REASON_CHARS]}))
        recorded = not entries or self.propose(entries, now)
        if recorded:
            self.counters["skips_recorded"] += len(entries)
            self.pending_skips = waiting
        else:  # not appended (lost the lease, log error): everything still valid stays pending
            self.pending_skips = waiting + [data for _, data in entries]
        self._pending_units = {}
        for r in self.pending_skips:
            at, unit = _pending_key(r)
            self._pending_units.setdefault(at, set()).add(unit)

    def _trainer_positions(self) -> dict[str, dict[tuple[int, int], int]]:
        """job → (dp, mp) → the furthest step a trainer of that rank is known to be at, from the
        constructors' heartbeats (every step before it was delivered to that rank)."""
        out: dict[str, dict[tuple[int, int], int]] = {}
        for member in self.cluster.members.members.values():
            for rid, view in member.roles.items():
                ranks = out.setdefault(rid.split("/", 1)[0], {})
                for dp, mp, step in view.trainers:  # typed and range-checked at decode
                    if step > ranks.get((dp, mp), -1):
                        ranks[(dp, mp)] = step
        return out

    def _check_skip(self, r: dict) -> str:
        """"" for a report that can be recorded, "wait" while its job is still indexing, else why not."""
        job = self.jobs.get(r.get("job")) if isinstance(r.get("job"), str) else None
        if job is None or not self.cluster.state.is_active(r["job"]):
            return f"job {r.get('job')!r} is not an active job"
        if job.state == "indexing":
            return "wait"
        if job.planner is None:
            return f"job {r['job']!r} is {job.state}"
        fields = (r.get("step"), r.get("sample_id"), r.get("piece"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields) \
                or not isinstance(r.get("source"), str) or not isinstance(r.get("reason"), str):
            return "fields of the wrong type"
        if not 0 <= r["step"] <= MAX_STEP:
            return f"step {r['step']} outside [0, {MAX_STEP}]"
        units = next((u for u in job.planner.sources_at(r["step"]) if u.name == r["source"]), None)
        if units is None:
            return f"job {r['job']!r} has no source {r['source']!r}"
        samples = job.indexes[r["source"]].num_samples
        if not 0 <= r["sample_id"] < samples:
            return f"sample_id {r['sample_id']} outside source {r['source']!r} of {samples} samples"
        lo, hi = np.searchsorted(units.sample_id, [r["sample_id"], r["sample_id"] + 1])
        if not 0 <= r["piece"] < hi - lo:
            return f"piece {r['piece']} outside the {hi - lo} pieces of sample {r['sample_id']} of {r['source']!r}"
        return ""

    def _place(self, now: float, live: list[str]) -> None:
        """Place every ready job's roles; release the roles no job wants any more."""
        state, members = self.cluster.state, self.cluster.members.members
        load = Counter(r.node for r in state.roles.values())
        cpu = {n: v.telemetry.cpu_percent for n, v in members.items()}
        memory = {n: v.telemetry.mem_used_percent for n, v in members.items()}
        cores = {n: v.cpus for n, v in members.items()}
        on_host = nodes_by_host({p.node_id: {p.node_id, p.control.rsplit(":", 1)[0].split("://")[-1],
                                             members[p.node_id].telemetry.hostname or p.node_id}
                                 for p in self.cfg.cluster.peers if p.node_id in members})
        entries: list[tuple[str, dict]] = []
        for name, job in self._ready_jobs():
            group_nodes = {g: on_host.get(host, ())
                           for g, host in group_hosts(job.spec, state.hosts.get(name, {})).items()}
            wants = {w.role_id: w for w in wanted_roles(job.spec, fingerprint=job.fingerprint,
                                                         default_workers=self.cfg.loader_workers,
                                                         standby=len(self.cfg.cluster.peers) > 1,
                                                         group_nodes=group_nodes,
                                                         pool_sizes=state.pools.get(name))}
            # a role whose arguments changed (a new fingerprint, say) is placed afresh
            current = {rid: r.node for rid, r in state.roles.items()
                       if r.job == name and rid in wants and r.extra == wants[rid].extra}
            moves = place_roles(list(wants.values()), live=live, current=current, load=load, cpu=cpu, memory=memory,
                                cores=cores)
            for rid, node in moves.items():
                want = wants[rid]
                entries.append(("role_assigned", {"role_id": rid, "job": name, "kind": want.kind, "node": node,
                                                  "extra": want.extra}))
            entries += [("role_released", {"role_id": rid, "reason": "no longer wanted"})
                        for rid, r in state.roles.items() if r.job == name and rid not in wants]
        if entries:
            for kind, data in entries:
                log.info("%s %s → %s", kind, data["role_id"], data.get("node", "-"))
            self.propose(entries, now)

    def _autoscale(self, now: float, live: list[str]) -> list[tuple[str, dict]]:
        """Pool resizes from the loaders' counters in the members' heartbeats (see ``autoscale``)."""
        if self._autoscaler is None or self._autoscaler[0] != self.cluster.leader_since:
            self._autoscaler = (self.cluster.leader_since, PoolAutoscaler())  # fresh each term
        state, members = self.cluster.state, self.cluster.members.members
        # per pool (``pool_prefix`` of a loader's id: its ``loader_prefix``), its workers' counters
        # and the cores the busiest used since its previous beat; one pass over the role processes
        counters: dict[str, dict[str, tuple[float, float]]] = {}
        busiest: dict[str, float] = {}
        for node in live:
            for rid, t in members[node].telemetry.role_processes.items():
                prefix = pool_prefix(rid)
                counters.setdefault(prefix, {})[rid] = (float(t.units), float(t.busy_s))
                busiest[prefix] = max(busiest.get(prefix, 0.0), t.cpu_percent / 100.0)
        cpus = sum(members[n].cpus for n in live)
        spare_roles = sum(max(0, role_slots(members[n].cpus) - members[n].telemetry.roles) for n in live)
        readings = []
        for name, job in self._ready_jobs():
            auto = job.spec.autoscale
            guard = auto.cpu_guard_percent
            roomy = [members[n] for n in live if members[n].telemetry.mem_used_percent < MEMORY_GUARD_PERCENT]
            headroom = any(not guard or m.telemetry.cpu_percent < guard for m in roomy)
            if not guard:
                spare_cpus: float | None = math.inf  # no CPU guard: CPU bounds nothing
            elif all(m.cpus for m in roomy):
                spare_cpus = sum(m.cpus * max(0.0, guard - m.telemetry.cpu_percent) / 100.0 for m in roomy)
            else:
                spare_cpus = None  # a daemon with room that does not report its cores: unknown
            weights = weights_now_and_ahead(job.planner.schedule, state.floor_step(name), auto.lookahead_steps)
            for s in job.spec.sources:
                base, maximum = pool_bounds(job.spec, s.name, self.cfg.loader_workers, cpus)
                prefix = loader_prefix(name, s.name)
                readings.append(PoolReading(name, s.name, state.pools.get(name, {}).get(s.name, base), base, maximum,
                                            counters.get(prefix, {}), *weights[s.name],
                                            target_utilization=auto.target_utilization, headroom=headroom,
                                            spare_cpus=spare_cpus, spare_roles=spare_roles,
                                            cpu_per_worker=busiest.get(prefix, 1.0)))
        out = []
        for r in self._autoscaler[1].evaluate(now, readings):
            log.info("job %s: pool %s %d → %d workers (%s)", r.job, r.source, r.previous, r.size, r.reason)
            out.append(("pool_resized", {"job": r.job, "source": r.source, "workers": r.size}))
        return out

    def _ready_jobs(self) -> list[tuple[str, JobRuntime]]:
        """The jobs whose planner is ready and which the state holds active."""
        return [(name, job) for name, job in self.jobs.items()
                if job.state == "ready" and self.cluster.state.is_active(name)]

    def _record_hosts(self, now: float) -> None:
        """Record the trainers' host declarations the members pass on (the newest per rank)."""
        state = self.cluster.state
        newest: dict[tuple[str, int, int], tuple[str, int]] = {}
        for member in self.cluster.members.members.values():
            for job, dp, mp, host, ms in member.telemetry.trainer_hosts:
                key, value = (job, dp, mp), (host, ms)
                if key not in newest or value[1] > newest[key][1]:
                    newest[key] = value
        entries = []
        for (job, dp, mp), (host, ms) in sorted(newest.items()):
            if not state.host_is_news(job, dp, mp, host, ms):
                continue
            log.info("job %s: trainer dp %d mp %d runs on host %s", job, dp, mp, host)
            entries.append(("trainer_host", {"job": job, "dp_rank": dp, "mp_rank": mp, "host": host,
                                             "declared_ms": ms}))
        if entries:
            self.propose(entries, now)

    def _record_progress(self, now: float) -> None:
        """One ``job_progress`` record per job whose floor or far-ahead ranks moved (see
        ``cluster.progress``): O(jobs) records per pass, whatever the number of ranks."""
        state = self.cluster.state
        entries = []
        positions = self._trainer_positions()
        self._note_positions(now, positions)
        for job, ranks in sorted(positions.items()):
            if not state.is_active(job):
                continue
            runtime = self.jobs.get(job)
            data = progress_record(state, job, ranks, runtime.spec.topology.mp_size if runtime is not None else None)
            if data is not None:
                entries.append(("job_progress", data))
        if entries:
            self.propose(entries, now)


def _pending_key(report: dict) -> tuple[tuple, tuple]:
    """``((job, step), (source, sample_id, piece))`` of a skip report (fields as sent: unchecked)."""
    return (report.get("job"), report.get("step")), (report.get("source"), report.get("sample_id"), report.get("piece"))

