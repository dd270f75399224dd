"""Every ZeroMQ socket of the fabric is made here, with the fabric's limits applied.

Daemons, role processes, ``fabricctl`` and the trainer's ``Loader`` all take their sockets from a
:class:`SocketFactory`, so the options that keep a peer from hurting its receiver are set in one
place and cannot be forgotten on a new socket:

- ``LINGER = 0``: closing a socket never hangs on messages to a dead peer;
- ``SNDHWM``/``RCVHWM``: every queue is bounded (a full queue slows or refuses the sender; data
  that must arrive travels with credits, so nothing that matters is dropped at a mark);
- ``MAXMSGSIZE``: ZeroMQ drops an oversized message before it is read, and the connection with it;
- ``ROUTER_MANDATORY`` on ROUTERs: a reply to a peer that left is an error the caller counts,
  not a silent drop.

Authentication (CurveZMQ, allow-lists per kind of caller) belongs here too: a socket made by the
factory gets it without its caller doing anything.
"""

from __future__ import annotations

import zmq

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "SocketFactory"]

#: Largest message a socket accepts unless the node config says otherwise (batches are ~MBs).
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20


class SocketFactory:
    """Makes sockets on ``context`` with bounded queues and the message size limit."""

    def __init__(self, context: zmq.Context, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes = {max_message_bytes}: must be >= 1")
        self.context = context
        self.max_message_bytes = max_message_bytes

    def _make(self, kind: int, hwm: int, linger_ms: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        return sock

    def router(self, *, hwm: int = 1000) -> zmq.Socket:
        """A ROUTER (a served endpoint): replies to departed peers raise EHOSTUNREACH."""
        sock = self._make(zmq.ROUTER, hwm, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        return sock

    def dealer(self, *, hwm: int = 1000, linger_ms: int = 0) -> zmq.Socket:
        """A DEALER (a connection to a served endpoint). ``linger_ms`` > 0 lets a last message
        (a farewell) leave after close, for at most that long."""
        return self._make(zmq.DEALER, hwm, linger_ms)
