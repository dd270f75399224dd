"""The requests a daemon's control socket serves: one handler per message kind, in a registry.

As in Circus's ``commands/``: the daemon's loop only decodes a message and looks its type up in
:data:`HANDLERS`; each handler is a small function whose docstring gives its request and its
reply, grouped by who sends it:

- :mod:`.trainers`: ``Hello``, ``Ping``, ``Locate`` (trainers, and anyone checking liveness);
- :mod:`.operators`: ``SubmitJob``, ``CancelJob``, ``StatusRequest`` (``fabricctl``);
- :mod:`.roles`: ``RoleHello``, ``RoleStats``, ``PlanRequest``, ``PoolsRequest``, ``SkipReport``
  (this daemon's role processes);
- :mod:`.peers`: ``PeerMessage`` (other daemons: lease, replication, heartbeats).

A handler is called as ``handler(daemon, identity, msg, payload)`` with a record that already
passed the protocol's typed validation, and returns the reply (a record, or ``(record, payload
frames)``), or None for messages that get no reply. It may raise ``ProtocolError`` for a request
that is well-formed but wrong here (counted and answered like a malformed one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fabric_client import protocol

if TYPE_CHECKING:
    from ..daemon import Daemon

__all__ = ["HANDLERS", "Handler", "Reply", "handles"]

Reply = tuple[protocol.Message, tuple] | protocol.Message | None
Handler = Callable[["Daemon", bytes, Any, list], Reply]
H = TypeVar("H", bound=Handler)

#: message type → the function that serves it
HANDLERS: dict[type[protocol.Message], Handler] = {}


def handles(msg_type: type[protocol.Message]) -> Callable[[H], H]:
    """Register the decorated function as the handler of ``msg_type`` (one per type)."""
    def register(fn: H) -> H:
        if msg_type in HANDLERS:
            raise TypeError(f"{msg_type.__name__} has two handlers")
        HANDLERS[msg_type] = fn
        return fn
    return register


from . import operators, peers, roles, trainers  # noqa: E402,F401  (registers the handlers)
