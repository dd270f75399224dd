#!/usr/bin/env python3
"""Scale benchmark: the leader's logic at 512 daemons, DP 4096 × MP 8, 35 sources, in one process.

    python scripts/bench/scale.py [--nodes 512] [--dp 4096] [--mp 8] [--sources 35] [--steps 60]

No sockets and a fake clock. The leader is the real thing: ``ClusterController`` (lease,
membership, ``CheckpointLog`` in a temp dir with fsync, ``ReplicationTracker``) and
``Leadership`` (host records, placement, autoscaling, progress records). Every message crosses
the real wire path (``wire.to_peer`` → ``protocol.encode`` → ``protocol.decode`` →
``wire.from_peer``). Stand-ins, named as such:

- ``SyntheticJobRuntime`` replaces ``fabricd.job.JobRuntime``: the real spec
  (``parse_job_spec``) and the real planner (``build_planner``) over synthetic per-source sample
  lengths instead of indexed files.
- The other daemons are synthetic: each sends a ``MemberBeat`` per heartbeat with plausible
  telemetry, its trainers' host declarations, and the positions of the trainers its constructors
  serve (what ``fabricd.status.role_view`` reports); as replicas they acknowledge every ``LogAppend``
  at once (``AckingShadow``) without storing it. One of them, ``d001``, loses its disk and comes
  back as a real, empty ``ShadowReplica`` to measure catch-up.

Phases: (1) the job is submitted, every daemon beats, the leader records 32k host declarations,
places the roles, and replicates all of it to every shadow; (2) steady state: trainers advance
one step per heartbeat (odd daemons' reports lag a step); (3) the leader compacts its log,
``d001`` comes back empty and catches up from the chunked snapshot plus the tail.

Measured with process CPU time (``time.process_time``) around the leader's own work only:
decoding what it receives, its controller and duties, encoding what it sends. The synthetic
daemons' work is outside the measurement. ``catch_up_s`` is the CPU time of both sides of the
transfer (leader and ``d001``) in this one process, disk writes of the fresh log included;
network time is not modelled.

Human lines first; the last stdout line is one JSON object: ``snapshot_bytes``, ``catch_up_s``,
``log_bytes_per_step``, ``leader_cpu_ms_per_s``, ``placement_ms`` (a steady placement pass) and
more detail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client"))

from fabric_client import protocol  # noqa: E402
from fabricd.cluster.controller import ClusterController  # noqa: E402
from fabricd.cluster.log import CheckpointLog  # noqa: E402
from fabricd.cluster.log_files import encode_record  # noqa: E402
from fabricd.cluster.membership import MemberBeat  # noqa: E402
from fabricd.cluster.telemetry import NodeTelemetry, RoleProcessTelemetry, RoleView  # noqa: E402
from fabricd.cluster.replication import LogAck, LogAppend, ShadowReplica  # noqa: E402
from fabricd.cluster.state import RoleEntry  # noqa: E402
from fabricd.cluster.wire import from_peer, to_peer  # noqa: E402
from fabricd.config import JobSpec, load_node_config, parse_job_spec  # noqa: E402
from fabricd.job import build_planner  # noqa: E402
from fabricd.leadership import Leadership  # noqa: E402

JOB = "scale"
HEARTBEAT_S = 1.0
TURNS_PER_BEAT = 4  # leader loop turns per heartbeat (placement runs at most every 0.25 s)


def node_toml(work: Path, nodes: int) -> Path:
    peers = "".join(f'[[cluster.peers]]\nid = "d{i:03d}"\ncontrol = "tcp://10.{i // 256}.{i % 256}.1:7700"\n'
                    for i in range(nodes))
    path = work / "d000.toml"
    path.write_text(f'[node]\nid = "d000"\ncontrol = "tcp://10.0.0.1:7700"\nstate_dir = "{work / "d000"}"\n'
                    f'[roles]\nheartbeat_s = {HEARTBEAT_S}\n'
                    # one voter: the lease needs no simulated votes; one shadow ack commits a record
                    f'[cluster]\nvoters = ["d000"]\nrequired_acks = 1\n{peers}')
    return path


def job_toml(work: Path, dp: int, mp: int, sources: int, ranks_per_constructor: int) -> str:
    names = [f"src{i:02d}" for i in range(sources)]
    srcs = "".join(f'[[sources]]\nname = "{n}"\npath = "{work / "data" / n}"\nformat = "jsonl"\n' for n in names)
    weights = ", ".join(f"{n} = {1 + i % 5}" for i, n in enumerate(names))
    return (f'[job]\nname = "{JOB}"\nseed = 7\n'
            f'[topology]\ndp_size = {dp}\nmp_size = {mp}\nranks_per_constructor = {ranks_per_constructor}\n'
            f'[batch]\nsamples_per_step = {2 * dp}\nmicro_batch_tokens = 8192\n'
            f'[[buckets]]\nname = "short"\nmax_seq_len = 4096\n{srcs}'
            f'[mixture]\nkind = "constant"\n[[mixture.points]]\nstep = 0\nweights = {{ {weights} }}\n')


class SyntheticJobRuntime:
    """Stands in for ``fabricd.job.JobRuntime`` without indexing files: the real spec and a real
    planner built from synthetic per-source sample lengths; always ``ready``."""

    class _Index:
        def __init__(self, rng: np.random.Generator, name: str) -> None:
            self.text_tokens = rng.integers(50, 3000, 2000)
            self.num_images = np.zeros(2000, dtype=np.int64)
            self.num_samples = 2000
            self.image_h = self.image_w = np.zeros(0, dtype=np.int32)  # no images
            self.fingerprint = f"synthetic-{name}"

    def __init__(self, spec: JobSpec) -> None:
        rng = np.random.default_rng(0)
        indexes = {s.name: self._Index(rng, s.name) for s in spec.sources}
        self.spec = spec
        self.planner = build_planner(spec, indexes)
        self.fingerprint = spec.fingerprint({n: i.fingerprint for n, i in indexes.items()})
        self.state = "ready"


class AckingShadow:
    """A synthetic replica: answers every LogAppend as a healthy shadow holding it would (LogAck
    up to its last record), without storing anything."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_message(self, msg: Any) -> list[Any]:
        if isinstance(msg, LogAppend):
            return [LogAck(term=msg.term, shadow=self.name, seq=msg.prev_seq + len(msg.records), ok=True)]
        return []


