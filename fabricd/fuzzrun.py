"""Fuzzing a live fabric: a 3-daemon cluster serving a real trainer while every socket kind takes
malformed messages at full rate.

Used by ``scripts/fuzz.py`` and its bounded test. The inputs come from :mod:`fabricd.fuzzing`
(structured mutations of every record type, damaged frames, deep nesting, oversize headers), drawn
from a seeded RNG. Targets, by socket kind:

- ``control``: a daemon's ROUTER, with trainer, operator and role records;
- ``peer``: the same ROUTER, with ``PeerMessage`` envelopes from a configured peer name whose
  bodies are malformed lease, heartbeat and replication records;
- ``source_loader``: a source-loader worker's ROUTER (``LoadRequest`` and damaged id frames);
- ``constructor``: a data constructor's ROUTER (``Subscribe``/``Credit``/``Unsubscribe``);
- ``trainer_stream``: the trainer side of a constructor's stream, i.e. what a constructor accepts
  from a trainer on a connection that already subscribed (credits, re-subscriptions, replays and
  out-of-order positions for ranks of the job that no real trainer uses).

Meanwhile a trainer consumes its batches; at the end its stream is compared with the offline
expectation, batch for batch. Measured: process crashes (daemons that exited, role restarts),
the growth of the fabric's resident memory, and the longest time a daemon took to answer a
``Ping`` sent between fuzz messages (a wedged loop shows up there).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import zmq

from fabric_client import protocol
from fabric_client.keys import ClientKeys
from fabric_client.sockets import SocketFactory

from . import fuzzing
from .chaos import _Trainer, make_corpus
from .cluster.wire import PEER_KINDS
from .config import load_job_spec
from .corpus import job_toml
from .expect import BatchOracle, skips_from_logs
from .roles.base import role_kind
from .localnode import LocalCluster

__all__ = ["SOCKET_KINDS", "FuzzRun"]

SOCKET_KINDS = ("control", "peer", "source_loader", "constructor", "trainer_stream")

_CONTROL_TYPES = ("hello", "ping", "submit_job", "cancel_job", "status", "locate", "role_hello", "role_stats",
                  "plan_request", "pools_request", "skip_report", "peer")
_CONSTRUCTOR_TYPES = ("subscribe", "credit", "unsubscribe")
_LOADER_TYPES = ("load_request",)
_WINDOW = 200  # messages in flight per socket before the fuzzer waits for replies


class _Target:
    """One DEALER to one endpoint, sending with a bounded window of unanswered messages."""

    def __init__(self, ctx: zmq.Context, endpoint: str, replies: bool, keys: ClientKeys | None) -> None:
        self.sock = SocketFactory(ctx, keys=keys).dealer(hwm=1000)
        self.sock.connect(endpoint)
        self.replies, self.outstanding, self.received = replies, 0, 0

    def send(self, frames: list[bytes]) -> None:
        if self.replies and self.outstanding >= _WINDOW:
            self.drain(timeout_ms=2000)
            self.outstanding = min(self.outstanding, _WINDOW // 2)  # replies may be legitimately absent
        if self.sock.poll(2000, zmq.POLLOUT):
            self.sock.send_multipart(frames or [b""])
            self.outstanding += 1

    def drain(self, timeout_ms: int = 0) -> None:
        while self.sock.poll(timeout_ms):
            self.sock.recv_multipart()
            self.received += 1
            self.outstanding = max(0, self.outstanding - 1)
            timeout_ms = 0

    def close(self) -> None:
        self.sock.close(linger=0)


class FuzzRun:
    """A local fabric, one trainer, and a seeded stream of malformed messages per socket kind."""

    def __init__(self, workdir: Path, *, seed: int, nodes: int = 3) -> None:
        self.workdir, self.seed, self.nodes = Path(workdir), seed, nodes
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.cluster: LocalCluster | None = None
        self.trainer: _Trainer | None = None
        self.per_socket: Counter[str] = Counter()
        self.replies: Counter[str] = Counter()  # answers received (refusals, mostly): proof of processing
        self.max_handler_ms = 0.0
        self._ctx = zmq.Context()
        self._cache: dict[str, list[bytes]] = {}

    # -- setup ----------------------------------------------------------------------------------

    def start(self) -> None:
        corpus = self.workdir / "corpus"
        if not corpus.exists():
            make_corpus(corpus, samples=48)
        self.job_file = self.workdir / "fuzz.toml"
        # dp_size 4 with one trainer (rank 0): ranks 1-3 are the job's, but no real trainer uses them
        self.job_file.write_text(job_toml(corpus, name="fuzz", seed=23, dp_size=4, samples_per_step=8, prefetch=2))
        self.cluster = LocalCluster(self.workdir / "cluster", nodes=self.nodes, loader_workers=1, log_level="WARNING")
        self.cluster.start()
        leader = self.cluster.leader()
        with self.cluster.daemons[leader].client() as c:
            c.request(protocol.SubmitJob(spec_toml=self.job_file.read_text(), spec_path=str(self.job_file)))
        deadline = time.monotonic() + 120
        while not (self.cluster.status(leader) or {}).get("jobs", {}).get("fuzz", {}).get("serving"):
            if time.monotonic() > deadline:
                raise RuntimeError("the fuzz job did not start serving")
            time.sleep(0.1)
        self.fingerprint = self.cluster.status(leader)["jobs"]["fuzz"]["fingerprint"]
        self.pids = {n: d.proc.pid for n, d in self.cluster.daemons.items()}
        self.trainer = _Trainer(self.cluster.addresses, "fuzz", 0, 4, 0.02, self.stop_event,
                                keys=self.cluster.trainer_keys)
        self.trainer.start()
        deadline = time.monotonic() + 60
        while len(self.trainer.records) < 20 and time.monotonic() < deadline and self.trainer.is_alive():
            time.sleep(0.1)  # steady state first: the memory baseline includes delivery's own buffers
        self.rss_before = self._rss_mb()

    def _roles(self) -> list[dict[str, Any]]:
        out = []
        for node in self.cluster.daemons:
            st = self.cluster.status(node) or {}
            for r in st.get("jobs", {}).get("fuzz", {}).get("roles", ()):
                if r.get("node") == node and r.get("endpoint"):
                    out.append(r)
        return out

    def _rss_by_process(self) -> dict[str, float]:
        """Resident MB of every daemon and role process, by ``node/pid kind``."""
        out = {}
        for n, d in self.cluster.daemons.items():
            try:
                procs = [psutil.Process(d.proc.pid), *d.descendants()]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    kind = "daemon" if p.pid == d.proc.pid else role_kind(p.name()) or "other"
                    out[f"{n}/{p.pid} {kind}"] = p.memory_info().rss / 2**20
                except psutil.Error:
                    pass
        return out

    def _rss_mb(self) -> float:
        self._rss_detail = self._rss_by_process()
        return sum(self._rss_detail.values())

    # -- inputs ---------------------------------------------------------------------------------

    def _mutations(self, types: tuple[str, ...], key: str) -> list[bytes]:
        """Every field mutation of these record types (cached; drawn from in rotation)."""
        if key not in self._cache:
            rng = random.Random(f"{self.seed}/{key}")
            self._cache[key] = [h for t in types
                                for _, h in fuzzing.field_mutations(protocol.message_types()[t], rng)]
        return self._cache[key]

    def _peer_mutations(self) -> list[bytes]:
        if "peer-bodies" not in self._cache:
            rng = random.Random(f"{self.seed}/peer")
            out = []
            for kind, cls in PEER_KINDS.items():
                for _, body in fuzzing.field_mutations(cls, rng):
                    raw = body.replace(b'"v":%d,' % protocol.PROTOCOL_VERSION, b"", 1)
                    out.append(b'{"t":"peer","v":1,"sender":"node-b","kind":"%s","body":%s}' % (kind.encode(), raw))
            self._cache["peer-bodies"] = out
        return self._cache["peer-bodies"]

    def _message(self, kind: str, i: int) -> list[bytes]:
        rng = self.rng
        roll = rng.random()
        if kind == "peer":
            pool = self._peer_mutations()
        elif kind in ("constructor", "trainer_stream"):
            pool = self._mutations(_CONSTRUCTOR_TYPES, "constructor")
        elif kind == "source_loader":
            pool = self._mutations(_LOADER_TYPES, "loader")
        else:
            pool = self._mutations(_CONTROL_TYPES, "control")
        if kind == "trainer_stream" and roll < 0.5:
            return [self._trainer_message(rng)]
        if kind == "source_loader" and roll < 0.3:
            head = fuzzing.header({"t": "load_request", "job": "fuzz", "source": "code", "req_id": i,
                                   "count": rng.randint(0, 4)})
            return [head, rng.randbytes(rng.randint(0, 40)), rng.randbytes(rng.randint(0, 20))]
        if roll < 0.15:
            return fuzzing.frame_damage([pool[i % len(pool)]], rng)[1]
        return [pool[(i * 7919) % len(pool)]]

    def _trainer_message(self, rng: random.Random) -> bytes:
        """A well-formed trainer message for a rank no real trainer uses: replays, out-of-order
        positions, credits without a subscription, far-off steps."""
        dp = rng.randint(1, 3)
        choice = rng.randrange(4)
        if choice == 0:
            return fuzzing.header({"t": "subscribe", "job": "fuzz", "fingerprint": self.fingerprint,
                                   "dp_rank": dp, "mp_rank": 0,
                                   "next_step": rng.choice([0, 1, 2**30, 2**40]), "next_micro": rng.randint(0, 9),
                                   "credits": rng.randint(0, 4)})
        if choice == 1:
            return fuzzing.header({"t": "credit", "job": "fuzz", "dp_rank": dp, "mp_rank": 0,
                                   "credits": rng.randint(0, 65536)})
        if choice == 2:
            return fuzzing.header({"t": "unsubscribe", "job": "fuzz", "dp_rank": dp, "mp_rank": 0})
        return fuzzing.header({"t": "subscribe", "job": "other", "fingerprint": "x", "dp_rank": 0, "mp_rank": 0,
                               "next_step": 0, "next_micro": 0, "credits": 1})

    # -- the run --------------------------------------------------------------------------------

    def fuzz(self, messages_per_kind: int, *, progress: bool = False) -> None:
        """Send ``messages_per_kind`` messages to each socket kind, interleaved, pinging the daemons."""
        roles = self._roles()
        endpoints = {
            "control": [d.address for d in self.cluster.daemons.values()],
            "peer": [d.address for n, d in self.cluster.daemons.items() if n != "node-b"],
            "source_loader": [r["endpoint"] for r in roles if r["kind"] == "source_loader"],
            "constructor": [r["endpoint"] for r in roles if r["kind"] == "constructor"],
            "trainer_stream": [r["endpoint"] for r in roles if r["kind"] == "constructor"],
        }
        # authenticated as what each socket admits (a hostile insider: the messages reach the
        # decoders and handlers); the control sockets get every kind of key in rotation, so the
        # operator, trainer and role handlers (this node's own key) all see fuzz
        c = self.cluster
        keys = {"peer": [c.node_keys("node-b")], "source_loader": [c.node_keys("node-a")],
                "constructor": [c.trainer_keys], "trainer_stream": [c.trainer_keys]}
        targets = {}
        for kind, eps in endpoints.items():
            if kind == "control":
                targets[kind] = [_Target(self._ctx, e, True, k) for n, e in zip(c.daemons, eps)
                                 for k in (c.operator_keys, c.trainer_keys, c.node_keys(n))]
            elif eps:
                targets[kind] = [_Target(self._ctx, e, kind != "peer", k) for e in eps for k in keys[kind]]
        pingers = [(_Target(self._ctx, d.address, True, c.operator_keys), n) for n, d in c.daemons.items()]
        started = time.monotonic()
        try:
            for i in range(messages_per_kind):
                for kind, ts in targets.items():
                    ts[i % len(ts)].send(self._message(kind, i))
                    self.per_socket[kind] += 1
                if i % 250 == 0:
                    for ts in targets.values():
                        for t in ts:
                            t.drain()
                    self._ping(pingers)
                    if progress and i % 5000 == 0:
                        print(f"fuzz: {i}/{messages_per_kind} per socket kind, {time.monotonic() - started:.0f}s, "
                              f"max handler {self.max_handler_ms:.0f} ms", flush=True)
            for ts in targets.values():
                for t in ts:
                    t.drain(timeout_ms=500)
            self._ping(pingers)
        finally:
            for kind, ts in targets.items():
                for t in ts:
                    self.replies[kind] += t.received
                    t.close()
            for t, _ in pingers:
                t.close()

    def _ping(self, pingers: list[tuple[_Target, str]]) -> None:
        """Round trip of one Ping to each daemon (behind whatever fuzz is queued there)."""
        for target, _node in pingers:
            target.drain()
            t0 = time.monotonic()
            target.sock.send_multipart(protocol.encode(protocol.Ping(nonce=7)))
            deadline = t0 + 30.0
            while time.monotonic() < deadline:
                if not target.sock.poll(100):
                    continue
                msg, _ = protocol.decode(target.sock.recv_multipart())
                if isinstance(msg, protocol.Pong) and msg.nonce == 7:
                    break
            self.max_handler_ms = max(self.max_handler_ms, (time.monotonic() - t0) * 1e3)

    def finish(self) -> dict[str, Any]:
        """Stop the trainer, compare its stream with the expectation, and sum up."""
        time.sleep(1.0)  # delivery continues past the fuzzing
        crashed = [n for n, d in self.cluster.daemons.items() if d.proc is None or d.proc.poll() is not None
                   or d.proc.pid != self.pids[n]]
        restarts = sum(r.get("restarts", 0) for r in self._roles())
        before = self._rss_detail
        rss_after = self._rss_mb()
        growth = {k: round(v - before.get(k, 0.0), 1) for k, v in self._rss_detail.items()}
        top = dict(sorted(growth.items(), key=lambda kv: -kv[1])[:3])
        self.stop_event.set()
        self.trainer.join(60)
        self.cluster.stop()  # the logs are read once no daemon writes them
        skips = skips_from_logs([d.workdir / "state" / "log" for d in self.cluster.daemons.values()], "fuzz")
        oracle = BatchOracle(load_job_spec(self.job_file), skips=skips)
        records = self.trainer.records
        last = max((k[0] for k, *_ in records), default=0)
        want = {b.key(): b.checksum for s in range(last) for b in oracle.step(s) if b.dp_rank == 0}
        got = [(k, c) for k, c, _ in records if k[0] < last]
        exact = (self.trainer.error is None and last > 0 and [k for k, _ in got] == sorted(want)
                 and all(want[k] == c for k, c in got))
        return {
            "messages": sum(self.per_socket.values()),
            "per_socket": dict(self.per_socket),
            "replies": dict(self.replies),
            "crashes": len(crashed),
            "role_restarts": restarts,
            "rss_growth_mb": round(rss_after - self.rss_before, 1),
            "rss_growth_top_mb": top,
            "max_handler_ms": round(self.max_handler_ms, 1),
            "delivery_exact": bool(exact),
            "steps_checked": last,
            "trainer_error": repr(self.trainer.error) if self.trainer.error else None,
            "seed": self.seed,
        }

    def close(self) -> None:
        self.stop_event.set()
        if self.cluster is not None:
            self.cluster.stop()
        self._ctx.term()
