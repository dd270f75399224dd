"""Trainer delivery: the server half of the credit protocol, run inside a data constructor.

The constructor process owns a ROUTER socket (with ``ROUTER_MANDATORY`` set) and its event
loop; it feeds every decoded trainer message to :meth:`TrainerDelivery.handle` and calls
:meth:`TrainerDelivery.pump` whenever credits or batches may have changed. Trainers speak:

- ``Subscribe(job, fingerprint, dp_rank, mp_rank, next_step, next_micro, credits)``: (re)start
  the stream of one trainer at a position with ``credits`` batches of room. It replaces any
  earlier subscription of the same ``(dp_rank, mp_rank)`` (a restarted trainer, or one that
  reconnected on a new socket).
- ``Credit(job, dp_rank, mp_rank, credits, wait_s)``: the trainer consumed batches; it has room
  for more. ``wait_s`` (the trainer's data wait since its previous credit) is summed per trainer
  for the daemon's metrics (``stats()["delivered"]``).
- ``Unsubscribe(job, dp_rank, mp_rank)``: the trainer left (moved to another replica, or is
  done); its subscription is dropped if it is still the one from that trainer socket.

Promises:

- Batches reach each subscription in strict ``(step, micro)`` order, never more than its credits
  ahead of what the trainer acknowledged (every queue is bounded by the credits).
- One encoded frame is sent, without copying, to every model-parallel rank that needs it.
  Under ``remote_compression`` (the job's ``compression = "auto"``) batches are built
  uncompressed; a trainer whose ``Subscribe.machine`` is another machine gets them re-encoded under
  that compression, once per batch, and the content (and its checksum) is the same either way.
- A vanished trainer (``EHOSTUNREACH``) drops its subscription and is counted, never a crash;
  a full peer queue (``EAGAIN``) keeps the batch for the next :meth:`pump`.
- While a subscription has credits but nothing was sent for ``heartbeat_s`` (:data:`HEARTBEAT_S`,
  a quarter second), it gets a ``Heartbeat`` so the trainer knows the constructor is alive. It is
  a fraction of the shortest sensible trainer ``stall_s`` (1 s), so a step that takes a while to
  build is never mistaken for a dead constructor.
- Nothing here blocks: every send is non-blocking.

The owner's loop, in outline (the constructor keeps built batches until ``demand()`` passes them)::

    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    delivery = TrainerDelivery(sock, job=..., fingerprint=..., ranks=my_ranks, mp_size=...)
    while running:
        if sock.poll(timeout_ms):
            identity, *frames = sock.recv_multipart(copy=False)
            try:
                msg, _ = protocol.decode(frames)
            except ProtocolError:
                malformed += 1          # dropped and counted; keep serving
                continue
            delivery.handle(identity.bytes, msg)
        delivery.pump(built.get_batch)  # (dp_rank, step, micro) -> EncodedBatch | None
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from fabric_client import protocol
from fabric_client.batch import recompress
from fabric_client.machine import machine_id
from fabric_client.protocol import ErrorCode

from ..failpoints import failpoint

__all__ = ["TrainerSockets", "EncodedBatch", "TrainerDelivery", "MAX_CREDITS", "HEARTBEAT_S"]

#: Heartbeat interval of an idle subscription with credits (seconds): well under a trainer's stall_s.
HEARTBEAT_S = 0.25

log = logging.getLogger(__name__)

#: Most credits one subscription may hold, whatever the trainer asks for.
MAX_CREDITS = 1024

#: Outcomes of ``TrainerDelivery._send`` (compared by identity in the hot loop).
_OK, _AGAIN, _GONE = "ok", "again", "gone"


@dataclass(frozen=True)
class EncodedBatch:
    """One micro-batch for one DP rank, serialized once, ready to send to each of its trainers."""

    header: protocol.Batch
    frame: Any  # the Arrow IPC buffer (pa.Buffer / bytes / memoryview); sent with copy=False
    header_frame: bytes = field(init=False, repr=False, compare=False)
    #: compression → the frame re-encoded under it (see :meth:`frame_for`)
    _compressed: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        (head,) = protocol.encode(self.header)
        object.__setattr__(self, "header_frame", head)
        object.__setattr__(self, "_compressed", {})

    def frame_for(self, compression: str | None) -> Any:
        """The payload under ``compression`` (None: the frame as built, uncompressed under
        ``compression = "auto"``): made once, on the first send to a trainer that needs it, and
        kept with the batch for the other model-parallel ranks."""
        if compression is None:
            return self.frame
        made = self._compressed.get(compression)
        if made is None:
            made = self._compressed[compression] = recompress(self.frame, compression=compression)
        return made


def _size(frame: Any) -> int:
    size = getattr(frame, "size", None)
    return int(size) if size is not None else len(memoryview(frame).cast("B"))


@dataclass
class _Subscription:
    identity: bytes
    dp_rank: int
    mp_rank: int
    step: int
    micro: int
    credits: int
    last_sent: float
    pending: EncodedBatch | None = None
    sent: int = 0
    compression: str | None = None  # what frames to this trainer are re-encoded with (None: as built)


class TrainerSockets:
    """A constructor's trainer ROUTERs as the one socket :class:`TrainerDelivery` sends on: the
    CurveZMQ one on TCP and, where the job lets same-node trainers in over the daemon's private
    Unix socket (fabricd.local_ipc), a plaintext one there. A trainer's identity is its ROUTER
    identity after one byte naming the socket it came in on, so replies go back that way."""

    def __init__(self, sockets: Sequence[zmq.Socket]) -> None:
        if not 1 <= len(sockets) <= 255:
            raise ValueError(f"{len(sockets)} trainer sockets: expected 1 to 255")
        self.sockets = tuple(sockets)

    def identity(self, sock: zmq.Socket, routing_id: bytes) -> bytes:
        """The identity of a trainer whose message came in on ``sock`` with ``routing_id``."""
        return bytes((self.sockets.index(sock),)) + routing_id

    def send_multipart(self, frames: Sequence[Any], flags: int = 0, copy: bool = True) -> None:
        """Send ``[identity, *rest]`` on the socket the identity came in on. Raises like a ROUTER
        with ``ROUTER_MANDATORY`` (EHOSTUNREACH for a departed trainer), ``zmq.Again`` when full."""
        identity = bytes(frames[0])
        if not identity or identity[0] >= len(self.sockets):
            raise zmq.ZMQError(zmq.EHOSTUNREACH, f"no trainer socket for identity {identity[:8]!r}")
        self.sockets[identity[0]].send_multipart([identity[1:], *frames[1:]], flags, copy=copy)

    def close(self, linger: int) -> None:
        for sock in self.sockets:
            sock.close(linger=linger)


class TrainerDelivery:
    """Credit-based delivery of encoded batches to the trainers of a group of DP ranks."""

    def __init__(
        self,
        socket: zmq.Socket | TrainerSockets,
        *,
        job: str,
        fingerprint: str,
        ranks: Sequence[int],
        mp_size: int,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.monotonic,
        remote_compression: str | None = None,
    ) -> None:
        if mp_size < 1:
            raise ValueError(f"mp_size = {mp_size!r}: must be at least 1")
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s = {heartbeat_s!r}: must be positive")
        self._socket = socket
        self._job = job
        self._fingerprint = fingerprint
        self._ranks = frozenset(int(r) for r in ranks)
        self._mp_size = int(mp_size)
        self._heartbeat_s = float(heartbeat_s)
        self._clock = clock
        # batches are built uncompressed and re-encoded under this for a trainer on another
        # machine (``compression = "auto"``); None: every trainer gets the frame as built
        self._remote_compression = remote_compression
        self._subs: dict[tuple[int, int], _Subscription] = {}
        # where trainers that left were (dp, mp) → next step: progress to report after they are
        # gone (bounded by the ranks this constructor serves)
        self._departed: dict[tuple[int, int], int] = {}
        # (dp, mp) → [batches sent, data-wait seconds reported], since this process started
        # (bounded by the trainers of the ranks served): the daemon turns them into counters
        self._delivered: dict[tuple[int, int], list] = {}
        self._counters = {
            "subscribes": 0,
            "unsubscribes": 0,
            "credits_received": 0,
            "batches_sent": 0,
            "bytes_sent": 0,
            "tokens_sent": 0,
            "heartbeats_sent": 0,
            "unreachable_dropped": 0,
            "eagain": 0,
            "errors_replied": 0,
            "loss_reports": 0,
        }
        # trainers' loss reports merged until the constructor passes them on (online mixing)
        self._losses: dict[int, list] = {}  # source index → [loss sum, count]
        self._loss_step = 0
        self._loss_reports = 0

    # ---------------------------------------------------------------------------------- input

    def handle(self, identity: bytes, msg: protocol.Message) -> None:
        """Apply one decoded message from trainer ``identity``; refusals are answered ``ErrorReply``."""
        if isinstance(msg, protocol.Subscribe):
            self._subscribe(identity, msg)
        elif isinstance(msg, protocol.Credit):
            self._credit(identity, msg)
        elif isinstance(msg, protocol.Unsubscribe):
            self._unsubscribe(identity, msg)
        elif isinstance(msg, protocol.LossReport):
            self._loss_report(identity, msg)
        else:
            self._refuse(identity, ErrorCode.BAD_REQUEST, f"a constructor does not serve {msg.TYPE!r}")

    def _check_target(self, identity: bytes, job: str, dp_rank: int, mp_rank: int) -> bool:
        if job != self._job:
            self._refuse(identity, ErrorCode.UNKNOWN_JOB, f"this constructor serves job {self._job!r}, not {job!r}")
            return False
        if dp_rank not in self._ranks:
            self._refuse(identity, ErrorCode.STALE, f"this constructor does not serve dp_rank {dp_rank}")
            return False
        if not 0 <= mp_rank < self._mp_size:
            self._refuse(identity, ErrorCode.BAD_REQUEST, f"mp_rank {mp_rank} outside 0..{self._mp_size - 1}")
            return False
        return True

    def _subscribe(self, identity: bytes, msg: protocol.Subscribe) -> None:
        if not self._check_target(identity, msg.job, msg.dp_rank, msg.mp_rank):
            return
        if msg.fingerprint != self._fingerprint:
            self._refuse(
                identity,
                ErrorCode.STALE,
                f"job {self._job!r} has fingerprint {self._fingerprint}, the trainer located {msg.fingerprint}",
            )
            return
        if msg.next_step < 0 or msg.next_micro < 0 or msg.credits < 0:
            self._refuse(identity, ErrorCode.BAD_REQUEST, f"negative position or credits in {msg}")
            return
        key = (msg.dp_rank, msg.mp_rank)
        old = self._subs.get(key)
        if old is not None:
            log.info("trainer dp %d mp %d resubscribed at step %d micro %d", *key, msg.next_step, msg.next_micro)
        self._subs[key] = _Subscription(
            identity=identity,
            dp_rank=msg.dp_rank,
            mp_rank=msg.mp_rank,
            step=msg.next_step,
            micro=msg.next_micro,
            credits=min(msg.credits, MAX_CREDITS),
            last_sent=self._clock(),
            compression=None if msg.machine and msg.machine == machine_id() else self._remote_compression,
        )
        self._counters["subscribes"] += 1

    def _credit(self, identity: bytes, msg: protocol.Credit) -> None:
        if not self._check_target(identity, msg.job, msg.dp_rank, msg.mp_rank):
            return
        sub = self._subs.get((msg.dp_rank, msg.mp_rank))
        if sub is None or sub.identity != identity:
            self._refuse(
                identity, ErrorCode.STALE, f"no subscription of dp {msg.dp_rank} mp {msg.mp_rank} here; subscribe again"
            )
            return
        if msg.credits < 0:
            self._refuse(identity, ErrorCode.BAD_REQUEST, f"negative credits {msg.credits}")
            return
        sub.credits = min(sub.credits + msg.credits, MAX_CREDITS)
        self._counters["credits_received"] += msg.credits
        if msg.wait_s:
            self._delivered.setdefault((msg.dp_rank, msg.mp_rank), [0, 0.0])[1] += msg.wait_s

    def _loss_report(self, identity: bytes, msg: protocol.LossReport) -> None:
        """Merge a subscribed trainer's losses into the report :meth:`take_losses` passes on
        (one per source index: bounded by the job's sources, whatever the trainers send)."""
        if not self._check_target(identity, msg.job, msg.dp_rank, 0):
            return
        if not any(sub.identity == identity for sub in self._subs.values()):
            self._refuse(identity, ErrorCode.STALE, "no subscription on this connection; subscribe first")
            return
        for source, loss_sum, count in msg.losses:
            merged = self._losses.setdefault(source, [0.0, 0])
            merged[0] += loss_sum
            merged[1] += count
        self._loss_step = max(self._loss_step, msg.step)
        self._loss_reports += 1
        self._counters["loss_reports"] += 1

    def take_losses(self) -> protocol.LossReport | None:
        """The trainers' losses merged since the last call, as one report (None if none came)."""
        if not self._loss_reports:
            return None
        report = protocol.LossReport(job=self._job, step=self._loss_step, reports=self._loss_reports,
                                     losses=[(src, total, n) for src, (total, n) in sorted(self._losses.items())])
        self._losses, self._loss_reports, self._loss_step = {}, 0, 0
        return report

    def _refuse(self, identity: bytes, code: str, reason: str) -> None:
        self._counters["errors_replied"] += 1
        log.debug("refusing trainer %r: %s: %s", identity, code, reason)
        try:
            self._socket.send_multipart([identity, *protocol.encode(protocol.ErrorReply(code, reason))], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise

    def _unsubscribe(self, identity: bytes, msg: protocol.Unsubscribe) -> None:
        sub = self._subs.get((msg.dp_rank, msg.mp_rank))
        if msg.job == self._job and sub is not None and sub.identity == identity:  # not a newer socket's
            self._leave(sub)
            self._counters["unsubscribes"] += 1

    def _leave(self, sub: _Subscription) -> None:
        key = (sub.dp_rank, sub.mp_rank)
        del self._subs[key]
        self._departed[key] = max(self._departed.get(key, 0), sub.step)

    def farewell(self, reason: str) -> None:
        """Tell every subscribed trainer to relocate now (the constructor is stopping), instead
        of letting it wait out its stall timeout. Best effort: a full or vanished peer is skipped."""
        for sub in list(self._subs.values()):
            self._refuse(sub.identity, ErrorCode.STALE, reason)
        self._subs.clear()

    # --------------------------------------------------------------------------------- output

    def demand(self) -> dict[int, tuple[int, int]]:
        """dp_rank → earliest ``(step, micro)`` any subscribed trainer of that rank still needs."""
        out: dict[int, tuple[int, int]] = {}
        for sub in self._subs.values():
            pos = (sub.step, sub.micro)
            if sub.dp_rank not in out or pos < out[sub.dp_rank]:
                out[sub.dp_rank] = pos
        return out

    def furthest(self, dp_rank: int) -> tuple[int, int] | None:
        """The furthest ``(step, micro)`` a trainer of ``dp_rank`` here is at (or left at): every
        batch of that rank before it was delivered to someone, by this constructor or another."""
        out = [(sub.step, sub.micro) for sub in self._subs.values() if sub.dp_rank == dp_rank]
        out += [(step, 0) for (dp, _), step in self._departed.items() if dp == dp_rank]
        return max(out, default=None)

    def needs(self, dp_rank: int, step: int, micro: int) -> bool:
        """Whether a trainer subscribed here still needs that batch of ``dp_rank``."""
        return any(sub.dp_rank == dp_rank and (sub.step, sub.micro) <= (step, micro) for sub in self._subs.values())

    def pump(self, lookup: Callable[[int, int, int], EncodedBatch | None]) -> int:
        """Send what credits allow; ``lookup(dp_rank, step, micro)`` gives a built batch or None.

        Returns the number of batches sent. Also sends due heartbeats.
        """
        sent = 0
        now = self._clock()
        counters = self._counters
        for key in list(self._subs):
            sub = self._subs.get(key)
            if sub is None:
                continue
            while sub.credits > 0:
                batch = sub.pending if sub.pending is not None else lookup(sub.dp_rank, sub.step, sub.micro)
                if batch is None:
                    break
                self._check_batch(sub, batch)
                frame = batch.frame_for(sub.compression)
                outcome = self._send(sub, [batch.header_frame, frame])
                if outcome is not _OK:
                    if outcome is _AGAIN:
                        sub.pending = batch
                    break
                failpoint("delivery.after_send")  # mid-batch: the rest of the step, or other MP ranks, unsent
                sub.pending = None
                sub.credits -= 1
                sub.sent += 1
                self._delivered.setdefault(key, [0, 0.0])[0] += 1
                sub.last_sent = now
                sent += 1
                counters["batches_sent"] += 1
                counters["bytes_sent"] += _size(frame)
                counters["tokens_sent"] += batch.header.tokens
                if sub.micro + 1 < batch.header.num_micro_batches:
                    sub.micro += 1
                else:
                    sub.step, sub.micro = sub.step + 1, 0
            if key in self._subs and sub.credits > 0 and now - sub.last_sent >= self._heartbeat_s:
                (head,) = protocol.encode(protocol.Heartbeat(self._job, sub.step))
                if self._send(sub, [head]) is _OK:
                    sub.last_sent = now
                    self._counters["heartbeats_sent"] += 1
        return sent

    def _check_batch(self, sub: _Subscription, batch: EncodedBatch) -> None:
        h = batch.header
        if (h.job, h.dp_rank, h.step, h.micro_batch) != (self._job, sub.dp_rank, sub.step, sub.micro):
            raise ValueError(
                f"lookup({sub.dp_rank}, {sub.step}, {sub.micro}) returned the batch of job {h.job!r} "
                f"dp {h.dp_rank} step {h.step} micro {h.micro_batch}"
            )
        if not 0 <= h.micro_batch < h.num_micro_batches:
            raise ValueError(f"batch header {h} has micro_batch outside num_micro_batches")

    def _send(self, sub: _Subscription, frames: list[Any]) -> str:
        """Send ``frames`` to ``sub``: "ok", "again" (peer queue full) or "gone" (dropped)."""
        try:
            self._socket.send_multipart([sub.identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            if e.errno == zmq.EAGAIN:
                self._counters["eagain"] += 1
                return _AGAIN
            if e.errno == zmq.EHOSTUNREACH:
                self._counters["unreachable_dropped"] += 1
                log.info("trainer dp %d mp %d is gone; subscription dropped", sub.dp_rank, sub.mp_rank)
                if self._subs.get((sub.dp_rank, sub.mp_rank)) is sub:
                    self._leave(sub)
                return _GONE
            raise
        return _OK

    # ---------------------------------------------------------------------------------- stats

    def stats(self) -> dict:
        """Counters; per subscription, its position, credits and batches sent; and the last
        position of trainers that left (``departed``: ``[dp_rank, mp_rank, next_step]``); and per
        trainer ever served, batches sent and data wait (``delivered``: ``[dp, mp, sent, wait_s]``).
        A subscription's ``data_wait_s`` is that trainer's wait so far: the seconds its loader
        spent between asking for a batch and having one, as its credits report them.
        """
        return {
            **self._counters,
            "departed": [[dp, mp, step] for (dp, mp), step in self._departed.items()],
            "delivered": [[dp, mp, sent, wait] for (dp, mp), (sent, wait) in self._delivered.items()],
            "subscriptions": [
                {
                    "dp_rank": s.dp_rank,
                    "mp_rank": s.mp_rank,
                    "next_step": s.step,
                    "next_micro": s.micro,
                    "credits": s.credits,
                    "sent": s.sent,
                    "data_wait_s": round(self._delivered.get((s.dp_rank, s.mp_rank), (0, 0.0))[1], 3),
                }
                for s in self._subs.values()
            ],
        }

