"""Transport benchmark: GB/s of array bytes delivered to ONE trainer through the real Loader,
against raw pyzmq PUSH/PULL of the same array bytes per message, same run, same transport.

Loader path: micro-batches of ~1 MiB of array bytes are built by ``pack_micro_batch`` from
synthetic samples (byte-level text tokens + image blocks with smooth-with-noise pixels), encoded
once (Arrow IPC, like the constructor does) and served by ``TrainerDelivery`` from a separate
process over tcp loopback; the trainer receives, decodes and checksum-verifies every batch into
numpy arrays. Raw path: a separate process PUSHes the same arrays (one frame per array,
``copy=False``); the receiver ``recv(copy=False)``s and ``np.frombuffer``s every frame.

Each round runs a raw trial and a loader trial back to back (raw first in even rounds, loader
first in odd ones, so a drifting machine load hits both alike), then the loader over CurveZMQ;
this for lz4, then for no compression. The headline ratios are medians over rounds of each
loader trial ÷ its raw neighbour: ``ratio_lz4`` and ``ratio_none`` (``ratio`` and
``none_ratio`` are the older ratio of the medians). ``curve_ratio`` is the encrypted ÷ plaintext
Loader throughput, same run: the fabric's sockets are CurveZMQ by default (the trainer
authenticates with its key, the stream is encrypted), so that is the price of security.
``cpu_us_per_mib_*`` is the CPU time (all threads, zmq's I/O thread included) each side's
process spent per MiB of array bytes delivered (medians): a view of the cost that a machine
shared with other work disturbs less than GB/s. The last line of output is one JSON object.

    python scripts/bench/transport.py [--seconds 3] [--trials 5] [--batch-kib 1024]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (ROOT, os.path.join(ROOT, "client")):
    if path not in sys.path:
        sys.path.insert(0, path)

from fabric_client import Loader, protocol  # noqa: E402
from fabric_client.keys import ClientKeys, KeyRing  # noqa: E402
from fabric_client.sockets import SocketFactory  # noqa: E402
from fabric_client.batch import checksum, encode_batch  # noqa: E402
from fabricd.pack import IMAGE_ID, pack_micro_batch  # noqa: E402
from fabricd.localnode import TRAINER_KEY, ensure_keys  # noqa: E402
from fabricd.roles.delivery import EncodedBatch, TrainerDelivery  # noqa: E402

log = logging.getLogger("bench.transport")

JOB = "bench"
FINGERPRINT = "bench-fp"
DISTINCT = 8  # distinct batches the server cycles through (built and encoded once each)
MICROS = 4
IMAGE_SIZE = 224


@dataclass
class _Sample:
    input_ids: np.ndarray
    image_starts: np.ndarray
    pixels: np.ndarray


def _image(rng: np.random.Generator) -> np.ndarray:
    """A smooth random picture with sensor-like noise (lz4 finds little to squeeze, as in life)."""
    coarse = rng.integers(0, 256, size=(8, 8, 3)).astype(np.float32)
    up = np.kron(coarse, np.ones((IMAGE_SIZE // 8, IMAGE_SIZE // 8, 1), dtype=np.float32))
    noise = rng.normal(0, 3, size=up.shape).astype(np.float32)
    return np.clip(up + noise, 0, 255).astype(np.uint8)


def build_arrays(seed: int, target_bytes: int) -> dict[str, np.ndarray]:
    """One packed micro-batch of about ``target_bytes`` array bytes (about 60% pixels)."""
    rng = np.random.default_rng(seed)
    image_bytes = IMAGE_SIZE * IMAGE_SIZE * 3
    images = max(1, round(0.6 * target_bytes / image_bytes))
    token_budget = max(64, int((target_bytes - images * image_bytes) / 12))  # input_ids, labels, position_ids
    samples, ids_left = [], token_budget
    per_sample_tokens = max(32, token_budget // images)
    for i in range(images):
        n = min(ids_left, per_sample_tokens) if i < images - 1 else max(16, ids_left)
        text = rng.choice(np.arange(3, 259), size=n, p=_byte_freqs()).astype(np.int32)  # byte-level text
        start = int(rng.integers(0, max(1, n - 16)))
        text[start : start + 16] = IMAGE_ID
        samples.append(_Sample(text, np.array([start], dtype=np.int32), _image(rng)[None]))
        ids_left -= n
    k = len(samples)
    return pack_micro_batch(
        samples,
        source_ids=np.zeros(k, np.int32),
        sample_ids=np.arange(k, dtype=np.int64) + seed * 1000,
        pieces=np.zeros(k, np.int32),
        image_size=IMAGE_SIZE,
    )


def _byte_freqs() -> np.ndarray:
    w = np.ones(256)
    w[ord("a") : ord("z") + 1] = 40.0  # mostly lower-case ASCII text
    w[ord(" ")] = 120.0
    w[128:] = 0.2
    return w / w.sum()


def array_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


# ------------------------------------------------------------------------------ server processes


class _CpuMark:
    """A server's side of its pipe: "mark" starts counting this process's CPU time (all its
    threads, zmq's I/O thread included), "split" sends the CPU seconds since, "stop" ends."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.start = time.process_time()

    def stopped(self) -> bool:
        if not self.conn.poll(0):
            return False
        what = self.conn.recv()
        if what == "mark":
            self.start = time.process_time()
        elif what == "split":
            self.conn.send(time.process_time() - self.start)
        return what == "stop"



def serve_loader(conn: Any, compression: str | None, target_bytes: int, prefetch: int,
                 keys_dir: str | None = None) -> None:
    """Constructor stand-in: a locator ROUTER (Hello/Locate) and a delivery ROUTER, one loop,
    from the fabric's socket factory (CurveZMQ servers with the node's keys when ``keys_dir``)."""
    ctx = zmq.Context()
    frames = []
    for seed in range(DISTINCT):
        arrays = build_arrays(seed, target_bytes)
        frames.append((encode_batch(arrays, compression=compression), checksum(arrays), array_bytes(arrays)))
    ring = KeyRing(keys_dir, "bench") if keys_dir else None
    sockets = SocketFactory(ctx, ring=ring)
    loc = sockets.router(domain="control")
    loc_port = loc.bind_to_random_port("tcp://127.0.0.1")
    data = sockets.router(domain="stream")
    data_port = data.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{data_port}"
    delivery = TrainerDelivery(data, job=JOB, fingerprint=FINGERPRINT, ranks=[0], mp_size=1)

    def lookup(rank: int, step: int, micro: int) -> EncodedBatch:
        frame, digest, nbytes = frames[(step * MICROS + micro) % DISTINCT]
        header = protocol.Batch(JOB, step, rank, micro, MICROS, digest, 1, nbytes, 0)
        return EncodedBatch(header, frame)

    conn.send((f"tcp://127.0.0.1:{loc_port}", frames[0][2], frames[0][0].size))
    poller = zmq.Poller()
    poller.register(loc, zmq.POLLIN)
    poller.register(data, zmq.POLLIN)
    cpu = _CpuMark(conn)
    try:
        while not cpu.stopped():
            events = dict(poller.poll(100))
            if loc in events:
                identity, *raw = loc.recv_multipart()
                msg, _ = protocol.decode(raw)
                reply: protocol.Message
                if isinstance(msg, protocol.Hello):
                    reply = protocol.Welcome(protocol.PROTOCOL_VERSION, "bench", "0")
                else:
                    reply = protocol.Located(JOB, FINGERPRINT, endpoint, 1, 1, prefetch)
                loc.send_multipart([identity, *protocol.encode(reply)])
            if data in events:
                while True:
                    try:
                        identity, *raw = data.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    delivery.handle(identity, protocol.decode(raw)[0])
            delivery.pump(lookup)
    finally:
        loc.close(linger=0)
        data.close(linger=0)
        sockets.close()
        ctx.term()


def serve_raw(conn: Any, endpoint: str, target_bytes: int) -> None:
    """PUSH the same packed arrays, one frame per array, without copying."""
    ctx = zmq.Context()
    batches = [list(build_arrays(seed, target_bytes).values()) for seed in range(DISTINCT)]
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDTIMEO, 100)
    push.connect(endpoint)
    conn.send("ready")
    i = 0
    cpu = _CpuMark(conn)
    try:
        while not cpu.stopped():
            try:
                push.send_multipart(batches[i % DISTINCT], copy=False)
                i += 1
            except zmq.Again:
                pass
    finally:
        push.close(linger=0)
        ctx.term()


