"""The data-constructor role: builds and delivers the batches of a group of DP ranks.

For every step its trainers need (from the credit protocol's demand, at most ``window`` steps
ahead of the slowest rank), the constructor asks the daemon's planner for its ranks' plan rows,
fetches the units from the source-loader pools (load-balanced: at most ``MAX_IN_FLIGHT`` requests
per worker, a request that times out is retried on another worker), packs each micro-batch,
serializes it once, and hands it to :class:`TrainerDelivery`, which sends it to every
model-parallel rank of the DP rank as their credits allow.

Every buffer is bounded: steps outside the window are not built, built steps the slowest
trainer has passed are evicted, and a trainer that comes back for an evicted step gets it
rebuilt (the content is a pure function of the plan, so it is the same batch).

Skips (the rule is in ``fabricd.assemble``): the plan reply carries the step's committed skip
records, and exactly those units are dropped (they are not even loaded). A unit that fails to
load is loaded once more (``UNIT_RETRIES``); if it fails again it is reported (``SkipReport``, re-sent
every ``REPORT_RESEND_S`` until recorded) and its rank's batches of that step wait: the step's
plan is asked again every ``SKIP_POLL_S`` until its skip records include the unit. A reported unit
is never delivered, even by a later rebuild of the step. A plan reply whose skip records changed
under an already built rank rebuilds that step. The plan reply also names the step's units whose
skip records are pending (reported by some constructor, not committed yet): a rank with such a
unit waits too, until the record is committed (the unit is dropped) or gone (it is delivered), so
that a constructor which loaded the unit fine never delivers what the log then skips. Conversely,
a unit that fails in a micro-batch some trainer of the rank is already past (another constructor
delivered it before this one took over) is never reported: that would contradict what the trainer
holds. It is loaded again, backing off, until it loads. And a failed unit that no trainer
subscribed here needs any more (it moved to another constructor, which may deliver the unit) is
not reported either: its rank waits, and the unit is reported only once a trainer here needs it.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from fabric_client import protocol
from fabric_client.batch import encode_batch
from fabric_client.errors import ProtocolError
from fabric_client.limits import MAX_STEP

from .. import local_ipc
from ..assemble import RECORDED_SKIP, UnitKey, apply_skip_records, assemble_micro_batch
from ..config import JobSpec, parse_job_spec
from ..ratelog import RateLimitedLog, truncate
from .base import DaemonLink, RoleArgs, StopFlag, local_router, role_sockets
from .delivery import EncodedBatch, TrainerDelivery, TrainerSockets
from .sample_wire import decode_load_reply

__all__ = ["run_constructor", "Constructor"]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2          # load requests per source-loader worker
UNITS_PER_REQUEST = 8
LOAD_TIMEOUT_S = 30.0
HEDGE_S = 0.75             # a request unanswered this long is also sent to another free worker
LOAD_ATTEMPTS = 3
PLAN_TIMEOUT_S = 5.0
PLAN_RETRY_S = 0.1         # a step the daemon is still planning (NOT_READY) is asked for again this soon
_PLANNING = re.compile(r"^step (\d+)(?: is being planned|: )")  # NOT_READY for a step: ask again soon
POOLS_REFRESH_S = 1.0
#: the job's ``compression`` → (what a batch is built with, what it is re-encoded with for a
#: trainer on another machine: ``TrainerDelivery(remote_compression=...)``)
WIRE_COMPRESSION = {"lz4": ("lz4", None), "none": (None, None), "auto": (None, "lz4")}
LOSS_FLUSH_S = 0.5  # trainers' loss reports are merged and passed on at most this often
UNIT_RETRIES = 1           # loads of a failed unit before it is reported as skipped
SKIP_POLL_S = 0.2          # how often a step waiting for skip records asks for its plan again
REPORT_RESEND_S = 1.0      # how often an unrecorded skip is reported again (doubling up to 8 s)
MAX_REPORTED = 10_000      # reported, not yet seen recorded: (step, unit) entries kept


@dataclass
class _LoadJob:
    source: str
    rows: np.ndarray          # row indices into the step build
    attempts: int = 0
    hedged: bool = False      # a duplicate was sent to a second worker; the first answer wins


@dataclass
class _StepBuild:
    step: int
    rows: dict[str, np.ndarray]            # plan columns for this group's ranks
    num_micro: dict[int, int]
    results: list[Any]                     # SampleData | reason str | None (pending)
    pending_by_rank: dict[int, int]
    skips: set[UnitKey] = field(default_factory=set)         # committed skip records of the step
    pending: set[UnitKey] = field(default_factory=set)       # reported, their records not committed yet
    failures: dict[int, int] = field(default_factory=dict)   # row → failed loads
    waiting: set[int] = field(default_factory=set)           # ranks held for skip records
    reload: dict[int, list[float]] = field(default_factory=dict)  # row → [next load, interval]: see _assemble
    assembled: set[int] = field(default_factory=set)
    batches: dict[tuple[int, int], EncodedBatch] = field(default_factory=dict)
    contexts: dict[str, tuple[int, str]] = field(default_factory=dict)  # source → (max_seq_len, long_samples) of a plan change

    def key(self, row: int) -> UnitKey:
        return (int(self.rows["source"][row]), int(self.rows["sample_id"][row]), int(self.rows["piece"][row]))


@dataclass
class _Report:
    """A unit reported as skipped whose record this constructor has not seen committed yet."""

    reason: str
    due: float       # when to send it again
    interval: float  # the resend backoff
    rank: int        # the DP rank and micro-batch holding it: re-sent only while a trainer needs it
    micro: int


@dataclass
class _Worker:
    endpoint: str
    sock: zmq.Socket
    in_flight: dict[int, tuple[_LoadJob, int, float]] = field(default_factory=dict)  # req_id → (job, step, sent)
    local: bool = False  # over this node's private Unix socket (fabricd.local_ipc), not TCP


class Constructor:
    """One constructor process's state and event loop (sockets owned here)."""

    def __init__(self, args: RoleArgs, spec: JobSpec, ctx: zmq.Context) -> None:
        self.args = args
        self.spec = spec
        self.ctx = ctx
        self.ranks = [int(r) for r in args.extra["ranks"]]
        self.dp_size = spec.topology.dp_size
        self.window = max(2, spec.batch.prefetch)
        self.source_names = [s.name for s in spec.sources]
        self.compression, remote = WIRE_COMPRESSION[spec.batch.compression]

        self.sockets = role_sockets(ctx, args)
        stream = self.sockets.router(domain="stream")
        port = stream.bind_to_random_port(f"tcp://{args.bind_host}")
        self.link = DaemonLink(self.sockets, args, f"tcp://{args.bind_host}:{port}")
        # trainers of this host running as the daemon's user (or in [security] trainer_group) may
        # stream over a Unix socket (fabricd.local_ipc), unless the job names the trainer keys it
        # admits: only a key says who
        local = None if spec.trainers else local_router(self.sockets, args, self.link.endpoint, domain="stream")
        self.trainers = TrainerSockets([stream] if local is None else [stream, local])
        self.delivery = TrainerDelivery(self.trainers, job=spec.name, fingerprint=args.extra["fingerprint"],
                                        ranks=self.ranks, mp_size=spec.topology.mp_size,
                                        remote_compression=remote)
        self.poller = zmq.Poller()
        for sock in self.trainers.sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.link.sock, zmq.POLLIN)

        self.builds: dict[int, _StepBuild] = {}
        self.plan_requested: dict[int, float] = {}
        self.queue: dict[str, deque[tuple[_LoadJob, int]]] = {s: deque() for s in self.source_names}
        self.workers: dict[str, dict[str, _Worker]] = {s: {} for s in self.source_names}
        self.by_socket: dict[zmq.Socket, tuple[str, _Worker]] = {}
        self.req_ids = itertools.count(1)
        self.next_pools = 0.0
        self.next_losses = 0.0
        self.reported: dict[tuple[int, UnitKey], _Report] = {}  # (step, unit) → its unrecorded report
        self.bad_input = RateLimitedLog(log)  # warnings about hostile or broken input, rate-limited
        self.stats = {"built_batches": 0, "skipped_units": 0, "malformed": 0, "load_retries": 0, "hedged": 0,
                      "plans": 0, "evicted_steps": 0, "ranks": self.ranks, "unit_retries": 0, "skip_reports": 0,
                      "waiting_for_skips": 0, "rebuilt_for_skips": 0,
                      "delivered_unit_reloads": 0, "forbidden": 0}

    # -- main loop -------------------------------------------------------------------------

    def run(self, stop: StopFlag) -> None:
        log.info("constructor %s for ranks %s serving on %s", self.args.role_id, self.ranks, self.link.endpoint)
        started, waited = time.monotonic(), 0.0  # waited: seconds spent in poll
        while not stop.should_stop():
            now = time.monotonic()
            # busy_s: the loop's time not waiting on its sockets. One thread packs, encodes and
            # sends every batch of its ranks: near 1 s per second, it is the job's limit
            self.link.beat(lambda: {**self.stats, **self.delivery.stats(), "builds": len(self.builds),
                                    "load_queues": self._load_queues(), **self._loader_links(),
                                    "busy_s": round(max(0.0, now - started - waited), 3)})
            if now >= self.next_pools:
                self.next_pools = now + POOLS_REFRESH_S
                self.link.send(protocol.PoolsRequest(job=self.spec.name))
            if now >= self.next_losses:
                self.next_losses = now + LOSS_FLUSH_S
                if (losses := self.delivery.take_losses()) is not None:
                    self.link.send(losses)  # to the daemon, which passes it on to the leader
            self._schedule(now)
            self._chase_skips(now)
            self._dispatch(now)
            self.delivery.pump(self._lookup)
            polled = time.monotonic()
            ready = dict(self.poller.poll(20))
            waited += time.monotonic() - polled
            for sock in ready:
                self._on_readable(sock)

    def close(self) -> None:
        for workers in self.workers.values():
            for w in workers.values():
                w.sock.close(linger=0)
        self.link.close()
        self.trainers.close(linger=200)  # lets a farewell reach the trainers; bounded
        self.sockets.close()  # the authenticator thread, once no socket needs it

    def _loader_links(self) -> dict[str, int]:
        """Source-loader workers connected now, and those of them reached over this node's Unix socket."""
        workers = [w for pool in self.workers.values() for w in pool.values()]
        return {"loader_links": len(workers), "local_loader_links": sum(w.local for w in workers)}

    def _load_queues(self) -> dict[str, tuple[int, int]]:
        """Per source: load requests waiting for a free worker, and requests in flight."""
        return {s: (len(self.queue[s]), sum(len(w.in_flight) for w in self.workers[s].values()))
                for s in self.source_names}

    # -- what to build ------------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        demand = self.delivery.demand()
        if not demand:
            return
        lo = min(step for step, _ in demand.values())
        hi = min(max(step for step, _ in demand.values()), lo + self.window) + self.window
        for step in [s for s in self.builds if s < lo]:
            del self.builds[step]
            self.stats["evicted_steps"] += 1
        for step in range(lo, min(hi, MAX_STEP + 1)):  # no step past MAX_STEP exists
            if step in self.builds:
                continue
            sent = self.plan_requested.get(step)
            if sent is None or now - sent > PLAN_TIMEOUT_S:
                self.plan_requested[step] = now
                self.link.send(protocol.PlanRequest(job=self.spec.name, step=step, ranks=self.ranks))
        for step in [s for s in self.plan_requested if s < lo or s >= hi]:
            del self.plan_requested[step]

    def _on_refused(self, msg: protocol.ErrorReply) -> None:
        planning = _PLANNING.match(msg.reason) if msg.code == protocol.ErrorCode.NOT_READY else None
        if planning is None:
            log.warning("daemon refused a request: %s: %s", msg.code, msg.reason)
            return
        step = int(planning.group(1))
        if step in self.plan_requested:  # ask again after a short backoff, not after PLAN_TIMEOUT_S
            self.plan_requested[step] = min(self.plan_requested[step], time.monotonic() + PLAN_RETRY_S - PLAN_TIMEOUT_S)

    def _on_plan(self, msg: protocol.PlanReply, payload: list) -> None:
        if msg.step not in self.plan_requested:
            return  # not wanted any more, or a duplicate answer
        del self.plan_requested[msg.step]
        if len(payload) != len(msg.columns) or len(msg.dtypes) != len(msg.columns):
            raise ProtocolError(protocol.ErrorCode.MALFORMED, "plan_reply columns and frames differ")
        skips = set(msg.skips)  # (source, sample_id, piece) triples: typed and bounded at decode
        pending = set(msg.pending) - skips
        old = self.builds.get(msg.step)
        if old is not None:
            self._update_skips(old, skips, pending, msg, payload)
            return
        self._start_build(msg, payload, skips, pending)

    def _start_build(self, msg: protocol.PlanReply, payload: list, skips: set[UnitKey], pending: set[UnitKey]) -> None:
        rows = {name: np.frombuffer(f.buffer, np.dtype(dt)) for name, dt, f in zip(msg.columns, msg.dtypes, payload)}
        if any(len(col) != msg.rows for col in rows.values()):
            raise ProtocolError(protocol.ErrorCode.MALFORMED, "plan_reply column lengths differ")
        build = _StepBuild(
            step=msg.step, rows=rows, num_micro=dict(zip(self.ranks, msg.num_micro)),
            results=[None] * msg.rows,
            pending_by_rank={r: int(np.count_nonzero(rows["rank"] == r)) for r in self.ranks},
            skips=skips, pending=pending,
            contexts={self.source_names[s]: (int(n), str(p)) for s, n, p in msg.contexts
                      if 0 <= s < len(self.source_names)},
        )
        self.builds[msg.step] = build
        self.stats["plans"] += 1
        self._forget_recorded(msg.step, skips)
        # recorded units are dropped unread; units this constructor reported are never delivered
        settled = {}
        if skips or any(step == msg.step for step, _ in self.reported):  # the common case: neither
            for row in range(msg.rows):
                key = build.key(row)
                if key in skips:
                    settled[row] = RECORDED_SKIP
                elif (msg.step, key) in self.reported:
                    settled[row] = self.reported[(msg.step, key)].reason
        for src_idx in np.unique(rows["source"]):
            sel = [i for i in np.flatnonzero(rows["source"] == src_idx).tolist() if i not in settled]
            name = self.source_names[int(src_idx)]
            for i in range(0, len(sel), UNITS_PER_REQUEST):
                self.queue[name].append((_LoadJob(name, np.asarray(sel[i:i + UNITS_PER_REQUEST])), msg.step))
        if settled:
            self._resolve(build, np.fromiter(settled, np.int64), list(settled.values()), final=True)
        for rank, count in build.pending_by_rank.items():
            if count == 0 and rank not in build.assembled:
                self._assemble(build, rank)

    def _update_skips(self, build: _StepBuild, skips: set[UnitKey], pending: set[UnitKey], msg: protocol.PlanReply,
                      payload: list) -> None:
        """A newer answer for a step being built: apply skip records that appeared since, and
        release ranks held for records that are now settled."""
        self._forget_recorded(build.step, skips)
        if skips != build.skips:
            added = skips - build.skips
            touched = {int(build.rows["rank"][row]) for row in range(len(build.results)) if build.key(row) in added}
            if not skips >= build.skips or touched & build.assembled:
                # a rank already packed a unit now recorded as skipped (another constructor's report, or
                # records a new leader truncated): its batches must follow the log; build the step again
                log.warning("step %d: skip records changed under built batches; rebuilding", build.step)
                self.stats["rebuilt_for_skips"] += 1
                del self.builds[build.step]
                self._start_build(msg, payload, skips, pending)
                return
            build.skips = skips
            rows = [row for row in range(len(build.results)) if build.key(row) in added]
            rows = [row for row in rows if build.results[row] is None]  # loaded ones are dropped at assembly
            self._resolve(build, np.asarray(rows, np.int64), [RECORDED_SKIP] * len(rows), final=True)
        build.pending = pending
        for rank in sorted(build.waiting):  # held again by _assemble while anything is unsettled
            build.waiting.discard(rank)
            self._assemble(build, rank)

    def _forget_recorded(self, step: int, skips: set[UnitKey]) -> None:
        for key in skips:
            self.reported.pop((step, key), None)

    def _chase_skips(self, now: float) -> None:
        """Re-send unrecorded skip reports (backing off) and ask again for the plans of steps held
        for skip records."""
        for (step, key), r in self.reported.items():
            if now >= r.due and self.delivery.needs(r.rank, step, r.micro):
                # (no longer needed here: not re-sent, lest a report reach the leader after another
                # constructor delivered the unit; it is sent again once a trainer here needs it)
                r.due, r.interval = now + r.interval, min(r.interval * 2, 8 * REPORT_RESEND_S)
                self._send_skip(step, key, r.reason, r.rank)
        waiting = 0
        for step, build in self.builds.items():
            due = [row for row, (at, _) in build.reload.items() if now >= at and build.results[row] is None]
            for row in due:
                build.reload[row][0] = float("inf")  # until it fails again (then _reload sets the next time)
                source = self.source_names[build.key(row)[0]]
                self.queue[source].append((_LoadJob(source, np.asarray([row], np.int64)), step))
            if not build.waiting:
                continue
            waiting += len(build.waiting)
            sent = self.plan_requested.get(step)
            if sent is None or now - sent > SKIP_POLL_S:
                self.plan_requested[step] = now
                self.link.send(protocol.PlanRequest(job=self.spec.name, step=step, ranks=self.ranks))
        self.stats["waiting_for_skips"] = waiting

    def _reload(self, build: _StepBuild, row: int, reason: str) -> None:
        """Load a failed unit again later (backing off) instead of reporting it."""
        entry = build.reload.setdefault(row, [0.0, REPORT_RESEND_S])
        wait = entry[1]
        entry[0], entry[1] = time.monotonic() + wait, min(wait * 2, 8 * REPORT_RESEND_S)
        build.results[row] = None
        build.failures.pop(row, None)
        build.pending_by_rank[int(build.rows["rank"][row])] += 1
        self.stats["delivered_unit_reloads"] += 1
        log.warning("step %d: unit %s failed (%s) but its micro-batch was delivered already; loading it again "
                    "in %.0fs", build.step, build.key(row), reason[:200], wait)

    def _report(self, step: int, key: UnitKey, reason: str, rank: int, micro: int) -> None:
        if (step, key) in self.reported:
            return
        if len(self.reported) >= MAX_REPORTED:
            # that many unrecorded reports means no leader records anything: forget the oldest (a
            # later rebuild of its step could then deliver a unit whose report is still recorded)
            oldest = next(iter(self.reported))
            log.error("%d skip reports unrecorded; forgetting step %d unit %s", MAX_REPORTED, *oldest)
            self.reported.pop(oldest)
        self.reported[(step, key)] = _Report(reason, time.monotonic() + REPORT_RESEND_S, REPORT_RESEND_S, rank, micro)
        self.stats["skip_reports"] += 1
        self._send_skip(step, key, reason, rank)

    def _send_skip(self, step: int, key: UnitKey, reason: str, rank: int) -> None:
        source, sample_id, piece = key
        self.link.send(protocol.SkipReport(job=self.spec.name, step=step, dp_rank=rank, source=self.source_names[source],
                                           sample_id=sample_id, piece=piece, reason=reason))

    # -- fetching units from the source-loader pools -------------------------------------------

    def _on_pools(self, msg: protocol.PoolsReply) -> None:
        for source in self.source_names:
            wanted = set(msg.pools.get(source, []))
            current = self.workers[source]
            for endpoint in list(current):
                if endpoint not in wanted:
                    self._drop_worker(source, endpoint, "left the pool")
            for endpoint in wanted - set(current):
                local = local_ipc.local_endpoint(self.args.extra.get("ipc_dir"), endpoint)
                sock = self.sockets.dealer(local=local is not None)  # a loader of this daemon: plaintext
                sock.connect(local or endpoint)
                worker = _Worker(endpoint, sock, local=local is not None)
                current[endpoint] = worker
                self.by_socket[sock] = (source, worker)
                self.poller.register(sock, zmq.POLLIN)

    def _drop_worker(self, source: str, endpoint: str, why: str) -> None:
        worker = self.workers[source].pop(endpoint)
        log.info("source loader %s (%s) %s; requeueing %d requests", endpoint, source, why, len(worker.in_flight))
        for job, step, _ in worker.in_flight.values():
            self.queue[source].appendleft((job, step))
        self.poller.unregister(worker.sock)
        del self.by_socket[worker.sock]
        worker.sock.close(linger=0)

    def _dispatch(self, now: float) -> None:
        for source, workers in self.workers.items():
            for endpoint, worker in list(workers.items()):
                expired = [rid for rid, (_, _, sent) in worker.in_flight.items() if now - sent > LOAD_TIMEOUT_S]
                if expired:
                    self._drop_worker(source, endpoint, f"did not answer in {LOAD_TIMEOUT_S:.0f}s")
            self._hedge(source, workers, now)
            queue = self.queue[source]
            while queue:
                free = [w for w in workers.values() if len(w.in_flight) < MAX_IN_FLIGHT]
                if not free:
                    break
                job, step = queue.popleft()
                build = self.builds.get(step)
                if build is None:
                    continue  # evicted while queued
                if job.attempts >= LOAD_ATTEMPTS:
                    self._resolve(build, job.rows, [f"no source loader answered in {LOAD_ATTEMPTS} attempts"] * len(job.rows),
                                  final=True)
                    continue
                job.attempts += 1
                if job.attempts > 1:
                    self.stats["load_retries"] += 1
                worker = min(free, key=lambda w: len(w.in_flight))
                if not self._send_load(worker, job, step, now):
                    queue.appendleft((job, step))
                    job.attempts -= 1
                    break

    def _hedge(self, source: str, workers: dict[str, _Worker], now: float) -> None:
        """Send slow requests to a second free worker too: a dead or stalled worker costs
        HEDGE_S instead of LOAD_TIMEOUT_S, and the answers are identical (deterministic)."""
        free = [w for w in workers.values() if not w.in_flight]
        if not free:
            return
        for worker in list(workers.values()):
            for job, step, sent in list(worker.in_flight.values()):
                if job.hedged or now - sent < HEDGE_S or not free or step not in self.builds:
                    continue
                other = next((w for w in free if w is not worker), None)
                if other is None:
                    return
                job.hedged = True
                free.remove(other)
                self.stats["hedged"] += 1
                self._send_load(other, job, step, now)

    def _send_load(self, worker: _Worker, job: _LoadJob, step: int, now: float) -> bool:
        build = self.builds[step]
        req_id = next(self.req_ids)
        ids = np.ascontiguousarray(build.rows["sample_id"][job.rows], np.int64)
        pieces = np.ascontiguousarray(build.rows["piece"][job.rows], np.int32)
        max_seq_len, long_samples = build.contexts.get(job.source, (0, ""))
        request = protocol.LoadRequest(job=self.spec.name, source=job.source, req_id=req_id, count=len(ids),
                                       max_seq_len=max_seq_len, long_samples=long_samples)
        try:
            worker.sock.send_multipart(protocol.encode(request, (ids, pieces)), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        worker.in_flight[req_id] = (job, step, now)
        return True

    def _on_load_reply(self, worker: _Worker, frames: list) -> None:
        msg, payload = protocol.decode(frames)
        if not isinstance(msg, protocol.LoadReply):
            raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"unexpected {msg.TYPE} from a source loader")
        entry = worker.in_flight.pop(msg.req_id, None)
        if entry is None:
            return  # a late answer to a request already retried elsewhere
        job, step, _ = entry
        build = self.builds.get(step)
        if build is None:
            return
        try:
            units = decode_load_reply(msg, payload)
        except (ProtocolError, ValueError, TypeError) as e:
            self.stats["malformed"] += 1
            log.warning("malformed load reply from %s: %s; retrying", worker.endpoint, e)
            self.queue[job.source].appendleft((job, step))
            return
        if len(units) != len(job.rows):
            self.queue[job.source].appendleft((job, step))
            return
        self._resolve(build, job.rows, units)

    def _resolve(self, build: _StepBuild, rows: np.ndarray, units: list, *, final: bool = False) -> None:
        """Settle loaded ``units``; a failed unit is loaded again (``UNIT_RETRIES``) unless ``final``."""
        ranks_done = set()
        again: dict[str, list[int]] = {}
        for row, unit in zip(rows.tolist(), units):
            if build.results[row] is not None:
                continue
            if isinstance(unit, str) and not final and build.key(row) not in build.skips:
                failures = build.failures[row] = build.failures.get(row, 0) + 1
                if failures <= UNIT_RETRIES:
                    self.stats["unit_retries"] += 1
                    again.setdefault(self.source_names[build.key(row)[0]], []).append(row)
                    continue
            build.results[row] = unit
            rank = int(build.rows["rank"][row])
            build.pending_by_rank[rank] -= 1
            if build.pending_by_rank[rank] == 0:
                ranks_done.add(rank)
        for source, retry in again.items():
            self.queue[source].append((_LoadJob(source, np.asarray(retry, np.int64)), build.step))
        for rank in sorted(ranks_done):
            self._assemble(build, rank)

    # -- packing and delivery -----------------------------------------------------------------

    def _assemble(self, build: _StepBuild, rank: int) -> None:
        """Pack ``rank``'s batches of the step, unless a unit failed without a skip record (then
        report it and hold the rank until the record is committed) or a unit's skip record is
        pending (hold the rank until it is committed or gone)."""
        rows = build.rows
        mine = np.flatnonzero(rows["rank"] == rank)
        if build.pending and any(build.key(i) in build.pending for i in mine.tolist()):
            # another constructor reported a unit of this rank and its record is not committed yet:
            # delivering it now could contradict the log (it may still skip the unit), so wait
            build.waiting.add(rank)
            return
        units, unrecorded = apply_skip_records([build.results[i] for i in mine.tolist()],
                                               source_ids=rows["source"][mine], sample_ids=rows["sample_id"][mine],
                                               pieces=rows["piece"][mine], recorded=build.skips)
        if unrecorded:
            front = self.delivery.furthest(rank)
            reloading = False
            for pos in unrecorded:
                row = int(mine[pos])
                micro = int(rows["micro"][row])
                if front is not None and (build.step, micro) < front:
                    # its micro-batch was delivered already (before a relocation or an eviction): a
                    # skip record would contradict it, so the unit is loaded again until it loads
                    self._reload(build, row, str(units[pos]))
                    reloading = True
                elif self.delivery.needs(rank, build.step, micro):
                    self._report(build.step, build.key(row), str(units[pos]), rank, micro)
                # else no trainer here needs the batch (it moved on to another constructor, which
                # may deliver the unit): the rank waits unreported, and is looked at again with
                # the step's next plan reply
            if not reloading:  # (a reload, once it loads, packs the rank again: it does not wait on plans)
                build.waiting.add(rank)
            return
        unit_of = dict(zip(mine.tolist(), units))
        num_micro = build.num_micro[rank]
        for micro in range(num_micro):
            sel = np.flatnonzero((rows["rank"] == rank) & (rows["micro"] == micro))
            mb = assemble_micro_batch(
                [unit_of[i] for i in sel.tolist()],
                source_ids=rows["source"][sel], sample_ids=rows["sample_id"][sel], pieces=rows["piece"][sel],
                images=self.spec.images,
            )
            self.stats["skipped_units"] += len(mb.skipped)
            header = protocol.Batch(job=self.spec.name, step=build.step, dp_rank=rank, micro_batch=micro,
                                    num_micro_batches=num_micro, checksum=mb.checksum, samples=mb.samples,
                                    tokens=mb.tokens, skipped=len(mb.skipped))
            build.batches[(rank, micro)] = EncodedBatch(header, encode_batch(mb.arrays, compression=self.compression))
            self.stats["built_batches"] += 1
        build.assembled.add(rank)
        for i in mine.tolist():
            build.results[i] = True  # release the loaded arrays; the encoded batches hold the content

    def _lookup(self, rank: int, step: int, micro: int) -> EncodedBatch | None:
        build = self.builds.get(step)
        return None if build is None else build.batches.get((rank, micro))

    # -- sockets ----------------------------------------------------------------------------

    def _admit(self, sock: zmq.Socket, frames: list) -> None:
        """Raise FORBIDDEN unless the trainer behind ``frames`` may read this job. Over TCP its
        CurveZMQ key says who it is; the Unix socket admits the daemon's user alone, and exists
        only for a job that names no trainer keys."""
        if sock is not self.trainers.sockets[0] or self.sockets.ring is None:
            return
        who = self.sockets.caller(frames)
        if who is None or not self.spec.trainer_allowed(who):
            raise ProtocolError(protocol.ErrorCode.FORBIDDEN,
                                f"{who or 'a key no longer allowed'} may not read job {self.spec.name!r}")

    def _on_readable(self, sock: zmq.Socket) -> None:
        frames = sock.recv_multipart(copy=False)
        identity = self.trainers.identity(sock, frames[0].bytes) if sock in self.trainers.sockets else None
        try:
            if identity is not None:
                msg, _ = protocol.decode(frames[1:])
                self._admit(sock, frames)
                self.delivery.handle(identity, msg)
            elif sock is self.link.sock:
                msg, payload = protocol.decode(frames)
                if isinstance(msg, protocol.PlanReply):
                    self._on_plan(msg, payload)
                elif isinstance(msg, protocol.PoolsReply):
                    self._on_pools(msg)
                elif isinstance(msg, protocol.ErrorReply):
                    self._on_refused(msg)
            else:
                _, worker = self.by_socket[sock]
                self._on_load_reply(worker, frames)
        except ProtocolError as e:
            forbidden = e.code == protocol.ErrorCode.FORBIDDEN
            self.stats["forbidden" if forbidden else "malformed"] += 1
            self.bad_input.warning(e.code, "dropped %s message: %s", "a forbidden" if forbidden else "malformed",
                                   truncate(str(e)))
            if identity is not None:
                try:
                    self.trainers.send_multipart(
                        [identity, *protocol.encode(protocol.ErrorReply(code=e.code, reason=e.reason))], flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the sender is gone or not listening; the drop is already counted


def run_constructor(args: RoleArgs) -> int:
    """Build and deliver batches for ``args.extra['ranks']`` until stopped."""
    with open(args.spec_path, encoding="utf-8") as f:
        spec = parse_job_spec(f.read(), args.spec_origin)
    stop = StopFlag(args.parent_pid)
    ctx = zmq.Context()
    constructor = Constructor(args, spec, ctx)
    try:
        constructor.run(stop)
        constructor.delivery.farewell(f"constructor {args.role_id} is stopping (moved or released); relocate")
    finally:
        constructor.close()
        ctx.term()
    return 0
