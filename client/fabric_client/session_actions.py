"""What :class:`~fabric_client.session.TrainerSession` asks its owner to do, and the received
batch it hands back and forth.

The owner performs a list of actions in order; the outcome of an :class:`AskDaemon`,
:class:`OpenStream` or :class:`HandOut` is reported back to the session, which may return more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import protocol
from .errors import FabricError

__all__ = [
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
]


class Received:
    """A batch accepted from the stream, not yet handed out. ``work`` is the owner's slot (its
    decode job); the session never reads it."""

    __slots__ = ("header", "frame", "credited", "work")

    def __init__(self, header: protocol.Batch, frame: Any, credited: bool) -> None:
        self.header = header
        self.frame = frame
        self.credited = credited  # it consumed one of the window's credits, which goes back later
        self.work: Any = None

    def __repr__(self) -> str:
        h = self.header
        return f"Received(step={h.step}, micro={h.micro_batch}/{h.num_micro_batches}, credited={self.credited})"


@dataclass(frozen=True)
class AskDaemon:
    """Send ``request`` to the daemon at ``address`` (on a fresh connection when
    ``new_connection``, else on the open one) and report its reply, or its absence at
    ``reply_by``, with ``on_daemon_*``."""

    address: str
    request: protocol.Message
    reply_by: float
    new_connection: bool


@dataclass(frozen=True)
class HangUp:
    """Close the daemon connection (a conversation ended, or its socket may hold a late reply)."""


@dataclass(frozen=True)
class OpenStream:
    """Connect a fresh stream socket to ``endpoint`` and send ``subscribe``; report a failure with
    :meth:`TrainerSession.on_stream_failed`."""

    endpoint: str
    subscribe: protocol.Subscribe
    local: str = ""  # the same constructor on its daemon's Unix socket, when the trainer may use it


@dataclass(frozen=True)
class ReturnCredit:
    """Send ``Credit(job, dp_rank, mp_rank, 1)`` on the stream (skip it when there is none)."""


@dataclass(frozen=True)
class CloseStream:
    """Send ``Unsubscribe`` (best effort), close the stream socket, cancel the decode jobs of
    ``discarded``."""

    discarded: tuple[Received, ...]


@dataclass(frozen=True)
class Decode:
    """Start decoding (and verifying) ``received`` ahead of its turn; keep the job in ``received.work``."""

    received: Received


@dataclass(frozen=True)
class HandOut:
    """Give ``received`` to the trainer: finish its decode, then report
    :meth:`TrainerSession.on_handed_out` or :meth:`TrainerSession.on_corrupt`."""

    received: Received


@dataclass(frozen=True)
class Fail:
    """Raise ``error`` to the trainer (after performing the actions before this one)."""

    error: FabricError


Action = AskDaemon | HangUp | OpenStream | ReturnCredit | CloseStream | Decode | HandOut | Fail