# ------------------------------------------------------------------------------ measurements


def _split(conn: Any) -> float:
    """The CPU seconds a server process used since its mark (nan if it does not answer)."""
    conn.send("split")
    return conn.recv() if conn.poll(10) else float("nan")


def _stop(proc: mp.Process, conn: Any) -> None:
    conn.send("stop")
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


def trial_loader(
    mpctx: Any, compression: str | None, seconds: float, target_bytes: int, prefetch: int, verify: bool = True,
    keys_dir: str | None = None,
) -> dict:
    parent, child = mpctx.Pipe()
    proc = mpctx.Process(target=serve_loader, args=(child, compression, target_bytes, prefetch, keys_dir), daemon=True)
    proc.start()
    keys = ClientKeys.load(os.path.join(keys_dir, TRAINER_KEY)) if keys_dir else None
    try:
        address, batch_bytes, wire_bytes = parent.recv()
        with Loader(address, job=JOB, dp_rank=0, dp_size=1, verify=verify, deadline_s=30, keys=keys) as loader:
            it = iter(loader)
            warm_end = time.perf_counter() + 0.5
            while time.perf_counter() < warm_end:
                next(it)
            parent.send("mark")
            b0, n0, t0, c0 = loader.stats["bytes"], loader.stats["batches"], time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                batch = next(it)
                _ = batch["pixel_values"]  # a trainer touches what it receives
            dt, rx_cpu, tx_cpu = time.perf_counter() - t0, time.process_time() - c0, _split(parent)
            got = loader.stats["bytes"] - b0
            count = loader.stats["batches"] - n0
        return {"gbps": got / dt / 1e9, "batches": count, "batch_bytes": batch_bytes, "wire_bytes": wire_bytes,
                "bytes": got, "rx_cpu_s": rx_cpu, "tx_cpu_s": tx_cpu}
    finally:
        _stop(proc, parent)


