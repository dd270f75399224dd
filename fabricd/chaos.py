"""Chaos runs: a local fabric serving real trainers while faults are injected, then invariants.

Used by ``scripts/chaos.py``, ``scripts/bench/failover.py`` and the cluster tests. The fault
schedule is drawn from a seeded RNG, so a run is replayable with the same seed (timing on a
shared machine still varies). Faults: SIGKILL of the leader daemon, of a shadow daemon, of a
source-loader or constructor process; SIGSTOP of the leader past its lease, then SIGCONT; a
shadow restarted with a failpoint armed in its log writes (it kills itself mid-append) and then
restarted clean; a serving constructor armed (SIGUSR1) to kill itself mid-batch, after one of
its next few sends; a transient read error (``transient_read_error``: every source-loader process
of one source armed, with the failpoint ``loader.transient_error``, to fail one unit planned a few
steps ahead 1-3 times, so that its retry sometimes loads it and sometimes the skip is recorded);
a burst of malformed messages (``malformed_burst``: random bytes, truncated frames, headers with
wrong-typed fields, ``[`` nested 100,000 deep, an oversize header) from a plain DEALER to a live
daemon's control endpoint and to a constructor. Killed daemons are restarted.

Invariants checked by :meth:`ChaosRun.finish`: for every (step, dp_rank) the trainers received
exactly the expected batches once and in order (checksums from the offline expectation, given
the skip records of the most up-to-date log); no daemon or role process died of a malformed
message burst (``malformed_casualties``); at
most one daemon held the lease in any term (status polled throughout); replicas' logs are
prefix-consistent and no record of an older term follows a newer one (nothing stale applied);
progress resumed after every fault (the recovery time is recorded).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from bisect import bisect_right
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fabric_client import Loader, protocol
from fabric_client.keys import ClientKeys

from .cluster.log import CheckpointLog
from .config import load_job_spec
from .corpus import job_toml, make_dataset
from .expect import BatchOracle, skips_from_logs
from .failpoints import ENV_VAR as FAILPOINTS_ENV
from .failpoints import FILE_ENV as FAILPOINTS_FILE_ENV
from .fuzzing import burst, send_burst
from .localnode import LocalCluster
from .netns import NetnsLab

__all__ = ["FAULT_KINDS", "PARTITION_KINDS", "ChaosRun", "FaultRecord"]

log = logging.getLogger(__name__)

FAULT_KINDS = ("kill_leader", "kill_shadow", "kill_loader", "kill_constructor", "pause_leader", "failpoint_shadow",
               "failpoint_constructor", "transient_read_error", "malformed_burst")
#: faults that need the daemons in network namespaces (``ChaosRun(netns=True)``)
PARTITION_KINDS = ("partition_leader", "partition_shadow")
FAILPOINTS = ("log.after_write_before_fsync", "log.after_fsync")


@dataclass
class FaultRecord:
    index: int
    kind: str
    target: str
    at: float                 # wall time of the fault
    recovery_s: float | None  # until every trainer received a batch after it
    detail: str = ""
    election_s: float | None = None  # until another daemon held the lease (leader faults)


class _Trainer(threading.Thread):
    """One trainer rank: consumes batches at a fixed pace and records what it got, and when."""

    def __init__(self, addresses: list[str], job: str, dp_rank: int, dp_size: int, pace_s: float,
                 stop: threading.Event, keys: ClientKeys | None = None) -> None:
        super().__init__(daemon=True, name=f"trainer-{dp_rank}")
        self.addresses, self.job, self.dp_rank, self.dp_size = addresses, job, dp_rank, dp_size
        self.pace_s, self.stop_event, self.keys = pace_s, stop, keys
        self.records: list[tuple[tuple[int, int, int], str, float]] = []  # (key, checksum, received at)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Loader(self.addresses, job=self.job, dp_rank=self.dp_rank, dp_size=self.dp_size,
                        deadline_s=120, stall_s=0.5, prefetch=2, keys=self.keys) as loader:
                for b in loader:
                    self.records.append(((b.step, b.dp_rank, b.micro_batch), b.checksum, time.time()))
                    if self.stop_event.is_set():
                        break
                    time.sleep(self.pace_s)
        except BaseException as e:  # handed to the owner, which reports it
            self.error = e

    def received_after(self, t: float) -> float | None:
        """When the first batch after ``t`` reached the trainer (None: not yet)."""
        records = self.records  # in receive order
        i = bisect_right(records, t, key=lambda r: r[2])
        return records[i][2] if i < len(records) else None

    def last_step(self) -> int:
        return self.records[-1][0][0] if self.records else -1


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def make_corpus(out: Path, samples: int = 64, seed: int = 5) -> None:
    make_dataset(out, samples_per_source=samples, seed=seed, corrupt_fraction=0.02, progress=False)


class ChaosRun:
    """A local fabric + trainer threads + a seeded fault schedule."""

    def __init__(self, workdir: Path, *, seed: int, nodes: int = 3, dp_size: int = 2, pace_s: float = 0.05,
                 lease_s: float = 2.0, kinds: tuple[str, ...] = FAULT_KINDS, netns: bool = False,
                 cluster_extra: str = "") -> None:
        """``cluster_extra``: more ``[cluster]`` TOML lines for every daemon (say, the etcd lease backend)."""
        known = FAULT_KINDS + (PARTITION_KINDS if netns else ())
        unknown = set(kinds) - set(known)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(known)}"
                             + ("" if netns else " (partitions need netns=True)"))
        self.netns = netns
        self.lab: NetnsLab | None = None
        self.workdir = Path(workdir)
        self.rng = random.Random(seed)
        self.seed, self.nodes, self.dp_size, self.pace_s, self.lease_s = seed, nodes, dp_size, pace_s, lease_s
        self.kinds = kinds
        self.cluster_extra = cluster_extra
        self.stop_event = threading.Event()
        self.cluster: LocalCluster | None = None
        self.trainers: list[_Trainer] = []
        self.faults: list[FaultRecord] = []
        self.leaders_by_term: dict[int, set[str]] = defaultdict(set)
        self.crashes: list[dict[str, Any]] = []
        self.casualties: list[str] = []  # processes that died of a malformed burst
        self.oracle: BatchOracle | None = None
        self._monitor: threading.Thread | None = None

    # -- setup ----------------------------------------------------------------------------------

    def start(self) -> None:
        corpus = self.workdir / "corpus"
        if not corpus.exists():
            make_corpus(corpus)
        self.job_file = self.workdir / "chaos.toml"
        self.job_file.write_text(job_toml(corpus, name="chaos", seed=17, dp_size=self.dp_size, samples_per_step=8,
                                          prefetch=2))
        if self.netns:
            self.lab = NetnsLab(self.nodes)
        self.armed = self.workdir / "failpoints"  # what a process reads on SIGUSR1 (the one signalled only)
        self.armed.write_text("")
        self.cluster = LocalCluster(self.workdir / "cluster", nodes=self.nodes, loader_workers=2,
                                    lease_duration_s=self.lease_s, renew_deadline_s=self.lease_s * 0.65,
                                    retry_period_s=self.lease_s * 0.15, log_level="WARNING", lab=self.lab,
                                    extra_env={FAILPOINTS_FILE_ENV: str(self.armed.absolute())},
                                    cluster_extra=self.cluster_extra)
        self.cluster.start()
        leader = self.cluster.leader()
        with self.cluster.daemons[leader].client() as c:
            c.request(protocol.SubmitJob(spec_toml=self.job_file.read_text(), spec_path=str(self.job_file)))
        deadline = time.monotonic() + 120
        while not (self.cluster.status(leader) or {}).get("jobs", {}).get("chaos", {}).get("serving"):
            if time.monotonic() > deadline:
                raise RuntimeError("the chaos job did not start serving")
            time.sleep(0.1)
        self._monitor = threading.Thread(target=self._watch_leaders, daemon=True, name="leader-monitor")
        self._monitor.start()
        self.trainers = [_Trainer(self.cluster.addresses, "chaos", d, self.dp_size, self.pace_s, self.stop_event,
                                  keys=self.cluster.trainer_keys)
                         for d in range(self.dp_size)]
        for t in self.trainers:
            t.start()

    def _watch_leaders(self) -> None:
        while not self.stop_event.is_set():
            for node in self.cluster.daemons:
                st = self.cluster.status(node)
                if st is not None and st["is_leader"]:
                    self.leaders_by_term[st["term"]].add(node)
            time.sleep(0.2)

    # -- faults ---------------------------------------------------------------------------------

    def inject(self, kind: str | None = None) -> FaultRecord:
        """Inject one fault (drawn from the seeded RNG unless given), wait for recovery, record it."""
        kind = kind or self.rng.choice(self.kinds)
        time.sleep(0.5 + self.rng.random() * 1.5)  # a random moment of steady delivery
        self._check_crashes()
        leader = self.cluster.leader(timeout=60)
        shadows = [n for n in self.cluster.daemons if n != leader]
        at = time.time()
        target, detail, election = leader, "", None
        if kind == "kill_leader":
            self.cluster.kill(leader, signal.SIGKILL)
            self.cluster.leader(timeout=60, exclude=(leader,))
            election = time.time() - at
            self.cluster.restart(leader)
        elif kind == "kill_shadow":
            target = self.rng.choice(shadows)
            self.cluster.kill(target, signal.SIGKILL)
            time.sleep(self.rng.random())
            self.cluster.restart(target)
        elif kind in ("kill_loader", "kill_constructor"):
            role_kind = "source_loader" if kind == "kill_loader" else "constructor"
            target, pid = self._pick_role(role_kind)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                detail = f"pid {pid}"
        elif kind == "pause_leader":
            self.cluster.kill(leader, signal.SIGSTOP)
            self.cluster.leader(timeout=60, exclude=(leader,))
            election = time.time() - at
            time.sleep(max(0.0, self.lease_s * 1.5 + self.rng.random() - election))
            self.cluster.kill(leader, signal.SIGCONT)
        elif kind in PARTITION_KINDS:
            if kind == "partition_shadow":
                target = self.rng.choice(shadows)
            self.cluster.partition(target)
            if target == leader:  # the majority side elects a new leader; the old one must step down
                self.cluster.leader(timeout=60, exclude=(leader,))
                election = time.time() - at
            time.sleep(max(0.0, self.lease_s * 1.5 + self.rng.random() - (election or 0.0)))
            self.cluster.heal(target)
        elif kind == "failpoint_constructor":
            target, detail = self._arm_serving_constructor(f"delivery.after_send=kill@{self.rng.randint(1, 4)}")
        elif kind == "transient_read_error":
            target, detail = self._transient_read_error()
        elif kind == "malformed_burst":
            target, detail = self._malformed_burst()
        elif kind == "failpoint_shadow":
            target = self.rng.choice(shadows)
            point = self.rng.choice(FAILPOINTS)
            detail = f"{point}=kill@{self.rng.randint(1, 4)}"
            daemon = self.cluster.daemons[target]
            daemon.extra_env = {**daemon.extra_env, FAILPOINTS_ENV: detail}
            try:
                self.cluster.restart(target)
            except RuntimeError:
                pass  # it hit the failpoint while catching up, before it answered: the fault itself
            deadline = time.monotonic() + 10
            while daemon.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # it dies at the failpoint once enough records were replicated to it
            detail += " (hit)" if daemon.proc.poll() is not None else " (not reached in 10s)"
            daemon.extra_env = {k: v for k, v in daemon.extra_env.items() if k != FAILPOINTS_ENV}
            self.cluster.restart(target)
        else:
            raise ValueError(kind)
        record = FaultRecord(len(self.faults), kind, target, at, self._recovery(at), detail, election)
        self.faults.append(record)
        return record

    def _check_crashes(self) -> None:
        """A daemon that exited without being killed by the schedule crashed: count it, keep its log."""
        for node, d in self.cluster.daemons.items():
            if d.proc is not None and d.proc.poll() is not None:
                self.crashes.append({"node": node, "code": d.proc.returncode, "log_tail": d.tail(30)})
                log.error("daemon %s exited by itself (code %s):\n%s", node, d.proc.returncode, d.tail(30))
                self.cluster.restart(node)

    def _arm_serving_constructor(self, spec: str, attempts: int = 3) -> tuple[str, str]:
        """Arm a constructor that serves trainers with the failpoint ``spec`` (SIGUSR1) and wait
        for it to die there. The status it was picked from may be a heartbeat old (its trainers
        may have moved on): one not hit within 10 s is disarmed, and another one is picked."""
        tried = []
        for _ in range(attempts):
            target, pid = self._pick_role("constructor", serving=True)
            if pid is None:
                time.sleep(0.5)
                continue
            try:
                self.armed.write_text(spec)
                os.kill(pid, signal.SIGUSR1)
                deadline = time.monotonic() + 10
                while _running(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if not _running(pid):
                    return target, f"{spec} pid {pid} (hit)" + (f" after {', '.join(tried)}" if tried else "")
                self.armed.write_text("")
                os.kill(pid, signal.SIGUSR1)  # disarm: it must not die later, inside another fault
                tried.append(f"pid {pid} not reached")
            except ProcessLookupError:
                tried.append(f"pid {pid} gone")
            finally:
                self.armed.write_text("")
        return "-", f"{spec} not hit: {', '.join(tried) or 'no serving constructor'}"

    def _role_pids(self, kind: str | None = None, source: str | None = None) -> dict[str, tuple[int, int, str]]:
        """Live role processes (of ``kind``, of ``source``) on every daemon: role id → (pid, restarts, node)."""
        out = {}
        for node in self.cluster.daemons:
            st = self.cluster.status(node) or {}
            for role in st.get("jobs", {}).get("chaos", {}).get("roles", []):
                if role.get("pid") and role["node"] == node and (kind is None or role["kind"] == kind) \
                        and (source is None or role.get("source") == source):
                    out[role["id"]] = (role["pid"], role.get("restarts", 0), node)
        return out

    def _transient_read_error(self) -> tuple[str, str]:
        """Arm every loader process of one source to fail one unit of one rank's batch, planned a
        few steps ahead of that rank's trainer, 1-3 times; wait until that trainer is past the
        step; disarm. (Trainer threads are not in lockstep as real ranks are: one may run ahead.)"""
        if self.oracle is None:
            self.oracle = BatchOracle(load_job_spec(self.job_file))
        trainer = self.rng.choice(self.trainers)
        ahead = trainer.last_step() + self.rng.randint(12, 20)
        plan = self.oracle.planner.plan(ahead, self.dp_size)
        rows = np.flatnonzero(plan.rank == trainer.dp_rank).tolist() or list(range(len(plan.rank)))
        row = self.rng.choice(rows)
        source = self.oracle.spec.sources[int(plan.source[row])].name
        times = self.rng.randint(1, 3)
        spec = f"loader.transient_error=fail({source}:{int(plan.sample_id[row])}*{times})"
        pids = [pid for pid, *_ in self._role_pids("source_loader", source).values()]
        try:
            self.armed.write_text(spec)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)  # every signalled process has read the file
        finally:
            self.armed.write_text("")
        deadline = time.monotonic() + 60
        while trainer.last_step() <= ahead and time.monotonic() < deadline:
            time.sleep(0.05)
        passed = trainer.last_step() > ahead
        for pid in pids:  # disarm: the file is empty now
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        return source, (f"{spec} at step {ahead} (rank {trainer.dp_rank}) in {len(pids)} loaders"
                        + ("" if passed else "; RANK NOT PAST THE STEP IN 60s"))

    def _malformed_burst(self) -> tuple[str, str]:
        """Malformed messages to a live daemon's control endpoint and to a constructor; then check
        that no daemon and no role process died or restarted."""
        nodes = [n for n, d in self.cluster.daemons.items() if d.proc is not None and d.proc.poll() is None]
        node = self.rng.choice(nodes)
        daemon_pids = {n: d.proc.pid for n, d in self.cluster.daemons.items() if n in nodes}
        # roles running now (the status may be a heartbeat old: a role an earlier fault killed and
        # its supervisor is restarting is not this burst's casualty)
        before = {rid: v for rid, v in self._role_pids().items() if _running(v[0])}
        targets = [self.cluster.addresses[list(self.cluster.daemons).index(node)]]
        constructors = []
        for n in nodes:
            st = self.cluster.status(n) or {}
            constructors += [r["endpoint"] for r in st.get("jobs", {}).get("chaos", {}).get("roles", [])
                             if r["kind"] == "constructor" and r.get("endpoint") and r["node"] == n]
        keys = [self.cluster.node_keys(node)]  # the insider: its messages reach the handlers
        if constructors:
            targets.append(self.rng.choice(constructors))
            keys.append(self.cluster.trainer_keys)
        messages = burst(self.rng)
        for endpoint, k in zip(targets, keys):
            send_burst(endpoint, messages, keys=k)
        time.sleep(1.0)  # a process that dies of it is gone by now
        died = [f"daemon {n}" for n, pid in daemon_pids.items()
                if self.cluster.daemons[n].proc is None or self.cluster.daemons[n].proc.pid != pid
                or self.cluster.daemons[n].proc.poll() is not None]
        after = self._role_pids()
        died += [f"role {rid}" for rid, (pid, restarts, n) in before.items()
                 if rid in after and after[rid][2] == n and after[rid] != (pid, restarts, n)]
        self.casualties += died
        return node, f"{len(messages)} messages to {', '.join(targets)}" + (f"; DIED: {', '.join(died)}" if died else "")

    def _pick_role(self, kind: str, serving: bool = False) -> tuple[str, int | None]:
        """A random live role process of ``kind`` (with ``serving``: one with subscribed trainers)."""
        candidates = []
        for node in self.cluster.daemons:
            st = self.cluster.status(node) or {}
            for role in st.get("jobs", {}).get("chaos", {}).get("roles", []):
                if role["kind"] == kind and role.get("pid") and role["node"] == node \
                        and (not serving or role.get("stats", {}).get("subscriptions")):
                    candidates.append((node, role["pid"]))
        return self.rng.choice(candidates) if candidates else ("-", None)

    def _recovery(self, at: float, timeout: float = 90.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t in self.trainers:
                if t.error is not None:
                    raise RuntimeError(f"trainer {t.dp_rank} failed: {t.error!r}")
            times = [t.received_after(at) for t in self.trainers]
            if all(x is not None for x in times):
                return max(times) - at
            time.sleep(0.01)
        return None

    # -- invariants -----------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        self._check_crashes()
        self.stop_event.set()
        for t in self.trainers:
            t.join(60)
        if self._monitor is not None:
            self._monitor.join(10)
        spec = load_job_spec(self.job_file)
        last = min(max((k[0] for k, *_ in t.records), default=0) for t in self.trainers)
        self.cluster.stop()  # logs are read from disk once no daemon writes them
        skips = skips_from_logs([d.workdir / "state" / "log" for d in self.cluster.daemons.values()], "chaos")
        oracle = BatchOracle(spec, skips=skips)
        want = {b.key(): b.checksum for s in range(last) for b in oracle.step(s)}
        lost = duplicated = mismatched = 0
        self.mismatches: list[dict[str, Any]] = []  # what was altered, to be compared with the logs
        for t in self.trainers:
            got = [(k, c, ts) for k, c, ts in t.records if k[0] < last]
            seen = Counter(k for k, *_ in got)
            lost += sum(1 for k in want if k[1] == t.dp_rank and k not in seen)
            duplicated += sum(n - 1 for n in seen.values() if n > 1)
            for k, c, ts in got:
                if want.get(k) != c:
                    mismatched += 1
                    self.mismatches.append({"why": "checksum", "key": k, "got": c, "want": want.get(k), "at": ts})
            for a, b in zip(got, got[1:]):
                if a[0] >= b[0]:
                    mismatched += 1
                    self.mismatches.append({"why": "order", "key": b[0], "after": a[0], "at": b[2]})
        if self.mismatches:
            (self.workdir / "mismatches.json").write_text(json.dumps(self.mismatches, indent=1))
            for m in self.mismatches[:20]:
                log.error("altered batch: %s", m)
        logs = self._logs()
        stale = sum(1 for records in logs for a, b in zip(records, records[1:]) if b[0] < a[0])
        diverged = 0
        for i, a in enumerate(logs):
            for b in logs[i + 1:]:
                common = {r[1] for r in a} & {r[1] for r in b}
                diverged += {r for r in a if r[1] in common} != {r for r in b if r[1] in common}
        recoveries = [f.recovery_s for f in self.faults]
        return {
            "faults": len(self.faults),
            "kinds": dict(Counter(f.kind for f in self.faults)),
            "lost": lost, "duplicated": duplicated, "mismatched": mismatched,
            "stale_term_applied": stale,
            "log_divergence": diverged,
            "two_leaders_in_a_term": sum(1 for nodes in self.leaders_by_term.values() if len(nodes) > 1),
            "unrecovered": sum(1 for r in recoveries if r is None),
            "transient_not_passed": sum(1 for f in self.faults if "NOT PAST" in f.detail),
            "orphaned_processes": len(self.cluster.leftovers),
            "daemon_crashes": len(self.crashes),
            "malformed_casualties": len(self.casualties),
            "skips_recorded": len(skips),
            "unrecorded_failures": oracle.unrecorded,
            "max_recovery_s": round(max((r for r in recoveries if r is not None), default=0.0), 3),
            "steps_checked": last,
            "seed": self.seed,
        }

    def _logs(self) -> list[list[tuple]]:
        out = []
        for d in self.cluster.daemons.values():
            lg = CheckpointLog(d.workdir / "state" / "log")
            lg.open()
            out.append([(r.term, r.seq, r.kind, json.dumps(r.data, sort_keys=True))
                        for r in lg.read(lg.first_seq, limit=1_000_000)])
            lg.close()
        return out

    def close(self) -> None:
        self.stop_event.set()
        if self.cluster is not None:
            self.cluster.stop()
        if self.lab is not None:
            self.lab.close()

    def fault_lines(self) -> list[str]:
        return [json.dumps(asdict(f)) for f in self.faults]
