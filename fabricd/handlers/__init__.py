"""The requests a daemon's control socket serves: one handler per message kind, in a registry.

As in Circus's ``commands/``: the daemon's loop only decodes a message and looks its type up in
:data:`HANDLERS`; each handler is a small function whose docstring gives its request and its
reply, grouped by who sends it:

- :mod:`.trainers`: ``Hello``, ``Ping``, ``Locate`` (trainers, and anyone checking liveness);
- :mod:`.operators`: ``SubmitJob``, ``CancelJob``, ``StatusRequest`` (``fabricctl``);
- :mod:`.plans`: ``PlanUpdate``, ``PlanShowRequest`` (``fabricctl plan``);
- :mod:`.roles`: ``RoleHello``, ``RoleStats``, ``PlanRequest``, ``PoolsRequest``, ``SkipReport``
  (this daemon's role processes);
- :mod:`.peers`: ``PeerMessage`` (other daemons: lease, replication, heartbeats).

Each handler also names who may send its message (``callers``), by the key the sender
authenticated with (CurveZMQ; see ``fabric_client.keys``), never by a name the message declares:

- ``operator``: an operator key; ``trainer``: a trainer key;
- ``role``: this node's own key (its role processes);
- ``peer``: another node's key (a ``PeerMessage`` must also name that node as its sender);
- ``any``: any key the control socket admits.

The daemon refuses anything else (``ErrorReply(forbidden)``, counted). On an ``insecure`` node
there are no keys and every caller is allowed.

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

__all__ = ["CALLERS", "HANDLERS", "Handler", "Reply", "caller_kind", "handles"]

Reply = tuple[protocol.Message, tuple] | protocol.Message | None
Handler = Callable[["Daemon", bytes, Any, list], Reply]
H = TypeVar("H", bound=Handler)

#: message type → the function that serves it
HANDLERS: dict[type[protocol.Message], Handler] = {}
#: message type → the kinds of caller that may send it (see the module doc)
CALLERS: dict[type[protocol.Message], frozenset[str]] = {}
CALLER_KINDS = frozenset({"any", "operator", "trainer", "role", "peer"})


def handles(msg_type: type[protocol.Message], *, callers: tuple[str, ...]) -> Callable[[H], H]:
    """Register the decorated function as the handler of ``msg_type`` (one per type), callable
    by ``callers``."""
    if not callers or not set(callers) <= CALLER_KINDS:
        raise TypeError(f"callers {callers!r}: expected some of {sorted(CALLER_KINDS)}")

    def register(fn: H) -> H:
        if msg_type in HANDLERS:
            raise TypeError(f"{msg_type.__name__} has two handlers")
        HANDLERS[msg_type] = fn
        CALLERS[msg_type] = frozenset(callers)
        return fn
    return register


def caller_kind(who: str, node_id: str) -> str:
    """The caller kind of an authenticated ``kind:name`` on node ``node_id``."""
    kind, _, name = who.partition(":")
    if kind == "node":
        return "role" if name == node_id else "peer"
    return kind


from . import operators, peers, plans, roles, trainers  # noqa: E402,F401  (registers the handlers)
