"""Same-node links between role processes over a private Unix socket, without CurveZMQ.

Why. A source loader's units travel to data constructors, most often on its own node. Over TCP
every byte is encrypted by the loader and decrypted by the constructor (CurveZMQ): on loopback
that costs ~1.2 ms of CPU per MB on each side, five times what moving the bytes costs (measured
with pyzmq 27 / libzmq 4.3.5: 1.48 ms per MB received over tcp+curve, 0.24 over tcp, 0.22 over
ipc), and in the end-to-end benchmark's loading-bound run it was about a fifth of all the
fabric's loading CPU. Bytes that never leave the node need no encryption, only the assurance
that no other user can connect: a Unix socket in a directory only the daemon's user can enter.

THE RULE. A daemon makes one private directory (mode 0700, in the system's temp directory:
systemd's ``PrivateTmp=`` gives the service its own) and hands it to its role processes. A
source loader serves on its TCP endpoint (CurveZMQ, as before) and also on
:func:`endpoint_for` its TCP endpoint in that directory, plaintext. A constructor given a pool
endpoint connects to the Unix socket instead when that socket's file exists in its own daemon's
directory: only a loader of the same daemon can have made it, so the pair is on one node, and
the directory's mode keeps every other user out (root aside, who can read the keys anyway).
Loaders of other daemons, on this host or another, are reached over TCP with CurveZMQ. The
daemon removes the directory when it stops. ``[security] local_ipc = false`` turns this off.

Trainer streams likewise: a constructor also serves on :func:`endpoint_for` its stream endpoint
(not for a job that names its trainer keys: there only a key says who may connect), the daemon
names that socket in ``Located.local_endpoint`` when the constructor is its own, and a
``Loader`` that can connect to it (same host, the daemon's user) streams there.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

__all__ = ["MAX_SOCKET_PATH", "make_dir", "endpoint_for", "local_endpoint", "socket_file", "remove_dir", "remove_recorded"]

log = logging.getLogger(__name__)

#: Longest Unix socket path Linux takes (``sun_path`` is 108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107
_NAME_BYTES = 8  # hash bytes in a socket's file name: 16 hex digits
_PREFIX = "fabricd-ipc-"


def make_dir(record: Path | None = None, base: str | None = None) -> Path | None:
    """A new private directory (mode 0700) for this daemon's role sockets, or None (logged) when
    none can be made or its sockets' paths would be too long for a Unix socket.

    ``record``: a file in the daemon's state directory naming the directory it uses. A daemon
    that was killed could not remove its own: the next start removes it first."""
    if record is not None:
        remove_recorded(record)
    try:
        path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=base))  # mkdtemp: mode 0700
    except OSError as e:
        log.warning("no private socket directory (%s): same-node role links use TCP", e)
        return None
    if len(str(path / _name("x"))) > MAX_SOCKET_PATH:
        log.warning("socket directory %s is too long for Unix sockets: same-node role links use TCP", path)
        remove_dir(path)
        return None
    if record is not None:
        try:
            record.write_text(f"{path}\n")
        except OSError as e:  # only the clean-up after a kill depends on it
            log.warning("cannot record the socket directory in %s: %s", record, e)
    return path


def _name(tcp_endpoint: str) -> str:
    return hashlib.blake2b(tcp_endpoint.encode(), digest_size=_NAME_BYTES).hexdigest() + ".sock"


def socket_file(directory: str | Path, tcp_endpoint: str) -> Path:
    """The Unix socket file a loader serving ``tcp_endpoint`` binds in ``directory``."""
    return Path(directory) / _name(tcp_endpoint)


def endpoint_for(directory: str | Path, tcp_endpoint: str) -> str:
    """The ``ipc://`` endpoint of :func:`socket_file`."""
    return f"ipc://{socket_file(directory, tcp_endpoint)}"


def local_endpoint(directory: str | Path | None, tcp_endpoint: str) -> str | None:
    """The same-node endpoint of the loader serving ``tcp_endpoint`` when its socket exists in
    ``directory`` (this daemon's: the loader is one of this daemon's own), else None."""
    if not directory or not socket_file(directory, tcp_endpoint).exists():
        return None
    return endpoint_for(directory, tcp_endpoint)


def remove_recorded(record: Path) -> None:
    """Remove the socket directory ``record`` names (what a daemon that was killed left behind);
    a record naming anything but such a directory is not followed."""
    try:
        previous = Path(record.read_text().strip())
    except (OSError, ValueError):
        return
    if previous.name.startswith(_PREFIX):
        remove_dir(previous)


def remove_dir(path: str | Path | None) -> None:
    """Remove the directory and any socket a killed role left in it (never raises)."""
    if path:
        shutil.rmtree(path, ignore_errors=True)
