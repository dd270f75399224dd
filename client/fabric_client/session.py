"""A trainer rank's session with the fabric: every decision of the ``Loader``, without I/O.

:class:`TrainerSession` holds the cursor (the next ``(step, micro)`` to hand out), the receive
cursor and credit window of the current subscription, and decides whom to ask where the
rank's constructor is, where to subscribe, when a constructor has stalled, when to leave a
standby for the primary, which received batches to keep, and when to give up. It owns no
socket, starts no thread and reads no clock: its owner (the socket loop of
:class:`~fabric_client.loader.Loader`) feeds it the time and what happened, and performs the
actions it returns, in order. The constructor side of the conversation is
``fabricd.roles.delivery.TrainerDelivery``.

Inputs (each returns a list of actions):

- :meth:`want` — the trainer asks for the next batch; ``deadline_s`` and ``stall_s`` start.
- :meth:`tick` — act on the time: hand out, time out, probe, locate. Call it after feeding what
  arrived and whenever :attr:`wake_at` has passed.
- :meth:`on_daemon_reply` / :meth:`on_daemon_garbled` / :meth:`on_daemon_silent` — the outcome
  of the last :class:`AskDaemon`.
- :meth:`on_stream_message` / :meth:`on_stream_garbled` / :meth:`on_stream_failed` — what came
  from (or went wrong with) the constructor stream.
- :meth:`on_handed_out` / :meth:`on_corrupt` — the outcome of a :class:`HandOut`.
- :meth:`seek`, :meth:`close`.

Promises:

- Batches are handed out in strict ``(step, micro)`` order from the cursor; a batch of another
  job or rank, one off the receive cursor (duplicate, out of order) or a malformed one is
  dropped and counted, and its credit goes back if it took one.
- The constructor never holds more than the window's credits: a credit is returned only for a
  batch that consumed one (``outstanding`` never exceeds ``window``, and never exceeds
  :data:`MAX_PREFETCH`).
- Only an accepted batch or a heartbeat of this job is progress: anything else (garbage, stale
  or foreign batches) cannot keep a silent constructor from counting as stalled.
- Whatever a daemon or constructor sends — a reply of the wrong type, a garbage endpoint, a
  refusal — is counted and answered by asking another daemon or relocating, with backoff;
  the only errors raised for it are the documented ones: :class:`RemoteError` for a refused
  ``Hello``/``Locate`` that retrying cannot fix, :class:`BatchIntegrityError` for a batch that
  fails its checksum twice in a row, and :class:`FabricUnavailable` once ``deadline_s`` passes
  without a batch.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import protocol
from .errors import BatchIntegrityError, FabricError, FabricUnavailable, ProtocolError, RemoteError
from .protocol import PROTOCOL_VERSION, ErrorCode
from .session_actions import (
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
)

__all__ = [
    "TrainerSession",
    "Received",
    "Action",
    "AskDaemon",
    "HangUp",
    "OpenStream",
    "ReturnCredit",
    "CloseStream",
    "Decode",
    "HandOut",
    "Fail",
    "MAX_PREFETCH",
    "DEFAULT_PREFETCH",
    "PROBE_TIMEOUT_S",
]

log = logging.getLogger(__name__)

#: Most credits one subscription holds, whatever the job or the daemon says (the constructor's
#: ``fabricd.roles.delivery.MAX_CREDITS`` caps it there too).
MAX_PREFETCH = 1024
#: The window when neither the caller nor the daemon names a usable one.
DEFAULT_PREFETCH = 4
#: How long a check for the primary constructor may hold up the trainer.
PROBE_TIMEOUT_S = 0.25
#: ErrorReply codes that mean "ask again later" (while locating).
RETRY_CODES = frozenset({ErrorCode.NOT_READY, ErrorCode.UNKNOWN_JOB, ErrorCode.STALE})
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
#: Most endpoints a Locate asks the daemon to avoid (the most recent ones).
MAX_AVOID = 8
_MAX_ENDPOINT_CHARS = 1024
_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s\[\]/:;]+):([0-9]{1,5})|(ipc|inproc)://\S+")


_RETURN_CREDIT = ReturnCredit()
_HANG_UP = HangUp()


@dataclass
class _Ask:
    """The daemon request in flight."""

    address: str
    request: protocol.Message
    asked_at: float
    reply_by: float
    probe: bool       # a check for the primary: neither counted nor allowed to fail anything
    give_up_at: float  # when the whole conversation must be over


def _short(value: object, limit: int = 120) -> str:
    """``value`` for an error message, cut to ``limit`` characters (peers choose its length)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def valid_endpoint(endpoint: object) -> bool:
    """Whether ``endpoint`` is an address a stream socket can connect to (tcp, ipc, inproc)."""
    if not isinstance(endpoint, str) or len(endpoint) > _MAX_ENDPOINT_CHARS:
        return False
    m = _ENDPOINT.fullmatch(endpoint)
    return m is not None and (m.group(2) is None or 0 < int(m.group(2)) < 65536)