def trial_raw(mpctx: Any, seconds: float, target_bytes: int) -> dict:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    parent, child = mpctx.Pipe()
    proc = mpctx.Process(target=serve_raw, args=(child, f"tcp://127.0.0.1:{port}", target_bytes), daemon=True)
    proc.start()
    try:
        parent.recv()

        def one() -> int:
            frames = pull.recv_multipart(copy=False)
            return sum(np.frombuffer(f.buffer, dtype=np.uint8).nbytes for f in frames)

        warm_end = time.perf_counter() + 0.5
        while time.perf_counter() < warm_end:
            one()
        parent.send("mark")
        got, count, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            got += one()
            count += 1
        dt, rx_cpu, tx_cpu = time.perf_counter() - t0, time.process_time() - c0, _split(parent)
        return {"gbps": got / dt / 1e9, "batches": count, "bytes": got, "rx_cpu_s": rx_cpu, "tx_cpu_s": tx_cpu}
    finally:
        _stop(proc, parent)
        pull.close(linger=0)
        ctx.term()


def _cpu_us_per_mib(trials: list[dict], side: str) -> float:
    """Median CPU microseconds one side's process spent per MiB of array bytes delivered."""
    return round(statistics.median(t[f"{side}_cpu_s"] * 1e6 / (t["bytes"] / 2**20) for t in trials), 1)


