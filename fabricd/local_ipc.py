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

Trainers of another user: the packaged unit runs the daemon as its own user, so the private
directory keeps every trainer out. ``[security] trainer_group = "G"`` gives the trainer streams a
directory of their own, made like the private one but shared with the group G (mode 0750, group
G; its sockets 0666, the directory keeping everyone else out), in ``$RUNTIME_DIRECTORY/trainers``
(systemd's ``RuntimeDirectory=``, outside the service's private /tmp; the unit's drop-in makes it
setgid G, since the daemon may not chown there) or ``[security] trainer_socket_dir``: a member
of G connects to it, plaintext. Being in G is then what holding a trainer key is on TCP: it
admits to the streams of every job on this node that does not name its trainer keys. Source
loaders stay in the private directory. The daemon names the trainer-stream directory once
(``Daemon.stream_ipc_dir``: the shared one, else the private one), for ``Locate`` and for its
constructors (``RoleArgs.extra["stream_ipc_dir"]``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["MAX_SOCKET_PATH", "make_dir", "make_shared_dir", "share_socket", "endpoint_for", "local_endpoint",
           "socket_file", "remove_dir", "remove_recorded"]

log = logging.getLogger(__name__)

#: Longest Unix socket path Linux takes (``sun_path`` is 108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107
_NAME_BYTES = 8  # hash bytes in a socket's file name: 16 hex digits
_PREFIX = "fabricd-ipc-"
_SHARED_PREFIX = "fabricd-trainers-"
#: The shared directory: owner and group may enter, nobody else; the group cannot create files.
SHARED_DIR_MODE = 0o750
#: A socket in it: connecting takes write permission on the socket file. Anyone's: the directory
#: (its group and mode) is what keeps others out, as for /tmp/.X11-unix; the socket keeps the
#: daemon's group (chown is a privileged system call under the packaged unit).
SHARED_SOCKET_MODE = 0o666
#: Under systemd, where the shared directory goes: made by the unit's drop-in
#: (scripts/install.sh --trainer-group G), as root, owned by the daemon, group G, setgid.
RUNTIME_SUBDIR = "trainers"


def make_dir(record: Path | None = None, base: str | Path | None = None, *, prefix: str = _PREFIX) -> Path | None:
    """A new private directory (mode 0700) for this daemon's role sockets, or None (logged) when
    none can be made or its sockets' paths would be too long for a Unix socket.

    ``record``: a file in the daemon's state directory naming the directory it uses. A daemon
    that was killed could not remove its own: the next start removes it first."""
    if record is not None:
        remove_recorded(record)
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # mkdtemp: mode 0700
    except OSError as e:
        log.warning("no socket directory in %s (%s): same-node links use TCP", base or tempfile.gettempdir(), e)
        return None
    if len(str(path / _name("x"))) > MAX_SOCKET_PATH:
        log.warning("socket directory %s is too long for Unix sockets: same-node links use TCP", path)
        remove_dir(path)
        return None
    if record is not None:
        try:
            record.write_text(f"{path}\n")
        except OSError as e:  # only the clean-up after a kill depends on it
            log.warning("cannot record the socket directory in %s: %s", record, e)
    return path


def make_shared_dir(gid: int, record: Path | None = None, base: str | Path | None = None) -> Path | None:
    """A new directory for trainer streams shared with group ``gid`` (mode 0750, that group), in
    ``base`` (default: ``$RUNTIME_DIRECTORY/trainers`` under systemd, else the temp directory),
    or None (logged as an error: the group's trainers then stream over TCP with CurveZMQ) when it
    cannot be made.

    The new directory is the group's either by inheritance (``base`` is setgid and the group's,
    as the packaged unit's drop-in makes ``/run/fabricd/trainers``: there the daemon may not
    chown) or by a chown (the daemon's user is in the group, or root)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    base = base or (str(Path(runtime) / RUNTIME_SUBDIR) if runtime else None)
    path = make_dir(record, base, prefix=_SHARED_PREFIX)
    if path is None:
        log.error("no directory for trainer sockets in %s%s: trainers of other users stream over TCP with "
                  "CurveZMQ", base or tempfile.gettempdir(),
                  " (under systemd, scripts/install.sh --trainer-group G makes it)" if runtime else "")
        return None
    try:
        if os.stat(path).st_gid != gid:
            os.chown(path, -1, gid)
        os.chmod(path, SHARED_DIR_MODE)
    except OSError as e:
        log.error("cannot share %s with group %d (%s; is the daemon's user in that group?): trainers of "
                  "other users stream over TCP with CurveZMQ", path, gid, e)
        remove_dir(path)
        return None
    return path


def share_socket(directory: str | Path, tcp_endpoint: str) -> None:
    """Let whoever can enter ``directory`` connect to the socket of ``tcp_endpoint`` bound there
    (the process's umask decided its mode): its group too, in the shared directory; in the
    private one (0700) that is its owner alone all the same. Raises OSError."""
    os.chmod(socket_file(directory, tcp_endpoint), SHARED_SOCKET_MODE)


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
    if previous.name.startswith((_PREFIX, _SHARED_PREFIX)):
        remove_dir(previous)


def remove_dir(path: str | Path | None) -> None:
    """Remove the directory and any socket a killed role left in it (never raises)."""
    if path:
        shutil.rmtree(path, ignore_errors=True)