class Fabric:
    """The leader under test, the synthetic daemons, and the wire between them."""

    def __init__(self, work: Path, nodes: int, dp: int, mp: int, sources: int) -> None:
        self.work, self.nodes, self.dp, self.mp = work, nodes, dp, mp
        self.names = [f"d{i:03d}" for i in range(nodes)]
        self.cfg = load_node_config(node_toml(work, nodes))
        self.spec = parse_job_spec(job_toml(work, dp, mp, sources, dp // nodes if dp >= nodes else 1),
                                   work / "job.toml")
        self.runtime = SyntheticJobRuntime(self.spec)
        self.now = 0.0
        self.cpu_s = 0.0  # the leader's process CPU time, accumulated by measured()
        self.ctl = ClusterController(self.cfg, now=0.0)
        # a long-running leader's log is many segments, most compacted away; this short run gets
        # there with 1 MiB segments (the default is 16 MiB), so a fresh shadow needs the snapshot
        self.ctl.log.segment_bytes = 1 << 20
        self.lead = Leadership(self.cfg, self.ctl, {JOB: self.runtime}, self._propose)
        self.placement_s: list[float] = []
        place = self.lead._place

        def timed_place(now: float, live: list[str]) -> None:
            t0 = time.process_time()
            place(now, live)
            self.placement_s.append(time.process_time() - t0)

        self.lead._place = timed_place  # type: ignore[method-assign]  (times each pass, changes nothing)
        self.shadows: dict[str, Any] = {n: AckingShadow(n) for n in self.names[1:]}
        self.inbox: list[list[bytes]] = []  # frames on their way to the leader
        self.step = 0
        self.trainers_running = False
        self._by_node: tuple[dict, int, dict[str, list[tuple[str, RoleEntry]]]] | None = None

    # -- the leader's side (measured) ------------------------------------------------------

    def measured(self, fn: Callable[[], Any]) -> Any:
        t0 = time.process_time()
        try:
            return fn()
        finally:
            self.cpu_s += time.process_time() - t0

    def _propose(self, entries: list[tuple[str, dict]], now: float) -> bool:
        self._send(self.ctl.propose(entries, now))
        return True

    def _send(self, out: list[tuple[str, Any]]) -> None:
        """Encode what the leader sends (its cost), then hand it to the addressee (not its cost)."""
        t0 = time.process_time()
        frames = [(to, protocol.encode(*to_peer("d000", msg))) for to, msg in out]
        self.cpu_s += time.process_time() - t0
        for to, f in frames:
            self._deliver(to, f)

    def _deliver(self, to: str, frames: list) -> None:
        envelope, payload = protocol.decode(frames)
        msg = from_peer(envelope, payload)
        shadow = self.shadows.get(to)
        if isinstance(shadow, AckingShadow):
            answers = shadow.on_message(msg)
        elif shadow is not None:
            answers = [(a.to, a.msg) for a in shadow.on_message(msg, self.now) if hasattr(a, "to")]
            answers = [m for t, m in answers if t == "d000"]
        else:
            answers = []
        self.inbox += [protocol.encode(*to_peer(to, m)) for m in answers]

    def leader_turn(self) -> None:
        """One loop turn of the leader: what arrived, the controller's tick, the duties."""
        inbox, self.inbox = self.inbox, []
        t0 = time.process_time()
        out = []
        for frames in inbox:
            envelope, payload = protocol.decode(frames)
            out += self.ctl.on_peer(from_peer(envelope, payload), self.now)
        out += self.ctl.tick(self.now, telemetry=lambda: self.telemetry(0), roles=lambda: self.roles_view(0))
        self.cpu_s += time.process_time() - t0
        self._send(out)
        if self.ctl.is_leader(self.now):
            self.measured(lambda: self.lead.run(self.now))

    # -- the synthetic daemons (not measured) ----------------------------------------------

    def telemetry(self, i: int) -> NodeTelemetry:
        node = self.names[i]
        loaders = {rid: RoleProcessTelemetry(units=1000 * self.step, busy_s=0.5 * self.step * HEARTBEAT_S, rss_mb=300)
                   for rid, r in self._roles_on(node) if r.kind == "source_loader"}
        # this daemon's host runs the trainers of DP ranks i*k .. i*k+k-1 (all MP ranks); like the
        # daemon, it passes on the declarations the state does not hold yet
        k = max(1, self.dp // self.nodes)
        declarations = [(JOB, dp, mp, f"host{i:03d}", 1_000 + i) for dp in range(i * k, min(self.dp, (i + 1) * k))
                        for mp in range(self.mp) if self.ctl.state.host_is_news(JOB, dp, mp, f"host{i:03d}", 1_000 + i)]
        return NodeTelemetry(cpu_percent=35.0 + i % 20, mem_used_percent=40.0, mem_available_mb=64000,
                             hostname=f"host{i:03d}", roles=len(loaders), role_processes=loaders,
                             trainer_hosts=declarations)

    def roles_view(self, i: int) -> dict[str, RoleView]:
        node, view = self.names[i], {}
        lag = i % 2  # odd daemons' reports are a heartbeat older
        for rid, r in self._roles_on(node):
            trainers = []
            if r.kind == "constructor" and not rid.endswith("/standby") and self.trainers_running:
                trainers = [(dp, mp, max(0, self.step - lag)) for dp in r.extra["ranks"] for mp in range(self.mp)]
            view[rid] = RoleView(endpoint=f"tcp://10.0.0.{i % 256}:9000", kind=r.kind, alive=True,
                                 trainers=trainers)
        return view

    def _roles_on(self, node: str) -> list[tuple[str, RoleEntry]]:
        roles = self.ctl.state.roles
        if self._by_node is None or self._by_node[0] is not roles or self._by_node[1] != self.ctl.state.last_seq:
            by_node: dict[str, list[tuple[str, RoleEntry]]] = {}
            for rid, r in roles.items():
                by_node.setdefault(r.node, []).append((rid, r))
            self._by_node = (roles, self.ctl.state.last_seq, by_node)
        return self._by_node[2].get(node, [])

    def beats(self, part: int, parts: int) -> None:
        """Every ``parts``-th daemon from ``part`` beats (the heartbeats spread over a heartbeat)."""
        for i in range(part or parts, self.nodes, parts):  # d000 is the leader: it beats in its tick
            beat = MemberBeat(node=self.names[i], incarnation="1", term=self.ctl.term, leader="d000",
                              telemetry=self.telemetry(i), roles=self.roles_view(i))
            self.inbox.append(protocol.encode(*to_peer(self.names[i], beat)))

    def heartbeat(self) -> None:
        """One heartbeat interval: every daemon beats once, the leader turns TURNS_PER_BEAT times."""
        for part in range(TURNS_PER_BEAT):
            self.beats(part, TURNS_PER_BEAT)
            self.now += HEARTBEAT_S / TURNS_PER_BEAT
            self.leader_turn()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=512)
    ap.add_argument("--dp", type=int, default=4096)
    ap.add_argument("--mp", type=int, default=8)
    ap.add_argument("--sources", type=int, default=35)
    ap.add_argument("--steps", type=int, default=60, help="steady-state heartbeats measured")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fabricd-scale-") as tmp:
        result = run(Path(tmp), args)
    print(json.dumps(result))
    return 0


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    fab = Fabric(work, args.nodes, args.dp, args.mp, args.sources)
    fab.leader_turn()
    assert fab.ctl.is_leader(fab.now), "d000 should lead a cluster whose only voter it is"
    fab.measured(lambda: fab._propose([("job_submitted", {
        "job": JOB, "spec_toml": fab.spec.text, "spec_origin": str(fab.spec.file),
        "fingerprint": fab.runtime.fingerprint, "dp_size": args.dp})], fab.now))

    # (1) hosts declared, roles placed, and every shadow holding all of it
    for _ in range(8):
        fab.heartbeat()
    beats = 8
    while min(fab.ctl.tracker.shadow_positions().values()) < fab.ctl.state.last_seq and beats < 600:
        fab.heartbeat()
        beats += 1
    st = fab.ctl.state
    roles = sum(r.job == JOB for r in st.roles.values())
    setup_cpu = fab.cpu_s
    print(f"setup: {len(st.hosts.get(JOB, {}))} trainer hosts recorded, {roles} roles placed on "
          f"{len({r.node for r in st.roles.values()})} daemons, {st.last_seq} records on all "
          f"{args.nodes - 1} shadows after {beats} heartbeats; leader CPU {setup_cpu:.1f} s; first placement "
          f"pass {1000 * fab.placement_s[0]:.1f} ms CPU", flush=True)

    # (2) steady state: trainers advance one step per heartbeat
    fab.trainers_running = True
    for _ in range(5):  # warm up: the floor catches up with the trainers
        fab.step += 1
        fab.heartbeat()
    first_seq, cpu0, now0, placements0 = fab.ctl.state.last_seq + 1, fab.cpu_s, fab.now, len(fab.placement_s)
    for _ in range(args.steps):
        fab.step += 1
        fab.heartbeat()
    last_seq = fab.ctl.state.last_seq
    records = fab.ctl.log.read(first_seq, last_seq - first_seq + 1) if last_seq >= first_seq else []
    log_bytes = sum(len(encode_record(r)) for r in records)
    cpu_ms_per_s = 1000 * (fab.cpu_s - cpu0) / (fab.now - now0)
    steady_place = fab.placement_s[placements0:]
    floor = fab.ctl.state.floor_step(JOB)
    print(f"steady: {args.steps} steps, {len(records)} records ({log_bytes} bytes) in the log, progress floor "
          f"{floor} (trainers at {fab.step}); leader CPU {cpu_ms_per_s:.0f} ms per s; "
          f"placement pass median {1000 * statistics.median(steady_place):.2f} ms", flush=True)

    # (3) the leader compacts; d001 comes back with an empty disk and catches up
    fab.ctl.log.compact_upto(fab.ctl.commit_seq)
    snapshot_bytes = len(fab.ctl.log.snapshot_payload())
    for _ in range(3):  # a tail after the snapshot
        fab.step += 1
        fab.heartbeat()
    fresh_log = CheckpointLog(work / "d001-fresh")
    fresh = ShadowReplica("d001", fresh_log, fresh_log.open())
    fab.shadows["d001"] = fresh
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    turns = 0
    while fresh.log.last_position != fab.ctl.log.last_position and turns < 10_000:
        fab.now += 0.01
        fab.leader_turn()
        turns += 1
    catch_up_cpu, catch_up_wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    caught_up = fresh.log.last_position == fab.ctl.log.last_position and fresh.state == fab.ctl.state
    tracker = fab.ctl.tracker.counters
    print(f"catch-up: snapshot {snapshot_bytes} bytes in {tracker['snapshot_chunks_sent']} chunks, "
          f"{'caught up' if caught_up else 'NOT caught up'} after {turns} leader turns, "
          f"{catch_up_cpu:.2f} s CPU ({catch_up_wall:.2f} s wall)", flush=True)
    fab.ctl.log.close()
    fresh_log.close()
    return {"snapshot_bytes": snapshot_bytes, "catch_up_s": round(catch_up_cpu, 3),
            "log_bytes_per_step": round(log_bytes / args.steps, 1),
            "leader_cpu_ms_per_s": round(cpu_ms_per_s, 1),
            "placement_ms": round(1000 * statistics.median(steady_place), 2),
            "placement_first_ms": round(1000 * fab.placement_s[0], 1),
            "setup_records": st.last_seq, "setup_heartbeats": beats, "setup_leader_cpu_s": round(setup_cpu, 2),
            "caught_up": caught_up, "catch_up_wall_s": round(catch_up_wall, 3),
            "snapshot_chunks": tracker["snapshot_chunks_sent"], "snapshots_encoded": tracker["snapshots_encoded"],
            "steady_records": len(records), "progress_floor": floor, "trainer_step": fab.step,
            "nodes": args.nodes, "dp": args.dp, "mp": args.mp, "sources": args.sources, "steps": args.steps}


if __name__ == "__main__":
    sys.exit(main())
