"""Request/reply to a daemon's control endpoint, for fabricctl and tests.

Lazy-pirate style: every request has a timeout; on a timeout the socket is closed (linger 0)
and a fresh one is used for the next try, so a dead daemon never leaves the caller hanging.
"""

from __future__ import annotations

import zmq

from fabric_client import protocol
from fabric_client.errors import FabricUnavailable, RemoteError
from fabric_client.keys import ClientKeys, client_keys_from_env
from fabric_client.sockets import SocketFactory

#: environment variable naming an operator's key file (``keys/operators/NAME.key_secret``)
KEY_ENV = "FABRICCTL_KEY"

__all__ = ["ControlClient", "request_any"]


class ControlClient:
    """Blocking requests to one daemon, each bounded by ``timeout_s`` × ``retries``. ``keys``:
    the operator's CurveZMQ keys (default: the file ``$FABRICCTL_KEY`` names; none: plaintext,
    which a secure daemon does not answer)."""

    def __init__(self, address: str, *, timeout_s: float = 5.0, retries: int = 2,
                 context: zmq.Context | None = None, keys: ClientKeys | None = None) -> None:
        self.address = address
        self.keys = keys if keys is not None else client_keys_from_env(KEY_ENV)
        self.timeout_s = timeout_s
        self.retries = retries
        self.ctx = context or zmq.Context.instance()
        self.sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            self.sock = SocketFactory(self.ctx, keys=self.keys).dealer()
            self.sock.connect(self.address)
        return self.sock

    def request(self, msg: protocol.Message, payload: tuple = ()) -> tuple[protocol.Message, list]:
        """Send ``msg``; return the reply. Raises RemoteError for an ErrorReply, FabricUnavailable on timeouts."""
        for _ in range(self.retries + 1):
            sock = self._socket()
            sock.send_multipart(protocol.encode(msg, payload))
            if sock.poll(int(self.timeout_s * 1000)):
                reply, frames = protocol.decode(sock.recv_multipart(copy=False))
                if isinstance(reply, protocol.ErrorReply):
                    raise RemoteError(reply.code, reply.reason)
                return reply, frames
            self.close()
        hint = "" if self.keys is not None else f" (a secure fabric answers only known keys: set {KEY_ENV})"
        raise FabricUnavailable(f"no answer from {self.address} to {msg.TYPE} after "
                                f"{self.retries + 1} tries of {self.timeout_s:.1f}s{hint}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def request_any(addresses: list[str], msg: protocol.Message, *, timeout_s: float = 5.0,
                leader_only: bool = False, keys: ClientKeys | None = None) -> protocol.Message:
    """Send ``msg`` to the first daemon of ``addresses`` that answers (the leader, if ``leader_only``)."""
    errors = []
    for address in addresses:
        with ControlClient(address, timeout_s=timeout_s, retries=0, keys=keys) as client:
            try:
                reply, _ = client.request(msg)
                return reply
            except RemoteError as e:
                if e.code != protocol.ErrorCode.NOT_LEADER:
                    raise
                errors.append(f"{address}: {e.reason}")
            except FabricUnavailable as e:
                errors.append(str(e))
    what = "the leader" if leader_only else "a daemon"
    raise FabricUnavailable(f"could not reach {what} for {msg.TYPE}: " + "; ".join(errors))
