"""The source-loader role: reads, decodes and transforms the units of one source on request.

One process per pool worker. It binds a ROUTER; data constructors send ``LoadRequest`` to the
workers that are free (the constructor keeps at most a couple of requests in flight per
worker), so a free worker takes the next request. Bad samples come back as per-unit errors,
never as a crash; malformed requests are counted and dropped. The failpoint
``loader.transient_error`` (subject ``SOURCE:SAMPLE_ID``) fails chosen units once, for chaos tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zmq

from fabric_client import protocol
from fabric_client.errors import ProtocolError

from ..config import parse_job_spec
from ..errors import SampleError
from ..failpoints import failpoint, fails
from ..job import job_tokenizer, transform_spec
from ..sources.index import open_index
from ..planner.units import LONG_SAMPLE_POLICIES
from ..sources.transform import SampleLoader, TransformSpec
from ..spec_bounds import MAX_SEQ_LEN
from .base import DaemonLink, RoleArgs, StopFlag, local_router, role_sockets
from .sample_wire import encode_load_reply

__all__ = ["run_source_loader", "MAX_UNITS_PER_REQUEST"]

log = logging.getLogger(__name__)

MAX_UNITS_PER_REQUEST = 4096
#: Unit contexts (max_seq_len, long_samples) a source loader keeps a loader for.
MAX_CONTEXTS = 8


def run_source_loader(args: RoleArgs) -> int:
    """Serve one source until stopped; returns the process exit code."""
    with open(args.spec_path, encoding="utf-8") as f:
        spec = parse_job_spec(f.read(), args.spec_origin)
    source_name = args.extra["source"]
    source = next(s for s in spec.sources if s.name == source_name)
    roots = [Path(p) for p in args.extra["data_roots"]]  # the node's: nothing outside them is read
    tokenizer = job_tokenizer(spec, roots=roots, parallel=False)  # one process of a pool: one thread
    index = open_index(source.name, source.path, format=source.format, index_dir=Path(args.extra["index_dir"]),
                       roots=roots, tokenizer=tokenizer)
    base = transform_spec(spec, source.name)
    loaders = {(0, ""): SampleLoader(index, base, roots=roots, tokenizer=tokenizer)}  # by (max_seq_len, long_samples)

    stop = StopFlag(args.parent_pid)
    ctx = zmq.Context()
    sockets = role_sockets(ctx, args)
    served = [sockets.router(domain="loader")]
    port = served[0].bind_to_random_port(f"tcp://{args.bind_host}")
    link = DaemonLink(sockets, args, f"tcp://{args.bind_host}:{port}")
    if (local := local_router(sockets, args, link.endpoint, domain="loader")) is not None:
        served.append(local)  # this node's constructors connect here (fabricd.local_ipc)
    stats = {"requests": 0, "units": 0, "failed_units": 0, "malformed": 0, "busy_s": 0.0,
             "source": source.name}
    poller = zmq.Poller()
    for sock in served:
        poller.register(sock, zmq.POLLIN)
    poller.register(link.sock, zmq.POLLIN)
    log.info("source loader %s for %r serving on %s", args.role_id, source.name,
             " and ".join([link.endpoint, *(s.getsockopt_string(zmq.LAST_ENDPOINT) for s in served[1:])]))

    def serve_one(sock: zmq.Socket) -> None:
        """Answer one request waiting on ``sock``, on ``sock``: units, or an error reply."""
        frames = sock.recv_multipart(copy=False)
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg, payload = protocol.decode(body)
            if not isinstance(msg, protocol.LoadRequest):
                raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"source loader cannot serve {msg.TYPE}")
            ids, pieces = _request_units(msg, payload, source.name)
            loader = _context_loader(loaders, msg, base, index, roots, tokenizer)
        except ProtocolError as e:
            stats["malformed"] += 1
            log.warning("dropped malformed request: %s", e)
            _send(sock, identity, protocol.encode(protocol.ErrorReply(code=e.code, reason=e.reason)))
            return
        started = time.perf_counter()
        failpoint("loader.before_load")  # counts as busy: it stands for a slow read
        results = _inject_transient_errors(loader.load(ids, pieces), ids, source.name)
        stats["busy_s"] += time.perf_counter() - started
        stats["requests"] += 1
        stats["units"] += len(results)
        stats["failed_units"] += sum(isinstance(r, SampleError) for r in results)
        _send(sock, identity, encode_load_reply(msg, results, spec.images))

    try:
        while not stop.should_stop():
            link.beat(lambda: stats)
            events = dict(poller.poll(200))
            if link.sock in events:
                link.recv()  # the daemon only acknowledges; nothing to act on yet
            for sock in served:  # one request from each ready socket: neither starves the other
                if sock in events:
                    serve_one(sock)
    finally:
        link.close()
        for sock in served:
            sock.close(linger=0)  # a bound Unix socket's file goes with it
        sockets.close()
        ctx.term()
    return 0


def _context_loader(loaders: dict, msg: protocol.LoadRequest, base: TransformSpec, index, roots, tokenizer):
    """The loader of the context a request asks for (a plan change of the source's bucket; the
    spec's by default): at most ``MAX_CONTEXTS`` are kept (a job changes its buckets rarely)."""
    key = (msg.max_seq_len, msg.long_samples)
    if key not in loaders:
        if not 2 <= msg.max_seq_len <= MAX_SEQ_LEN or msg.long_samples not in LONG_SAMPLE_POLICIES:
            raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"load_request context max_seq_len "
                                f"{msg.max_seq_len}, long_samples {msg.long_samples!r} is not one a job can have")
        while len(loaders) >= MAX_CONTEXTS:
            loaders.pop(next(k for k in loaders if k != (0, "")))
        loaders[key] = SampleLoader(index, replace(base, max_seq_len=msg.max_seq_len, long_samples=msg.long_samples),
                                    roots=roots, tokenizer=tokenizer)
    return loaders[key]


def _inject_transient_errors(results: list, ids: np.ndarray, source: str) -> list:
    """The ``loader.transient_error`` failpoint: a unit it names fails this time as if its read
    had hit an NFS hiccup or an object store's 503 (the next read of it may well succeed)."""
    return [SampleError(source, int(i), "transient read error (failpoint loader.transient_error)")
            if fails("loader.transient_error", f"{source}:{int(i)}") else r for r, i in zip(results, ids)]


def _request_units(msg: protocol.LoadRequest, payload: list, source: str) -> tuple[np.ndarray, np.ndarray]:
    if msg.source != source:
        raise ProtocolError(protocol.ErrorCode.BAD_REQUEST, f"this worker serves {source!r}, not {msg.source!r}")
    if len(payload) != 2 or not 0 < msg.count <= MAX_UNITS_PER_REQUEST:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"load_request with {len(payload)} frames, count {msg.count}")
    try:
        ids = np.frombuffer(payload[0].buffer, np.int64)
        pieces = np.frombuffer(payload[1].buffer, np.int32)
    except ValueError as e:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"load_request frames: {e}") from e
    if len(ids) != msg.count or len(pieces) != msg.count:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, "load_request frame sizes do not match count")
    return ids, pieces


def _send(sock: zmq.Socket, identity: bytes, frames: list) -> None:
    try:
        sock.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
    except zmq.ZMQError as e:  # peer gone (EHOSTUNREACH) or its queue full: it will retry elsewhere
        log.info("reply to a vanished or full constructor dropped: %s", e)