class TrainerSession:
    """The state and decisions of one trainer rank's stream (see the module docstring)."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        job: str,
        dp_rank: int,
        dp_size: int,
        mp_rank: int = 0,
        host: str = "",
        machine: str = "",
        prefetch: int | None = None,
        deadline_s: float = 120.0,
        stall_s: float = 5.0,
        primary_check_s: float = 3.0,
        ahead: int = 1,
    ) -> None:
        if not addresses:
            raise ValueError("addresses = []: need one or more daemon endpoints")
        if prefetch is not None and not 1 <= prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch = {prefetch!r}: must be in [1, {MAX_PREFETCH}] (or None for the job's)")
        if min(deadline_s, stall_s, primary_check_s) <= 0 or ahead < 1:
            raise ValueError(f"deadline_s = {deadline_s!r}, stall_s = {stall_s!r}, primary_check_s = "
                             f"{primary_check_s!r}, ahead = {ahead!r}: must be positive")
        self.addresses = list(addresses)
        self.job, self.dp_rank, self.dp_size, self.mp_rank = job, dp_rank, dp_size, mp_rank
        self.host = host
        self.machine = machine  # declared with every Subscribe (see fabric_client.machine)
        self.prefetch = prefetch
        self.deadline_s, self.stall_s, self.primary_check_s = deadline_s, stall_s, primary_check_s
        self.ahead = ahead
        # the cursor: what the trainer gets next
        self.next_step = 0
        self.next_micro = 0
        # the stream
        self.endpoint: str | None = None  # the constructor subscribed at (or last subscribed at)
        self.streaming = False
        self.standby = False              # the stream comes from the group's standby constructor
        self.source_names: tuple[str, ...] = ()  # the job's sources by index, once located
        self.window = DEFAULT_PREFETCH    # credits given at Subscribe
        self.outstanding = 0              # credits the constructor holds now (<= window)
        self._rx_step = 0                 # where the next *received* batch must be
        self._rx_micro = 0
        self._pending: deque[Received] = deque()
        self._fingerprint: str | None = None
        # the trainer's request
        self._wanted = False
        self._wanted_at = 0.0
        self._wait_unreported = 0.0       # data wait not yet sent with a Credit (take_wait)
        self._deadline = math.inf
        self._stall_at = math.inf
        self._primary_check_at = math.inf
        # locating
        self._ask: _Ask | None = None
        self._locating = False
        self._round_pos = 0
        self._backoff = BACKOFF_FIRST_S
        self._wait_until = 0.0            # end of the pause between two rounds over the daemons
        self._retry_at = 0.0              # no subscription before this (a constructor refused us)
        self._refusal_backoff = BACKOFF_FIRST_S
        self._address: str | None = None  # the daemon that answered the last Locate
        self.avoid: list[str] = []        # endpoints that failed us, until a batch arrives again
        self._corrupt_at: tuple[int, int] | None = None  # the cursor whose batch failed its checksum once
        self.last_error = "none"
        self.stats: dict[str, Any] = {
            "batches": 0,
            "bytes": 0,
            "wire_bytes": 0,
            "relocations": 0,
            "primary_returns": 0,
            "locates": 0,
            "stale_dropped": 0,   # batches of this rank off the receive cursor (duplicates, out of order)
            "misrouted": 0,       # batches or heartbeats of another job or rank
            "over_window": 0,     # batches sent with no credit left
            "corrupt": 0,         # batches that failed decode or checksum
            "heartbeats": 0,
            "malformed": 0,       # undecodable or unexpected messages from a constructor
            "bad_replies": 0,     # daemon replies of the wrong type, or Located that cannot be used
            "stream_failures": 0,  # subscriptions that could not be sent
            "wait_s": 0.0,        # seconds the trainer waited for data (from want to hand-out)
            "loss_reports": 0,     # loss reports sent (Loader.report)
            "loss_reports_dropped": 0,  # not sent: no stream open, or its queue full
            "endpoint": None,
        }

    # ------------------------------------------------------------------------------ queries

    @property
    def pending(self) -> int:
        """Batches received and accepted, not yet handed out."""
        return len(self._pending)

    @property
    def receiving(self) -> bool:
        """Whether the owner should read the stream now (a stream is open and fewer than ``ahead``
        batches wait)."""
        return self.streaming and len(self._pending) < self.ahead

    @property
    def wake_at(self) -> float:
        """The next time :meth:`tick` has something to decide (``inf``: only input can change anything)."""
        if not self._wanted:
            return math.inf
        if self._pending and self.streaming:
            return -math.inf  # a batch is ready for the trainer
        at = self._deadline
        if self._ask is not None:
            return min(at, self._ask.reply_by)
        if self.streaming:
            at = min(at, self._stall_at)
            if self.standby:
                at = min(at, self._primary_check_at)
        elif self._locating:
            at = min(at, self._wait_until)
        else:
            at = min(at, self._retry_at)
        return at

    # ------------------------------------------------------------------------------ the trainer

    def want(self, now: float) -> list[Action]:
        """The trainer asks for the next batch: it gets one, or an error by ``now + deadline_s``."""
        self._wanted = True
        self._wanted_at = now
        self._deadline = now + self.deadline_s
        self._stall_at = now + self.stall_s
        return []

    def take_wait(self) -> float:
        """The seconds the trainer waited for data since the last call: what the next ``Credit``
        reports (``wait_s``), so the fabric can export each trainer's data wait."""
        wait, self._wait_unreported = self._wait_unreported, 0.0
        return wait

    def seek(self, step: int, micro: int) -> list[Action]:
        """Move the cursor; a stream from the old cursor is dropped."""
        if (step, micro) == (self.next_step, self.next_micro):
            return []
        self.next_step, self.next_micro = step, micro
        return self._close_stream()

    def close(self) -> list[Action]:
        """Forget the stream and any conversation."""
        self._wanted = False
        out = self._end_locating()
        return out + self._close_stream()

    def tick(self, now: float) -> list[Action]:
        """Decide what to do at ``now``: hand out a batch, probe for the primary, relocate a
        stalled stream, locate, or fail at the deadline."""
        if not self._wanted:
            return []
        if self._ask is not None:
            if now < self._ask.reply_by:
                return []
            return self.on_daemon_silent(now)  # the owner did not report: the reply is overdue
        out: list[Action] = []
        if self.streaming:
            if self.standby and now >= self._primary_check_at:
                return self._probe(now)
            if self._pending:
                return [HandOut(self._pending.popleft())]
            if now >= self._deadline:
                return self._fail(f"no batch for step {self.next_step} micro {self.next_micro} "
                                  f"within {self.deadline_s}s")
            if now < self._stall_at:
                return []
            self.last_error = f"endpoint {self.endpoint} silent for {self.stall_s}s"
            log.warning("constructor at %s silent for %.1fs; relocating", self.endpoint, self.stall_s)
            self.stats["relocations"] += 1
            self._add_avoid(self.endpoint)  # ask the daemons for another replica if there is one
            out = self._close_stream()
        if now >= self._deadline:
            return out + self._fail("could not locate the constructor")
        if self._locating:
            if now < self._wait_until:
                return out
        elif now < self._retry_at:
            return out  # the last constructor refused us: do not hammer the daemons
        else:
            self._locating, self._round_pos, self._backoff = True, 0, BACKOFF_FIRST_S
        return out + self._ask_next(now)

    def on_handed_out(self, received: Received, nbytes: int, now: float) -> list[Action]:
        """``received`` (``nbytes`` decoded) reached the trainer: advance the cursor, return its credit."""
        h = received.header
        if h.micro_batch + 1 < h.num_micro_batches:
            self.next_micro += 1
        else:
            self.next_step, self.next_micro = self.next_step + 1, 0
        self._wanted = False
        self.avoid = []
        self._corrupt_at = None
        self._refusal_backoff = BACKOFF_FIRST_S
        waited = max(0.0, now - self._wanted_at)
        self._wait_unreported += waited
        self.stats["wait_s"] += waited
        self.stats["batches"] += 1
        self.stats["bytes"] += nbytes
        self.stats["wire_bytes"] += len(received.frame)
        return self._give_back(received)

    def on_corrupt(self, received: Received, error: BatchIntegrityError, now: float) -> list[Action]:
        """``received`` failed to decode or its checksum: the first time, resubscribe elsewhere
        from the cursor (the batch is a pure function of its position, so a good replica sends
        it right); the second time in a row at the same cursor, raise ``error``."""
        self.stats["corrupt"] += 1
        self.last_error = f"constructor {self.endpoint}: {error}"
        here = (self.next_step, self.next_micro)
        out = self._close_stream()
        if self._corrupt_at == here:
            self._corrupt_at = None
            self._wanted = False
            return out + self._end_locating() + [Fail(error)]
        self._corrupt_at = here
        log.warning("%s; relocating", self.last_error)
        self.stats["relocations"] += 1
        self._add_avoid(self.endpoint)
        return out

    # ------------------------------------------------------------------------------ the stream

    def on_stream_message(self, msg: protocol.Message, payload: list[Any], now: float) -> list[Action]:
        """One decoded message from the constructor stream."""
        if not self.streaming:
            return []
        if isinstance(msg, protocol.Batch):
            return self._on_batch(msg, payload, now)
        if isinstance(msg, protocol.Heartbeat):
            if msg.job != self.job:
                self.stats["misrouted"] += 1
                self.last_error = f"heartbeat of job {_short(msg.job)} from constructor {self.endpoint}"
                return []
            self.stats["heartbeats"] += 1
            self._stall_at = now + self.stall_s
            return []
        if isinstance(msg, protocol.ErrorReply):
            return self._refused(f"constructor {self.endpoint} refused: {_short(msg.code)}: {_short(msg.reason)}", now)
        self.stats["malformed"] += 1
        self.last_error = f"unexpected {msg.TYPE!r} from constructor {self.endpoint}"
        return []

    def on_stream_garbled(self, error: ProtocolError, now: float) -> list[Action]:
        """A message from the stream that is not a valid record: counted and dropped."""
        self.stats["malformed"] += 1
        self.last_error = f"malformed message from {self.endpoint}: {error}"
        return []

    def on_stream_failed(self, reason: str, now: float) -> list[Action]:
        """The stream socket could not connect or send (a bad endpoint, a full queue): relocate,
        avoiding it, after a backoff."""
        self.stats["stream_failures"] += 1
        return self._refused(f"subscribe to {self.endpoint} failed: {reason}", now)

    def _on_batch(self, header: protocol.Batch, payload: list[Any], now: float) -> list[Action]:
        credited = self.outstanding > 0
        if credited:
            self.outstanding -= 1
        else:
            self.stats["over_window"] += 1
        if header.job != self.job or header.dp_rank != self.dp_rank:
            self.stats["misrouted"] += 1
            self.last_error = (f"batch of job {_short(header.job)} dp_rank {header.dp_rank} from constructor "
                               f"{self.endpoint}")
            return self._drop(credited)
        if header.step != self._rx_step or header.micro_batch != self._rx_micro:
            self.stats["stale_dropped"] += 1
            return self._drop(credited)
        if len(payload) != 1 or header.num_micro_batches < 1 or header.micro_batch >= header.num_micro_batches:
            self.stats["malformed"] += 1
            self.last_error = (f"bad batch message step {header.step} micro {header.micro_batch}/"
                               f"{header.num_micro_batches} with {len(payload)} frames")
            return self._drop(credited)
        if header.micro_batch + 1 < header.num_micro_batches:
            self._rx_micro += 1
        else:
            self._rx_step, self._rx_micro = self._rx_step + 1, 0
        received = Received(header, payload[0], credited)
        self._pending.append(received)
        self._stall_at = now + self.stall_s
        return [Decode(received)]

    def _drop(self, credited: bool) -> list[Action]:
        """A received batch is not kept: the credit it took (if any) goes back."""
        if not credited:
            return []
        self.outstanding += 1
        return [_RETURN_CREDIT]

    def _give_back(self, received: Received) -> list[Action]:
        if not received.credited or not self.streaming:
            return []
        self.outstanding += 1
        return [_RETURN_CREDIT]

    def _refused(self, error: str, now: float) -> list[Action]:
        """The constructor will not (or cannot) serve us: relocate, avoiding it, after a backoff."""
        self.last_error = error
        log.warning("%s; relocating", error)
        self.stats["relocations"] += 1
        self._add_avoid(self.endpoint)  # it is stopping or serves someone else: prefer another
        out = self._close_stream()
        self._retry_at = now + self._refusal_backoff
        self._refusal_backoff = min(self._refusal_backoff * 2, BACKOFF_MAX_S)
        return out

    def _subscribe(self, located: protocol.Located, now: float) -> list[Action]:
        if self._fingerprint is not None and located.fingerprint != self._fingerprint:
            log.warning("job %r fingerprint changed %s → %s", self.job, self._fingerprint,
                        _short(located.fingerprint))
        self._fingerprint = located.fingerprint
        if self.prefetch is not None:
            self.window = self.prefetch
        else:
            self.window = min(located.prefetch, MAX_PREFETCH) if located.prefetch >= 1 else DEFAULT_PREFETCH
        self.endpoint = located.endpoint
        self.streaming = True
        self.standby = located.standby
        if located.sources:
            self.source_names = tuple(located.sources)
        self.outstanding = self.window
        self._rx_step, self._rx_micro = self.next_step, self.next_micro
        self._stall_at = now + self.stall_s
        self._primary_check_at = now + self.primary_check_s
        self.stats["endpoint"] = located.endpoint
        log.info("job %r dp %d mp %d subscribing at %s from step %d micro %d%s", self.job, self.dp_rank,
                 self.mp_rank, located.endpoint, self.next_step, self.next_micro, " (standby)" * self.standby)
        sub = protocol.Subscribe(job=self.job, fingerprint=located.fingerprint, dp_rank=self.dp_rank,
                                 mp_rank=self.mp_rank, next_step=self.next_step, next_micro=self.next_micro,
                                 credits=self.window, machine=self.machine)
        return [OpenStream(located.endpoint, sub, located.local_endpoint)]

    def _close_stream(self) -> list[Action]:
        if not self.streaming and not self._pending:
            return []
        discarded = tuple(self._pending)
        self._pending.clear()
        self.streaming = False
        self.standby = False
        self.outstanding = 0
        return [CloseStream(discarded)]

    def _add_avoid(self, endpoint: str | None) -> None:
        if endpoint is None or not valid_endpoint(endpoint) or endpoint in self.avoid:
            return
        self.avoid = [*self.avoid, endpoint][-MAX_AVOID:]

    # ------------------------------------------------------------------------------ the daemons

    def _ask_next(self, now: float) -> list[Action]:
        """Ask the next daemon of this round, or pause before the next round."""
        if now >= self._deadline:
            return self._fail("could not locate the constructor")
        if self._round_pos >= len(self.addresses):  # nobody knew: pause, then go round again
            self._round_pos = 0
            self._wait_until = now + min(self._backoff, self._deadline - now)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            return []
        address = self.addresses[self._round_pos]
        self._round_pos += 1
        self.stats["locates"] += 1
        return self._request(address, protocol.Hello(protocol=PROTOCOL_VERSION, peer="trainer"), now,
                             probe=False, give_up_at=self._deadline, new_connection=True)

    def _request(self, address: str, request: protocol.Message, now: float, *, probe: bool, give_up_at: float,
                 new_connection: bool) -> list[Action]:
        reply_by = now + max(0.0, min(self.stall_s, give_up_at - now))
        self._ask = _Ask(address, request, now, reply_by, probe, give_up_at)
        return [AskDaemon(address, request, reply_by, new_connection)]

    def _locate_request(self) -> protocol.Locate:
        return protocol.Locate(job=self.job, dp_rank=self.dp_rank, dp_size=self.dp_size, mp_rank=self.mp_rank,
                               avoid=list(self.avoid), host=self.host)

    def _probe(self, now: float) -> list[Action]:
        """Ask one daemon, briefly, whether the primary constructor is up again."""
        self._primary_check_at = now + self.primary_check_s
        address = self._address or self.addresses[0]
        return self._request(address, protocol.Hello(protocol=PROTOCOL_VERSION, peer="trainer"), now,
                             probe=True, give_up_at=now + PROBE_TIMEOUT_S, new_connection=True)

    def on_daemon_reply(self, reply: protocol.Message, now: float) -> list[Action]:
        """The daemon answered the last :class:`AskDaemon` with ``reply``."""
        ask, self._ask = self._ask, None
        if ask is None:
            return []  # nothing was asked: a late or forged reply
        what = ask.request.TYPE
        if isinstance(reply, protocol.ErrorReply):
            if ask.probe:
                return [_HANG_UP]  # a refusal is for the normal path to meet, not the probe
            self.last_error = f"{ask.address}: {what} refused: {_short(reply.code)}: {_short(reply.reason)}"
            if reply.code in RETRY_CODES:
                return [_HANG_UP, *self._ask_next(now)]
            return self._give_up(RemoteError(reply.code, f"daemon {ask.address} refused {what}: {reply.reason}"))
        if isinstance(ask.request, protocol.Hello):
            if isinstance(reply, protocol.Welcome):
                return self._request(ask.address, self._locate_request(), now, probe=ask.probe,
                                     give_up_at=ask.give_up_at, new_connection=False)
            return self._bad_reply(ask, f"unexpected {reply.TYPE!r} in reply to {what}", now)
        if not isinstance(reply, protocol.Located):
            return self._bad_reply(ask, f"unexpected {reply.TYPE!r} in reply to {what}", now)
        if reply.job != self.job:
            return self._bad_reply(ask, f"located job {_short(reply.job)}, not {self.job!r}", now)
        if not valid_endpoint(reply.endpoint):
            return self._bad_reply(ask, f"located an unusable endpoint {_short(reply.endpoint)}", now)
        if reply.dp_size != self.dp_size or not 0 <= self.mp_rank < reply.mp_size:
            if ask.probe:
                return [_HANG_UP]
            return self._give_up(RemoteError(
                ErrorCode.BAD_REQUEST,
                f"daemon {ask.address} located job {reply.job!r} with dp_size {reply.dp_size} and mp_size "
                f"{reply.mp_size}; this loader is job {self.job!r} dp_rank {self.dp_rank}/{self.dp_size} "
                f"mp_rank {self.mp_rank}",
            ))
        if ask.probe:
            if reply.standby or reply.endpoint == self.endpoint or not self.streaming:
                return [_HANG_UP]
            log.info("job %r dp %d mp %d: primary constructor up at %s; leaving standby %s",
                     self.job, self.dp_rank, self.mp_rank, reply.endpoint, self.endpoint)
            self.stats["primary_returns"] += 1
            return [_HANG_UP, *self._close_stream(), *self._subscribe(reply, now)]
        self._address = ask.address
        self._locating = False
        return [_HANG_UP, *self._subscribe(reply, now)]

    def on_daemon_garbled(self, error: ProtocolError, now: float) -> list[Action]:
        """The daemon's reply to the last :class:`AskDaemon` was not a valid record."""
        ask, self._ask = self._ask, None
        if ask is None or ask.probe:
            return [] if ask is None else [_HANG_UP]
        self.last_error = f"{ask.address}: bad reply to {ask.request.TYPE}: {error}"
        if error.code == ErrorCode.VERSION:
            return self._give_up(
                RemoteError(error.code, f"daemon {ask.address} speaks another protocol: {error.reason}"))
        self.stats["bad_replies"] += 1
        return [_HANG_UP, *self._ask_next(now)]

    def on_daemon_silent(self, now: float, reason: str | None = None) -> list[Action]:
        """No reply to the last :class:`AskDaemon` by its ``reply_by`` (or, with ``reason``, it
        could not be sent)."""
        ask, self._ask = self._ask, None
        if ask is None or ask.probe:
            return [] if ask is None else [_HANG_UP]
        what = ask.request.TYPE
        if reason is None:
            self.last_error = f"{ask.address}: no reply to {what} within {ask.reply_by - ask.asked_at:.1f}s"
        else:
            self.last_error = f"{ask.address}: send {what} failed: {reason}"
        return [_HANG_UP, *self._ask_next(now)]

    def _bad_reply(self, ask: _Ask, what: str, now: float) -> list[Action]:
        if ask.probe:
            return [_HANG_UP]
        self.stats["bad_replies"] += 1
        self.last_error = f"{ask.address}: {what}"
        log.warning("daemon %s: %s; asking the next", ask.address, what)
        return [_HANG_UP, *self._ask_next(now)]

    # ------------------------------------------------------------------------------ giving up

    def _end_locating(self) -> list[Action]:
        asking = self._ask is not None
        self._ask = None
        self._locating = False
        return [_HANG_UP] if asking else []

    def _give_up(self, error: FabricError) -> list[Action]:
        self._wanted = False
        self._ask = None
        self._locating = False
        return [_HANG_UP, *self._close_stream(), Fail(error)]

    def _fail(self, what: str) -> list[Action]:
        return self._give_up(FabricUnavailable(
            f"job {self.job!r} dp_rank {self.dp_rank} mp_rank {self.mp_rank}: {what}; daemons tried: "
            f"{', '.join(self.addresses)}; constructor endpoint: {self.endpoint or 'never located'}; "
            f"last error: {self.last_error}"
        ))
