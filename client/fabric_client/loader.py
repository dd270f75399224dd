"""The trainer-side ``Loader``: iterate over this rank's batches, resumable from a few bytes.

Usage::

    loader = Loader("tcp://node-a:7700", job="vlm-pretrain", dp_rank=r, dp_size=n)
    loader.load_state_dict(ckpt.get("data", {}))
    for batch in loader:            # FabricBatch: dict of numpy arrays (or torch tensors)
        ...
        ckpt["data"] = loader.state_dict()

How it works: the loader asks a daemon (``Hello`` → ``Locate``) which constructor serves its
rank, subscribes there from its cursor with ``prefetch`` credits, and returns one credit for
every batch it hands out. It relocates by itself (asks the daemons again, resubscribes from the
cursor on a fresh socket) when the constructor falls silent for ``stall_s``.

Every ``Locate`` declares the trainer's host (``host=``, else ``$FABRIC_TRAINER_HOST``, else the
hostname), and the leader places the rank's data constructor on a daemon of that host when
there is one: batches then cross the loopback, not the network. While a loader is served by its
group's standby constructor (the primary was down or moving), it asks every
``primary_check_s`` whether the primary is up again, and moves back to it from its cursor.

Promises:

- Exactly-once from the trainer's view: batches come out in strict ``(step, micro)`` order from
  the cursor; anything else received is dropped and counted. Since a batch's content is a pure
  function of ``(job, step, rank, micro)``, resubscribing from the cursor never skips or repeats.
- Never hangs forever: when no batch arrives for ``deadline_s`` it raises
  :class:`FabricUnavailable` naming the addresses and endpoint it tried and the last error.
- Zero-copy: arrays view the received (or decompressed) frames.
- ``verify=True``: each batch's content is checked against the checksum it was sent with;
  a mismatch raises :class:`BatchIntegrityError` when that batch's turn comes.
- Received batches (at most ``prefetch``, bounded by credits) are decoded and verified ahead, on
  ``decode_workers`` threads, while the trainer works on the previous one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq

from . import protocol
from .batch import decode_batch, decode_verified
from .errors import BatchIntegrityError, FabricUnavailable, ProtocolError, RemoteError
from .protocol import PROTOCOL_VERSION, ErrorCode

__all__ = ["Loader", "FabricBatch", "HOST_ENV", "STATE_JOB", "STATE_NEXT_STEP", "STATE_NEXT_MICRO"]

log = logging.getLogger(__name__)

#: Environment variable naming the trainer's host when its hostname is not how daemons know it.
HOST_ENV = "FABRIC_TRAINER_HOST"

#: Keys of :meth:`Loader.state_dict`.
STATE_JOB = "job"
STATE_NEXT_STEP = "next_step"
STATE_NEXT_MICRO = "next_micro"

#: ErrorReply codes that mean "ask again later" (while locating) or "relocate" (from a constructor).
_RETRY_CODES = frozenset({ErrorCode.NOT_READY, ErrorCode.UNKNOWN_JOB, ErrorCode.STALE})
_UNSUBSCRIBE_LINGER_MS = 100  # how long a closed stream socket may keep trying to deliver its Unsubscribe
_PROBE_TIMEOUT_S = 0.25  # how long a check for the primary constructor may hold up the trainer
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0
_DEFAULT_PREFETCH = 4
_MAX_DEFAULT_WORKERS = 4


class FabricBatch(dict):
    """One micro-batch: ``name → array`` (numpy, or torch tensors with ``torch=True``).

    Attributes: ``step``, ``micro_batch``, ``num_micro_batches``, ``dp_rank``, ``checksum``,
    ``samples``, ``tokens``, ``skipped`` (as sent by the constructor).
    """

    step: int
    micro_batch: int
    num_micro_batches: int
    dp_rank: int
    checksum: str
    samples: int
    tokens: int
    skipped: int

    def __init__(self, arrays: Mapping[str, Any], header: protocol.Batch) -> None:
        super().__init__(arrays)
        self.step = header.step
        self.micro_batch = header.micro_batch
        self.num_micro_batches = header.num_micro_batches
        self.dp_rank = header.dp_rank
        self.checksum = header.checksum
        self.samples = header.samples
        self.tokens = header.tokens
        self.skipped = header.skipped

    def __repr__(self) -> str:
        shapes = {k: tuple(getattr(v, "shape", ())) for k, v in self.items()}
        return (
            f"FabricBatch(step={self.step}, micro={self.micro_batch}/{self.num_micro_batches}, "
            f"dp_rank={self.dp_rank}, samples={self.samples}, tokens={self.tokens}, arrays={shapes})"
        )


class Loader:
    """Iterates over the batches of one trainer rank of a fabricd job (see the module docstring)."""

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        job: str,
        dp_rank: int,
        dp_size: int,
        mp_rank: int = 0,
        prefetch: int | None = None,
        deadline_s: float = 120.0,
        stall_s: float = 5.0,
        verify: bool = True,
        torch: bool = False,
        max_steps: int | None = None,
        context: zmq.Context | None = None,
        decode_workers: int | None = None,
        host: str | None = None,
        primary_check_s: float = 3.0,
    ) -> None:
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses or not all(isinstance(a, str) and a for a in addresses):
            raise ValueError(f"address = {address!r}: need one or more daemon endpoints")
        if not job:
            raise ValueError(f"job = {job!r}: must be a non-empty name")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank = {dp_rank!r}, dp_size = {dp_size!r}: need 0 <= dp_rank < dp_size")
        if mp_rank < 0:
            raise ValueError(f"mp_rank = {mp_rank!r}: must be >= 0")
        if prefetch is not None and prefetch < 1:
            raise ValueError(f"prefetch = {prefetch!r}: must be >= 1 (or None for the job's default)")
        if deadline_s <= 0 or stall_s <= 0 or primary_check_s <= 0:
            raise ValueError(f"deadline_s = {deadline_s!r}, stall_s = {stall_s!r}, primary_check_s = "
                             f"{primary_check_s!r}: must be positive")
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps = {max_steps!r}: must be >= 0")
        if decode_workers is not None and decode_workers < 0:
            raise ValueError(f"decode_workers = {decode_workers!r}: must be >= 0 (0 decodes inline)")
        if host is not None and (not isinstance(host, str) or not host.strip()):
            raise ValueError(f"host = {host!r}: must be a non-empty host name (or None for this host's name)")
        if torch:
            _import_torch()  # fail at construction, with a clear message, not mid-training
        self.addresses = addresses
        self.job = job
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.mp_rank = int(mp_rank)
        #: Declared with every Locate, so the leader can place this rank's constructor on this host.
        self.host = host if host is not None else (os.environ.get(HOST_ENV) or socket.gethostname())
        self.prefetch = prefetch
        self.deadline_s = float(deadline_s)
        self.stall_s = float(stall_s)
        self.primary_check_s = float(primary_check_s)
        self.verify = verify
        self.torch = torch
        self.max_steps = max_steps
        self._own_context = context is None
        self._ctx = zmq.Context() if context is None else context
        self._step = 0
        self._micro = 0
        self._sock: zmq.Socket | None = None
        self._workers = decode_workers if decode_workers is not None else _default_workers()
        self._pool: ThreadPoolExecutor | None = None
        self._ahead = max(1, self._workers)  # batches received and being decoded before hand-out
        # received batches in cursor order, each with its decode+verify job (None: decode inline)
        self._pending: deque[tuple[protocol.Batch, Any, Future | None]] = deque()
        self._rx_step = 0  # where the next *received* batch must be (ahead of the cursor by _pending)
        self._rx_micro = 0
        self._endpoint: str | None = None
        self._standby = False          # the current endpoint is the group's standby constructor
        self._primary_check_at = 0.0
        self._address: str | None = None  # the daemon that answered the last Locate (asked first)
        self._fingerprint: str | None = None
        self._credits = _DEFAULT_PREFETCH
        self._last_error = "none"
        self._closed = False
        self._retry_at = 0.0  # monotonic time before which no new subscription is attempted
        self._refusal_backoff = _BACKOFF_FIRST_S
        (self._credit_frame,) = protocol.encode(protocol.Credit(self.job, self.dp_rank, self.mp_rank, 1))
        (self._unsubscribe_frame,) = protocol.encode(protocol.Unsubscribe(self.job, self.dp_rank, self.mp_rank))
        self.stats: dict[str, Any] = {
            "batches": 0,
            "bytes": 0,
            "wire_bytes": 0,
            "relocations": 0,
            "primary_returns": 0,
            "locates": 0,
            "stale_dropped": 0,
            "heartbeats": 0,
            "malformed": 0,
            "endpoint": None,
        }
        self._avoid: list[str] = []  # the endpoint that went silent, until a batch arrives again

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The position to resume from: ``{"job", "next_step", "next_micro"}``."""
        return {STATE_JOB: self.job, STATE_NEXT_STEP: self._step, STATE_NEXT_MICRO: self._micro}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at ``state`` (from :meth:`state_dict`); an empty mapping means the start.

        Raises ``ValueError`` for another job's state or a malformed one.
        """
        if not state:
            step, micro = 0, 0
        else:
            if state.get(STATE_JOB) != self.job:
                raise ValueError(f"state of job {state.get(STATE_JOB)!r} given to the loader of job {self.job!r}")
            step, micro = state.get(STATE_NEXT_STEP), state.get(STATE_NEXT_MICRO, 0)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step, micro)):
                raise ValueError(f"state {dict(state)!r}: next_step and next_micro must be ints >= 0")
        if (step, micro) != (self._step, self._micro):
            self._drop_stream()  # the constructor is streaming from the old cursor
        self._step, self._micro = step, micro

    # ------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[FabricBatch]:
        while not self._closed and (self.max_steps is None or self._step < self.max_steps):
            yield self._next_batch()

    def _next_batch(self) -> FabricBatch:
        deadline = time.monotonic() + self.deadline_s
        while True:
            if self._closed:
                raise FabricUnavailable("the loader was closed")
            if self._sock is None:
                pause = min(self._retry_at, deadline) - time.monotonic()
                if pause > 0:  # the last constructor refused us: do not hammer the daemons
                    time.sleep(pause)
                self._connect(deadline)
                if self._sock is None:
                    continue
            stall_at = time.monotonic() + self.stall_s
            while self._sock is not None:
                if self._standby and time.monotonic() >= self._primary_check_at \
                        and self._return_to_primary(time.monotonic()):
                    stall_at = time.monotonic() + self.stall_s
                if self._drain():  # feed the decoders with whatever already arrived
                    stall_at = time.monotonic() + self.stall_s
                if self._pending:
                    return self._hand_out(self._pending.popleft())
                if self._sock is None:  # the constructor refused us: relocate
                    break
                now = time.monotonic()
                if now >= deadline:
                    self._fail(f"no batch for step {self._step} micro {self._micro} within {self.deadline_s}s")
                if now >= stall_at:
                    self._last_error = f"endpoint {self._endpoint} silent for {self.stall_s}s"
                    log.warning("constructor at %s silent for %.1fs; relocating", self._endpoint, self.stall_s)
                    self.stats["relocations"] += 1
                    self._avoid = [self._endpoint]  # ask the daemons for another replica if there is one
                    self._drop_stream()
                    break
                self._sock.poll(max(1, int((min(stall_at, deadline) - now) * 1000) + 1), zmq.POLLIN)

    def _drain(self) -> bool:
        """Receive messages already queued, without blocking, until ``_ahead`` batches are pending."""
        got = False
        while (sock := self._sock) is not None and len(self._pending) < self._ahead:
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # nothing queued (cheaper than zmq.Again)
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            got = True
            self._on_message(frames)
        return got

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        msg = _fast_batch_header(frames[0].bytes) if len(frames) == 2 else None
        if msg is not None:  # the hot path: one batch, its header parsed once
            self._on_batch(msg, frames[1:])
            return
        try:
            msg, payload = protocol.decode(frames)
        except ProtocolError as e:
            self.stats["malformed"] += 1
            self._last_error = f"malformed message from {self._endpoint}: {e}"
            return
        if isinstance(msg, protocol.Batch):
            self._on_batch(msg, payload)
        elif isinstance(msg, protocol.Heartbeat):
            self.stats["heartbeats"] += 1
        elif isinstance(msg, protocol.ErrorReply):
            self._last_error = f"constructor {self._endpoint} refused: {msg.code}: {msg.reason}"
            if msg.code not in _RETRY_CODES:
                raise RemoteError(msg.code, msg.reason)
            log.warning("%s; relocating", self._last_error)
            self.stats["relocations"] += 1
            self._avoid = [self._endpoint]  # it is stopping or serves someone else: prefer another
            self._drop_stream()
            self._retry_at = time.monotonic() + self._refusal_backoff
            self._refusal_backoff = min(self._refusal_backoff * 2, _BACKOFF_MAX_S)
        else:
            self.stats["malformed"] += 1
            self._last_error = f"unexpected {msg.TYPE!r} from constructor {self._endpoint}"

    def _on_batch(self, header: protocol.Batch, payload: list[Any]) -> None:
        """Accept the batch at the receive cursor: start decoding it; drop (and count) any other."""
        if (header.job, header.dp_rank, header.step, header.micro_batch) != (
            self.job,
            self.dp_rank,
            self._rx_step,
            self._rx_micro,
        ):
            self.stats["stale_dropped"] += 1
            self._send_credit()  # the constructor counted it against our credits
            return
        if len(payload) != 1 or header.num_micro_batches < 1 or header.micro_batch >= header.num_micro_batches:
            self.stats["malformed"] += 1
            self._last_error = f"bad batch message step {header.step} micro {header.micro_batch}"
            self._send_credit()
            return
        if header.micro_batch + 1 < header.num_micro_batches:
            self._rx_micro += 1
        else:
            self._rx_step, self._rx_micro = self._rx_step + 1, 0
        frame = payload[0]
        if self._workers > 0:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fabric-decode")
            work: Future | None = self._pool.submit(self._decode, header, frame)
        else:
            work = None
        self._pending.append((header, frame, work))

    def _decode(self, header: protocol.Batch, frame: Any) -> dict[str, Any]:
        """Decode (and verify) one batch; runs on a decoder thread (numpy/arrow/hashlib drop the GIL)."""
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        try:
            if self.verify:  # decoded and digested in one pass over the columns: == checksum(arrays)
                arrays, got = decode_verified(buf)
            else:
                arrays = decode_batch(buf)
        except ProtocolError as e:
            raise BatchIntegrityError(
                f"undecodable batch for job {self.job!r} step {header.step} dp_rank {self.dp_rank} "
                f"micro {header.micro_batch}: {e}"
            ) from e
        if self.verify:
            if got != header.checksum:
                raise BatchIntegrityError(
                    f"batch of job {self.job!r} step {header.step} dp_rank {self.dp_rank} micro "
                    f"{header.micro_batch}: checksum {got} != sent {header.checksum}"
                )
        return arrays

    def _hand_out(self, item: tuple[protocol.Batch, Any, Future | None]) -> FabricBatch:
        header, frame, work = item
        self._avoid = []
        arrays = self._decode(header, frame) if work is None else work.result()
        if header.micro_batch + 1 < header.num_micro_batches:
            self._micro += 1
        else:
            self._step, self._micro = self._step + 1, 0
        self._refusal_backoff = _BACKOFF_FIRST_S
        self.stats["batches"] += 1
        self.stats["bytes"] += sum(a.nbytes for a in arrays.values())
        self.stats["wire_bytes"] += len(frame)
        self._send_credit()
        if self.torch:
            arrays = _to_torch(arrays)
        return FabricBatch(arrays, header)

    def _send_credit(self) -> None:
        """Give the constructor back the credit of one batch taken out of its window."""
        if self._sock is None:
            return
        try:
            self._sock.send(self._credit_frame, zmq.NOBLOCK)  # Credit(job, dp, mp, 1), encoded once
        except zmq.ZMQError as e:  # queue to a dead peer full: the stall timer will relocate us
            self._last_error = f"credit to {self._endpoint} failed: {e}"

    # ------------------------------------------------------------------------------ locating

    def _return_to_primary(self, now: float) -> bool:
        """Ask one daemon (briefly) whether the primary constructor is up; if so, resubscribe there
        from the cursor. Batches received from the standby but not handed out are dropped (the
        primary sends them again: same content). True when the loader moved."""
        self._primary_check_at = now + self.primary_check_s
        address = self._address or self.addresses[0]
        try:
            located = self._ask(address, now + _PROBE_TIMEOUT_S, record=False)
        except RemoteError:
            return False  # a refusal here is for the normal path to meet, not the probe
        if located is None or located.standby or located.endpoint == self._endpoint:
            return False
        log.info("job %r dp %d mp %d: primary constructor up at %s; leaving standby %s",
                 self.job, self.dp_rank, self.mp_rank, located.endpoint, self._endpoint)
        self.stats["primary_returns"] += 1
        self._drop_stream()
        self._subscribe(located)
        return self._sock is not None

    def _connect(self, deadline: float) -> None:
        self._subscribe(self._locate(deadline))

    def _subscribe(self, located: protocol.Located) -> None:
        if self._fingerprint is not None and located.fingerprint != self._fingerprint:
            log.warning("job %r fingerprint changed %s → %s", self.job, self._fingerprint, located.fingerprint)
        self._fingerprint = located.fingerprint
        self._endpoint = located.endpoint
        if self.prefetch is not None:
            self._credits = self.prefetch
        else:
            self._credits = located.prefetch if located.prefetch >= 1 else _DEFAULT_PREFETCH
        sock = self._new_socket(located.endpoint)
        self._rx_step, self._rx_micro = self._step, self._micro
        sub = protocol.Subscribe(
            self.job, located.fingerprint, self.dp_rank, self.mp_rank, self._step, self._micro, self._credits
        )
        try:
            sock.send_multipart(protocol.encode(sub), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._last_error = f"subscribe to {located.endpoint} failed: {e}"
            return
        self._sock = sock
        self._standby = located.standby
        self._primary_check_at = time.monotonic() + self.primary_check_s
        self.stats["endpoint"] = located.endpoint
        log.info("job %r dp %d mp %d subscribed at %s from step %d micro %d",
                 self.job, self.dp_rank, self.mp_rank, located.endpoint, self._step, self._micro)

    def _locate(self, deadline: float) -> protocol.Located:
        backoff = _BACKOFF_FIRST_S
        while True:
            for address in self.addresses:
                if time.monotonic() >= deadline:
                    self._fail("could not locate the constructor")
                located = self._ask(address, deadline)
                if located is not None:
                    self._address = address
                    return located
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail("could not locate the constructor")
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _ask(self, address: str, deadline: float, record: bool = True) -> protocol.Located | None:
        """Hello + Locate at one daemon; None (with ``_last_error`` set) when worth retrying.
        ``record=False``: a probe, which neither counts nor leaves its error behind."""
        self.stats["locates"] += record
        last_error = self._last_error
        sock = self._new_socket(address)
        try:
            welcome = self._request(sock, address, protocol.Hello(PROTOCOL_VERSION, "trainer"), deadline)
            if not isinstance(welcome, protocol.Welcome):
                return None
            locate = protocol.Locate(self.job, self.dp_rank, self.dp_size, self.mp_rank, avoid=list(self._avoid),
                                     host=self.host)
            located = self._request(sock, address, locate, deadline)
            if not isinstance(located, protocol.Located):
                return None
            if located.job != self.job or located.dp_size != self.dp_size or not 0 <= self.mp_rank < located.mp_size:
                raise RemoteError(
                    ErrorCode.BAD_REQUEST,
                    f"daemon {address} located job {located.job!r} with dp_size {located.dp_size} and mp_size "
                    f"{located.mp_size}; this loader is job {self.job!r} dp_rank {self.dp_rank}/{self.dp_size} "
                    f"mp_rank {self.mp_rank}",
                )
            return located
        finally:
            sock.close(linger=0)
            if not record:
                self._last_error = last_error

    def _request(
        self, sock: zmq.Socket, address: str, msg: protocol.Message, deadline: float
    ) -> protocol.Message | None:
        """One request with a timeout (lazy pirate: the caller discards the socket on None)."""
        try:
            sock.send_multipart(protocol.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._last_error = f"{address}: send {msg.TYPE} failed: {e}"
            return None
        timeout = max(0.0, min(self.stall_s, deadline - time.monotonic()))
        if not sock.poll(int(timeout * 1000) + 1, zmq.POLLIN):
            self._last_error = f"{address}: no reply to {msg.TYPE} within {timeout:.1f}s"
            return None
        try:
            reply, _ = protocol.decode(sock.recv_multipart())
        except ProtocolError as e:
            self._last_error = f"{address}: bad reply to {msg.TYPE}: {e}"
            if e.code == ErrorCode.VERSION:
                raise RemoteError(e.code, f"daemon {address} speaks another protocol: {e.reason}") from e
            return None
        if isinstance(reply, protocol.ErrorReply):
            self._last_error = f"{address}: {msg.TYPE} refused: {reply.code}: {reply.reason}"
            if reply.code in _RETRY_CODES:
                return None
            raise RemoteError(reply.code, f"daemon {address} refused {msg.TYPE}: {reply.reason}")
        return reply

    def _new_socket(self, endpoint: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise FabricUnavailable(f"cannot connect to {endpoint!r}: {e}") from e
        return sock

    def _drop_stream(self) -> None:
        """Forget the subscription: tell the constructor (best effort), close the socket, and
        discard batches not yet handed out."""
        if self._sock is not None:
            try:
                self._sock.send(self._unsubscribe_frame, zmq.NOBLOCK)
                linger = _UNSUBSCRIBE_LINGER_MS
            except zmq.ZMQError:  # nobody to tell
                linger = 0
            self._sock.close(linger=linger)
            self._sock = None
        for _, _, work in self._pending:
            if work is not None:
                work.cancel()
        self._pending.clear()

    def _fail(self, what: str) -> None:
        self._drop_stream()
        raise FabricUnavailable(
            f"job {self.job!r} dp_rank {self.dp_rank} mp_rank {self.mp_rank}: {what}; daemons tried: "
            f"{', '.join(self.addresses)}; constructor endpoint: {self._endpoint or 'never located'}; "
            f"last error: {self._last_error}"
        )

    # ------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Tell the constructor, close every socket and the loader's own context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop_stream()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown: nothing left to report to
            pass


def _fast_batch_header(raw: bytes) -> protocol.Batch | None:
    """The header of a well-formed ``Batch`` message; None for anything else (which goes the
    general way, raising the precise errors)."""
    try:
        msg, _ = protocol.decode([raw])
    except ProtocolError:
        return None
    return msg if isinstance(msg, protocol.Batch) else None


def _default_workers() -> int:
    """Decoder threads only where cores are left beyond the transport's (zmq I/O + this thread)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(_MAX_DEFAULT_WORKERS, cpus - 2))


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "fabric_client.Loader(torch=True) needs PyTorch; install torch or use torch=False for numpy arrays"
        ) from e
    return torch


def _to_torch(arrays: dict[str, Any]) -> dict[str, Any]:
    torch = _import_torch()
    with warnings.catch_warnings():
        # Received frames are read-only buffers owned by this batch alone; writing is harmless.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(arr) for name, arr in arrays.items()}
