"""The trainer-side ``Loader``: iterate over this rank's batches, resumable from a few bytes.

Usage::

    loader = Loader("tcp://node-a:7700", job="vlm-pretrain", dp_rank=r, dp_size=n)
    loader.load_state_dict(ckpt.get("data", {}))
    for batch in loader:            # FabricBatch: dict of numpy arrays (or torch tensors)
        ...
        ckpt["data"] = loader.state_dict()

How it works: the loader asks a daemon (``Hello`` → ``Locate``) which constructor serves its
rank, subscribes there from its cursor with ``prefetch`` credits, and gives back the credit of
every batch it hands out (in chunks of a quarter of the window while batches keep arriving, and
all that are due before it waits for one). It relocates by itself (asks the daemons again,
resubscribes from the cursor on a fresh socket) when the constructor falls silent for
``stall_s`` or refuses it. Every decision is :class:`~fabric_client.session.TrainerSession`'s
(no I/O, tested with a fake clock); this module is the socket loop around it.

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
- ``verify=True``: each batch's content is checked against the checksum it was sent with. A
  batch that fails (or cannot be decoded) is fetched once more from the cursor on a fresh
  subscription (another replica if the daemons know one); if it fails again,
  :class:`BatchIntegrityError` is raised when that batch's turn comes.
- Nothing a daemon or constructor sends crashes or spins the loader: replies of the wrong type,
  unusable endpoints, refusals, garbage, batches of another job or rank are counted in
  :attr:`Loader.stats` and answered by asking another daemon or relocating, with backoff.
  :class:`RemoteError` is raised only for a daemon's refusal that retrying cannot fix (protocol
  version, bad request, invalid job spec).
- Received batches (at most ``prefetch``, bounded by credits) are decoded and verified ahead, on
  ``decode_workers`` threads, while the trainer works on the previous one.
"""

from __future__ import annotations

import math
import os
import socket
import stat
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from . import protocol
from .batch import decode_batch, decode_verified
from .errors import BatchIntegrityError, FabricUnavailable, ProtocolError
from .limits import MAX_STEP
from .machine import machine_id
from .session import (
    MAX_PREFETCH,
    Action,
    AskDaemon,
    CloseStream,
    Decode,
    Fail,
    HandOut,
    HangUp,
    OpenStream,
    Received,
    ReturnCredit,
    TrainerSession,
)
from .keys import ClientKeys, client_keys_from_env
from .sockets import SocketFactory

__all__ = ["Loader", "FabricBatch", "HOST_ENV", "STATE_JOB", "STATE_NEXT_STEP", "STATE_NEXT_MICRO"]

#: Environment variable naming the trainer's host when its hostname is not how daemons know it.
HOST_ENV = "FABRIC_TRAINER_HOST"
#: Environment variable naming this trainer's CurveZMQ key file (``keys/trainers/NAME.key_secret``),
#: used when ``Loader(keys=...)`` is not given.
KEY_ENV = "FABRIC_KEY"

#: Keys of :meth:`Loader.state_dict`.
STATE_JOB = "job"
STATE_NEXT_STEP = "next_step"
STATE_NEXT_MICRO = "next_micro"

