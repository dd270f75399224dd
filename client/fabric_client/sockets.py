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

Authentication (CurveZMQ) is applied here too, so a socket made by the factory gets it without its
caller doing anything: with ``keys`` (a :class:`~fabric_client.keys.ClientKeys`), every DEALER
authenticates with the caller's key pair and checks the fabric's server key; with ``ring`` (a
node's :class:`~fabric_client.keys.KeyRing`), every ROUTER is a CURVE server that admits only the
kinds of key its ``domain`` allows, checked by one ZAP authenticator thread on the context (pyzmq's
``zmq.auth``). Without them the sockets are plaintext (``insecure = true`` in the node config),
and so is a socket asked for with ``local=True``: one on a Unix socket in a daemon's private
directory (``fabricd.local_ipc``), where the directory's mode is the access control.
:meth:`SocketFactory.caller` gives the authenticated ``kind:name`` of a received message.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

if TYPE_CHECKING:
    from .keys import ClientKeys, KeyRing

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DOMAINS", "SocketFactory"]

log = logging.getLogger(__name__)

#: Largest message a socket accepts unless the node config says otherwise (batches are ~MBs).
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20

#: ZAP domain of a served socket → the kinds of key it admits at all (per-message rules come on
#: top: the daemon's handlers say who may send what)
DOMAINS = {
    "control": frozenset({"node", "trainer", "operator"}),  # a daemon's control socket
    "stream": frozenset({"trainer"}),                       # a constructor's trainer stream
    "loader": frozenset({"node"}),                          # a source loader (constructors only)
}


class _Credentials:
    """The ZAP callback: admits a key of a kind the socket's domain allows (the ring may be
    reloaded at any time: it swaps its table whole)."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        who = self.ring.who(key)
        ok = who is not None and who.split(":", 1)[0] in DOMAINS.get(domain, ())
        if not ok:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("refused a CURVE handshake on %r (%s; %d refused so far)", domain,
                            who or "unknown key", self.refused)
        return ok


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler; the User-Id of an admitted key is its ``kind:name``."""

    def __init__(self, context: zmq.Context, ring: KeyRing) -> None:
        super().__init__(context)
        self.ring = ring

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.ring.who(zmq.utils.z85.encode(client_public_key)) or "unknown"


class SocketFactory:
    """Makes sockets on ``context`` with bounded queues, the message size limit and, given keys,
    CurveZMQ (``keys``: this process as a client; ``ring``: as a server; see the module doc)."""

    def __init__(self, context: zmq.Context, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keys: ClientKeys | None = None, ring: KeyRing | None = None) -> None:
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes = {max_message_bytes}: must be >= 1")
        self.context = context
        self.max_message_bytes = max_message_bytes
        self.keys, self.ring = keys, ring
        self._auth: _Authenticator | None = None
        if ring is not None:  # before any socket binds: a CURVE server without ZAP admits every key
            self._auth = _Authenticator(context, ring)
            self._auth.start()
            self._credentials = _Credentials(ring)
            for domain in DOMAINS:
                self._auth.configure_curve_callback(domain, credentials_provider=self._credentials)

    def refused_handshakes(self) -> int:
        return self._credentials.refused if self._auth is not None else 0

    def close(self) -> None:
        """Stop the authenticator thread (after the sockets are closed)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _make(self, kind: int, hwm: int, linger_ms: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        return sock

    def router(self, *, domain: str = "control", hwm: int = 1000, local: bool = False) -> zmq.Socket:
        """A ROUTER (a served endpoint): replies to departed peers raise EHOSTUNREACH. With a ring,
        a CURVE server admitting the key kinds of ``domain`` (see :data:`DOMAINS`), unless
        ``local`` (a private Unix socket: plaintext)."""
        if domain not in DOMAINS:
            raise ValueError(f"domain {domain!r}: expected one of {', '.join(DOMAINS)}")
        sock = self._make(zmq.ROUTER, hwm, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.ring is not None and not local:
            sock.curve_secretkey = self.ring.server.secret
            sock.curve_publickey = self.ring.server.public
            sock.curve_server = True
            sock.zap_domain = domain.encode()
        return sock

    def dealer(self, *, hwm: int = 1000, linger_ms: int = 0, local: bool = False) -> zmq.Socket:
        """A DEALER (a connection to a served endpoint). ``linger_ms`` > 0 lets a last message
        (a farewell) leave after close, for at most that long. With keys, a CURVE client, unless
        ``local`` (to a private Unix socket: plaintext)."""
        sock = self._make(zmq.DEALER, hwm, linger_ms)
        if self.keys is not None and not local:
            sock.curve_secretkey = self.keys.own.secret
            sock.curve_publickey = self.keys.own.public
            sock.curve_serverkey = self.keys.server_public
        return sock

    def caller(self, frames: list[Any]) -> str | None:
        """The authenticated ``kind:name`` of a message received with ``copy=False`` (None on a
        plaintext socket). A key removed from the allow-lists since its handshake is None too."""
        if self.ring is None:
            return None
        try:
            who = frames[-1].get("User-Id")
        except (zmq.ZMQError, AttributeError, IndexError):
            return None
        return who if who in self.ring.names else None