def run(
    compression: str | None, seconds: float, trials: int, target_bytes: int, prefetch: int, diagnose: bool,
    keys_dir: str,
) -> dict:
    """``trials`` rounds of raw and loader (order alternating, so drift hits both alike) then the
    loader over CurveZMQ; the ratios are medians over rounds of loader ÷ the adjacent raw trial."""
    mpctx = mp.get_context("spawn")
    raws, loaders, curve, unverified, info = [], [], [], [], {}
    for i in range(trials):
        if i % 2 == 0:
            r = trial_raw(mpctx, seconds, target_bytes)
            ld = trial_loader(mpctx, compression, seconds, target_bytes, prefetch)
        else:
            ld = trial_loader(mpctx, compression, seconds, target_bytes, prefetch)
            r = trial_raw(mpctx, seconds, target_bytes)
        cv = trial_loader(mpctx, compression, seconds, target_bytes, prefetch, keys_dir=keys_dir)
        raws.append(r)
        loaders.append(ld)
        curve.append(cv["gbps"])
        info = ld
        extra = ""
        if diagnose:  # where the time goes: the same loader path without checksum verification
            nv = trial_loader(mpctx, compression, seconds, target_bytes, prefetch, verify=False)
            unverified.append(nv["gbps"])
            extra = f", loader unverified {nv['gbps']:.2f} GB/s (diagnostic)"
        print(f"  [{compression or 'none'}] trial {i}: raw {r['gbps']:.2f} GB/s ({r['batches']} msgs), "
              f"loader {ld['gbps']:.2f} GB/s ({ld['batches']} batches), ratio {ld['gbps'] / r['gbps']:.3f}, "
              f"loader over CurveZMQ {cv['gbps']:.2f} GB/s{extra}", flush=True)
    raw = [t["gbps"] for t in raws]
    loader = [t["gbps"] for t in loaders]
    paired = [ld / r for ld, r in zip(loader, raw)]
    raw_med, loader_med, curve_med = statistics.median(raw), statistics.median(loader), statistics.median(curve)
    diag = {"loader_unverified_gbps": round(statistics.median(unverified), 3)} if unverified else {}
    return {
        **diag,
        "loader_gbps": round(loader_med, 3),
        "raw_gbps": round(raw_med, 3),
        "ratio": round(loader_med / raw_med, 3),
        "paired_ratio": round(statistics.median(paired), 3),
        "paired_ratio_trials": [round(x, 3) for x in paired],
        "curve_gbps": round(curve_med, 3),
        "curve_ratio": round(curve_med / loader_med, 3),
        "curve_trials": [round(x, 3) for x in curve],
        "compression": compression or "none",
        "batch_bytes": info["batch_bytes"],
        "wire_bytes": info["wire_bytes"],
        "loader_trials": [round(x, 3) for x in loader],
        "raw_trials": [round(x, 3) for x in raw],
        "cpu_us_per_mib": {"raw_rx": _cpu_us_per_mib(raws, "rx"), "raw_tx": _cpu_us_per_mib(raws, "tx"),
                           "loader_rx": _cpu_us_per_mib(loaders, "rx"), "loader_tx": _cpu_us_per_mib(loaders, "tx")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per trial")
    parser.add_argument("--trials", type=int, default=5, help="rounds of raw and loader trials (alternating)")
    parser.add_argument("--batch-kib", type=int, default=1024, help="array bytes per batch, KiB")
    parser.add_argument("--prefetch", type=int, default=8, help="loader credits")
    parser.add_argument(
        "--diagnose", action="store_true", help="also time the loader without checksum verification (extra keys)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    target = args.batch_kib * 1024
    os.environ.pop("FABRIC_KEY", None)  # the plaintext trials are plaintext whatever the environment says
    results = {}
    with tempfile.TemporaryDirectory() as keys_dir:
        ensure_keys(keys_dir, ["bench"])
        for compression in ("lz4", None):
            res = run(compression, args.seconds, args.trials, target, args.prefetch, args.diagnose, keys_dir)
            results[res["compression"]] = res
            print(f"{res['compression']}: loader {res['loader_gbps']} GB/s, raw {res['raw_gbps']} GB/s, "
                  f"ratio {res['paired_ratio']} (median of paired trials; of medians {res['ratio']}), "
                  f"over CurveZMQ {res['curve_gbps']} GB/s (curve_ratio {res['curve_ratio']}), "
                  f"batch {res['batch_bytes']} array bytes -> {res['wire_bytes']} wire bytes, "
                  f"CPU us/MiB {res['cpu_us_per_mib']}", flush=True)
    head, none = results["lz4"], results["none"]
    line = {
        # the headline: loader ÷ raw pyzmq, medians over trials of each loader trial ÷ its adjacent raw trial
        "ratio_lz4": head["paired_ratio"],
        "ratio_none": none["paired_ratio"],
        **{k: head[k] for k in ("loader_gbps", "raw_gbps", "ratio", "curve_gbps", "curve_ratio", "compression",
                                "batch_bytes", "wire_bytes")},
        "none_loader_gbps": none["loader_gbps"],
        "none_curve_ratio": none["curve_ratio"],
        "none_raw_gbps": none["raw_gbps"],
        "none_ratio": none["ratio"],
        "ratio_lz4_trials": head["paired_ratio_trials"],
        "ratio_none_trials": none["paired_ratio_trials"],
        "cpu_us_per_mib_lz4": head["cpu_us_per_mib"],
        "cpu_us_per_mib_none": none["cpu_us_per_mib"],
        **({"loader_unverified_gbps": head["loader_unverified_gbps"],
            "none_loader_unverified_gbps": none["loader_unverified_gbps"]} if args.diagnose else {}),
        "seconds": args.seconds,
        "trials": args.trials,
        "prefetch": args.prefetch,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