_UNSUBSCRIBE_LINGER_MS = 100  # how long a closed stream socket may keep trying to deliver its Unsubscribe
_MAX_WAIT_S = 1.0  # longest single wait of the socket loop (the session says when to wake up)
_MAX_DEFAULT_WORKERS = 4
_CREDIT_CHUNKS = 4  # a busy stream returns its window's credits in this many messages


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
    """Iterates over the batches of one trainer rank of a fabricd job (see the module docstring).

    The decisions are :class:`~fabric_client.session.TrainerSession`'s; this class is its socket
    loop: it feeds the session the time and what the daemons and the constructor sent, and
    performs the actions the session returns.
    """

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
        keys: ClientKeys | str | os.PathLike | None = None,
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
        if prefetch is not None and not 1 <= prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch = {prefetch!r}: must be in [1, {MAX_PREFETCH}] (or None for the job's default)")
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
        #: CurveZMQ: this trainer's key pair and the fabric's server key (None: plaintext)
        self.keys = ClientKeys.load(keys) if isinstance(keys, (str, os.PathLike)) else (
            keys if keys is not None else client_keys_from_env(KEY_ENV))
        self._sockets = SocketFactory(self._ctx, keys=self.keys)
        self._clock = time.monotonic
        self._workers = decode_workers if decode_workers is not None else _default_workers()
        self._pool: ThreadPoolExecutor | None = None
        self._session = TrainerSession(
            addresses, job=job, dp_rank=self.dp_rank, dp_size=self.dp_size, mp_rank=self.mp_rank, host=self.host,
            machine=machine_id(), prefetch=prefetch, deadline_s=self.deadline_s, stall_s=self.stall_s,
            primary_check_s=self.primary_check_s,
            ahead=max(1, self._workers),  # batches received and being decoded before hand-out
        )
        #: Counters (batches, bytes, relocations, drops by kind, ...) and the current endpoint.
        self.stats: dict[str, Any] = self._session.stats
        self._stream: zmq.Socket | None = None  # the subscription's socket, to the constructor
        self._daemon: zmq.Socket | None = None  # the open Hello/Locate conversation, if any
        self._closed = False
        self._credits_due = 0  # credits of batches handed out, not yet sent back
        self._credit_chunk = 1  # send them back in chunks of this many (see _return_credit)
        (self._unsubscribe_frame,) = protocol.encode(
            protocol.Unsubscribe(job=self.job, dp_rank=self.dp_rank, mp_rank=self.mp_rank))

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The position to resume from: ``{"job", "next_step", "next_micro"}``."""
        return {STATE_JOB: self.job, STATE_NEXT_STEP: self._session.next_step,
                STATE_NEXT_MICRO: self._session.next_micro}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at ``state`` (from :meth:`state_dict`); an empty mapping means the start.

        Raises ``ValueError`` for another job's state or a malformed one (``next_step`` past
        ``MAX_STEP`` included).
        """
        if not state:
            step, micro = 0, 0
        else:
            if state.get(STATE_JOB) != self.job:
                raise ValueError(f"state of job {state.get(STATE_JOB)!r} given to the loader of job {self.job!r}")
            step, micro = state.get(STATE_NEXT_STEP), state.get(STATE_NEXT_MICRO, 0)
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_STEP for v in (step, micro)):
                raise ValueError(f"state {dict(state)!r}: next_step and next_micro must be ints in [0, {MAX_STEP}]")
        self._perform(self._session.seek(step, micro))  # a stream from the old cursor is dropped

    # ------------------------------------------------------------------------------ online mixing

    @property
    def source_names(self) -> tuple[str, ...]:
        """The job's source names by index, as a batch's ``source_ids`` count them (known once
        the loader has located its constructor, i.e. after the first batch)."""
        return self._session.source_names

    def report(self, loss_by_source: Mapping[int | str, float | tuple[float, int]], *,
               step: int | None = None) -> bool:
        """Report this rank's training loss per source, for a job with online mixing
        (``[mixture] online = "odm"``): the leader's policy raises the weight of sources whose
        loss stays high, as a logged plan change at a future step, so delivery stays exactly
        replayable.

        ``loss_by_source`` maps a source (its index, as in ``batch["source_ids"]``, or its name)
        to its mean loss, or to ``(loss_sum, count)`` over ``count`` samples or tokens. ``step``
        defaults to the last step handed out. Best effort and non-blocking: returns False (and
        counts ``stats["loss_reports_dropped"]``) when there is no stream to send it on.
        Raises ``ValueError`` for an unknown source name, a negative or non-finite loss, or a
        count below 1: a wrong report would steer the mixture, so it is refused, not skipped.
        """
        names = {name: i for i, name in enumerate(self._session.source_names)}
        rows = []
        for source, value in loss_by_source.items():
            if isinstance(source, str):
                if source not in names:
                    raise ValueError(f"source {source!r} is not a source of job {self.job!r}"
                                     + (f" (sources: {', '.join(names)})" if names else
                                        " (its sources are known after the first batch; report by index before that)"))
                index = names[source]
            elif isinstance(source, int) and not isinstance(source, bool) and source >= 0:
                index = int(source)
            else:
                raise ValueError(f"source {source!r}: need a source index (>= 0) or name")
            loss_sum, count = (value, 1) if not isinstance(value, tuple) else value
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"source {source!r}: count {count!r} must be an int >= 1")
            loss_sum = float(loss_sum)
            if not (math.isfinite(loss_sum) and loss_sum >= 0):
                raise ValueError(f"source {source!r}: loss {loss_sum!r} must be finite and >= 0")
            rows.append((index, loss_sum, count))
        if step is None:
            step = max(0, self._session.next_step - 1)
        msg = protocol.LossReport(job=self.job, step=int(step), losses=rows, dp_rank=self.dp_rank)
        stats = self._session.stats
        if self._stream is None or not rows:
            stats["loss_reports_dropped"] += bool(rows)
            return False
        try:
            self._stream.send_multipart(protocol.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            stats["loss_reports_dropped"] += 1
            return False
        stats["loss_reports"] += 1
        return True

    # ------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[FabricBatch]:
        while not self._closed and (self.max_steps is None or self._session.next_step < self.max_steps):
            yield self._next_batch()

    def _next_batch(self) -> FabricBatch:
        session = self._session
        session.want(self._clock())
        while True:
            if self._closed:
                raise FabricUnavailable("the loader was closed")
            self._drain()  # feed the decoders with whatever already arrived
            actions = session.tick(self._clock())
            if actions:
                batch = self._perform(actions)
                if batch is not None:
                    return batch
                continue
            wait = min(session.wake_at - self._clock(), _MAX_WAIT_S)
            if wait <= 0:
                continue
            self._flush_credits()  # never wait while the constructor could be short of credits
            if self._stream is not None:
                self._stream.poll(int(wait * 1000) + 1, zmq.POLLIN)
            else:
                time.sleep(wait)

    def _drain(self) -> None:
        """Receive messages already queued, without blocking, while the session takes them."""
        session = self._session
        while (sock := self._stream) is not None and session.receiving:
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # nothing queued (cheaper than zmq.Again)
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            now = self._clock()
            try:  # one pass: the header is parsed and validated together (msgspec)
                msg, payload = protocol.decode(frames)
            except ProtocolError as e:
                actions = session.on_stream_garbled(e, now)
            else:
                actions = session.on_stream_message(msg, payload, now)
            if actions:
                self._perform(actions)

    # ------------------------------------------------------------------------------ actions

    def _perform(self, actions: list[Action]) -> FabricBatch | None:
        """Carry out ``actions`` in order (and those the session returns on their outcomes);
        returns the batch of a :class:`HandOut`, if one was handed out."""
        session = self._session
        queue = deque(actions)
        batch: FabricBatch | None = None
        while queue:
            action = queue.popleft()
            kind = type(action)
            if kind is ReturnCredit:
                self._return_credit()
            elif kind is Decode:
                self._start_decode(action.received)
            elif kind is HandOut:
                received = action.received
                try:
                    arrays = self._decode(received.header, received.frame) if received.work is None \
                        else received.work.result()
                except BatchIntegrityError as e:
                    queue.extend(session.on_corrupt(received, e, self._clock()))
                    continue
                queue.extend(session.on_handed_out(received, sum(a.nbytes for a in arrays.values()), self._clock()))
                batch = FabricBatch(_to_torch(arrays) if self.torch else arrays, received.header)
            elif kind is AskDaemon:
                queue.extend(self._ask(action))
            elif kind is HangUp:
                self._hang_up()
            elif kind is OpenStream:
                queue.extend(self._open_stream(action))
            elif kind is CloseStream:
                self._close_stream(action.discarded)
            elif kind is Fail:
                self._hang_up()
                raise action.error
            else:  # pragma: no cover — a session action this loop does not know is a bug here
                raise TypeError(f"unknown session action {action!r}")
        return batch

    def _start_decode(self, received: Received) -> None:
        if self._workers > 0:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fabric-decode")
            received.work = self._pool.submit(self._decode, received.header, received.frame)

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

    def _return_credit(self) -> None:
        """Give the constructor back the credit of one batch taken out of its window.

        Credits go back in chunks of ``_credit_chunk`` (a quarter of the window) while batches
        keep arriving, and all at once before the loader waits for one: a trainer that has to
        wait never leaves credits unreturned, and a busy stream costs one Credit message (and
        one wake-up of the constructor) per chunk instead of per batch.
        """
        self._credits_due += 1
        if self._credits_due >= self._credit_chunk:
            self._flush_credits()

    def _flush_credits(self) -> None:
        due, self._credits_due = self._credits_due, 0
        if not due or self._stream is None:
            return
        # a frame per chunk: it carries the data wait since the last one (a few µs to encode)
        (frame,) = protocol.encode(protocol.Credit(job=self.job, dp_rank=self.dp_rank, mp_rank=self.mp_rank,
                                                   credits=due, wait_s=min(self._session.take_wait(), 1e12)))
        try:
            self._stream.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError as e:  # queue to a dead peer full: the stall timer will relocate us
            self._session.last_error = f"credit to {self._session.endpoint} failed: {e}"

    def _ask(self, ask: AskDaemon) -> list[Action]:
        """One request to a daemon with a timeout (lazy pirate: the session hangs up on silence)."""
        session = self._session
        if ask.new_connection or self._daemon is None:
            self._hang_up()
            self._daemon = self._new_socket(ask.address)
        sock = self._daemon
        try:
            sock.send_multipart(protocol.encode(ask.request), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            return session.on_daemon_silent(self._clock(), reason=str(e))
        timeout = max(0.0, ask.reply_by - self._clock())
        if not sock.poll(int(timeout * 1000) + 1, zmq.POLLIN):
            return session.on_daemon_silent(self._clock())
        try:
            reply, _ = protocol.decode(sock.recv_multipart())
        except ProtocolError as e:
            return session.on_daemon_garbled(e, self._clock())
        return session.on_daemon_reply(reply, self._clock())

    def _hang_up(self) -> None:
        if self._daemon is not None:
            self._daemon.close(linger=0)
            self._daemon = None

    def _open_stream(self, action: OpenStream) -> list[Action]:
        self._close_stream(())
        local = _usable_unix_socket(action.local)
        sock = self._sockets.dealer(local=bool(local))  # a constructor on this host, under this user
        try:
            sock.connect(local or action.endpoint)
            sock.send_multipart(protocol.encode(action.subscribe), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            return self._session.on_stream_failed(str(e), self._clock())
        self._stream = sock
        self.stats["stream_endpoint"] = local or action.endpoint
        self._credit_chunk = max(1, action.subscribe.credits // _CREDIT_CHUNKS)
        return []

    def _close_stream(self, discarded: Sequence[Received]) -> None:
        """Forget the subscription: tell the constructor (best effort), close the socket, and
        cancel the decoding of batches not handed out."""
        if self._stream is not None:
            try:
                self._stream.send(self._unsubscribe_frame, zmq.NOBLOCK)
                linger = _UNSUBSCRIBE_LINGER_MS
            except zmq.ZMQError:  # nobody to tell
                linger = 0
            self._stream.close(linger=linger)
            self._stream = None
        self._credits_due = 0  # a new subscription starts with a whole window
        for received in discarded:
            if received.work is not None:
                received.work.cancel()

    def _new_socket(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.dealer()
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise FabricUnavailable(f"cannot connect to {endpoint!r}: {e}") from e
        return sock

    # ------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Tell the constructor, close every socket and the loader's own context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for action in self._session.close():
            if isinstance(action, CloseStream):
                self._close_stream(action.discarded)
        self._close_stream(())
        self._hang_up()
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


def _usable_unix_socket(endpoint: str) -> str:
    """``endpoint`` (an ``ipc://`` one from ``Located.local_endpoint``) when this process can
    connect to it: the socket file exists here and this user may write to it, which takes
    entering its daemon's private directory (only the daemon's user can). Else "": the trainer
    runs on another host or as another user, and streams over TCP with CurveZMQ."""
    if not endpoint.startswith("ipc://"):
        return ""
    path = endpoint[len("ipc://"):]
    try:
        return endpoint if stat.S_ISSOCK(os.stat(path).st_mode) and os.access(path, os.W_OK) else ""
    except OSError:
        return ""


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
