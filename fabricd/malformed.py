"""Malformed messages, for the chaos suite's ``malformed_burst`` fault and the tests.

A burst is what a buggy or hostile caller could put on a socket: random bytes, truncated frames,
headers that look valid but carry fields of the wrong type or out of range, ``[`` nested 100,000
deep, a header past ``MAX_HEADER_BYTES``, empty frames. Every receiver must drop and count each
one and keep serving; none of them names a real trainer rank, so a burst cannot change what any
trainer receives.
"""

from __future__ import annotations

import json
import random
import time

import zmq

from fabric_client import protocol
from fabric_client.limits import MAX_STEP

__all__ = ["burst_messages", "send_burst"]


def _header(**fields: object) -> bytes:
    return json.dumps({"v": protocol.PROTOCOL_VERSION, **fields}).encode()


def burst_messages(rng: random.Random, *, job: str, random_count: int = 40) -> list[list[bytes]]:
    """One burst: a list of multipart messages (lists of frames), in a seeded random order."""
    out: list[list[bytes]] = []
    for _ in range(random_count):  # random bytes, 1-3 frames
        out.append([rng.randbytes(rng.randint(0, 2048)) for _ in range(rng.randint(1, 3))])
    valid = [
        protocol.Locate(job=job, dp_rank=0, dp_size=2),
        protocol.PlanRequest(job=job, step=1, ranks=[0]),
        protocol.SkipReport(job=job, step=1, source="captions", sample_id=1, piece=0, reason="x"),
        protocol.Subscribe(job=job, fingerprint="f", dp_rank=0, mp_rank=0, next_step=0, next_micro=0, credits=1),
        protocol.StatusRequest(),
    ]
    for msg in valid:  # truncated: a valid header cut short
        header = protocol.encode(msg)[0]
        out.append([header[:rng.randint(1, len(header) - 1)]])
    out += [[h] for h in (  # valid-looking headers, fields of the wrong type or out of range
        _header(t="plan_request", job=job, step="1", ranks=[0]),
        _header(t="plan_request", job=job, step=MAX_STEP * 4, ranks=[10**9]),
        _header(t="plan_request", job=[job], step=1, ranks={"0": 1}),
        _header(t="skip_report", job=job, step=-3, source="captions", sample_id=1, piece=0, reason="x"),
        _header(t="skip_report", job=job, step=1, source="no-such-source", sample_id=2**62, piece=2**40, reason=""),
        _header(t="skip_report", job=job, step=1.5, source=None, sample_id="1", piece=[], reason=7),
        _header(t="subscribe", job=job, fingerprint="f", dp_rank=-1, mp_rank=0, next_step=0, next_micro=0,
                credits=10**12),
        _header(t="subscribe", job=job, fingerprint="f", dp_rank=10**6, mp_rank=10**6, next_step=2**62,
                next_micro=-1, credits=-5),
        _header(t="credit", job=job, dp_rank="0", mp_rank=None, credits=1e308),
        _header(t="locate", job=job, dp_rank=True, dp_size=0, avoid="x" * 1000),
        _header(t="pools_request"),
        _header(t="role_hello", role_id=3, pid="x", endpoint=None),
        _header(t="no_such_type", x=1),
        _header(t="ping", nonce=2**80),
        json.dumps({"v": 99, "t": "ping"}).encode(),
        json.dumps([1, 2, 3]).encode(),
        b'{"v":1,"t":"ping","nonce":1',
        b"\xff\xfe\x00garbage",
        b"",
    )]
    out.append([b"[" * 100_000])  # nested deeper than any parser's stack
    out.append([b'{"v":1,"t":"ping","nonce":' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
    out.append([_header(t="ping", pad="x" * (protocol.MAX_HEADER_BYTES + 10))])  # oversize header
    out.append([_header(t="plan_request", job=job, step=1, ranks=[0]), b"\x00" * 64, b"stray payload"])
    rng.shuffle(out)
    return out


def send_burst(endpoint: str, messages: list[list[bytes]], *, context: zmq.Context | None = None,
               linger_s: float = 2.0) -> int:
    """Send ``messages`` from one plain DEALER to ``endpoint``, drain whatever comes back for
    ``linger_s`` (so replies do not pile up at the receiver), and return how many replies came."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    replies = 0
    try:
        sock.connect(endpoint)
        for frames in messages:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.01)
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline:
            if sock.poll(50):
                sock.recv_multipart()
                replies += 1
    finally:
        sock.close(linger=0)
    return replies
