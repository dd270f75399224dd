"""CurveZMQ keys: who may talk to the fabric, and as whom.

A *keys directory* holds every key of one fabric, one certificate file per key (the ZPL format
of pyzmq's ``zmq.auth``: ``NAME.key`` holds the public key, ``NAME.key_secret`` the key pair)::

    keys/
      server.key  server.key_secret        the fabric's server key: every served socket
      nodes/NODE_ID.key[_secret]           one per daemon: peers, and its own role processes
      trainers/NAME.key[_secret]           trainers (``Loader``): Locate, and their stream
      operators/NAME.key[_secret]          operators (``fabricctl``): submit, cancel, status

Every node holds the server key pair, its own node key pair and the *public* keys of everyone
else (the allow-lists); a trainer holds its own key pair and ``server.key``; so does an operator.
A caller is known by the key it authenticated with (the ZAP User-Id ``kind:name``), never by a
name a message declares. ``fabricctl keys generate`` makes keys; ``fabricctl keys list`` shows them.

Clients find their key with ``keys=`` (a :class:`ClientKeys` or the path of a ``.key_secret``
file) or the environment: ``FABRIC_KEY`` for trainers, ``FABRICCTL_KEY`` for operators. The server
key is ``server.key`` in the keys directory above the key file (``keys/trainers/x.key_secret`` →
``keys/server.key``), unless ``FABRIC_SERVER_KEY`` names it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth import load_certificate

__all__ = ["KINDS", "ClientKeys", "KeyPair", "KeyRing", "KeysError", "client_keys_from_env", "generate", "list_keys"]

#: kinds of key → their sub-directory of the keys directory
KINDS = {"node": "nodes", "trainer": "trainers", "operator": "operators"}
SERVER = "server"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class KeysError(ValueError):
    """A key file that is missing, unreadable or malformed, or a bad key name (the message names it)."""


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KeysError(f"key name {name!r}: expected 1-128 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    return name


def _write(path: Path, public: bytes, secret: bytes | None) -> None:
    text = ("#   ZeroMQ CURVE certificate written by fabricctl keys generate\n"
            + ("#   THIS FILE IS SECRET: keep it mode 0600\n" if secret else "")
            + "metadata\ncurve\n" + f'    public-key = "{public.decode()}"\n'
            + (f'    secret-key = "{secret.decode()}"\n' if secret else ""))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def generate(keys_dir: str | Path, kind: str, name: str = SERVER) -> tuple[Path, Path]:
    """Make a key pair: ``keys_dir/<kind dir>/NAME.key`` and ``.key_secret`` (mode 0600), or the
    server key with ``kind="server"``. Never overwrites: an existing key is an error."""
    keys_dir = Path(keys_dir)
    if kind == SERVER:
        folder, name = keys_dir, SERVER
    elif kind in KINDS:
        folder = keys_dir / KINDS[kind]
        _check_name(name)
    else:
        raise KeysError(f"key kind {kind!r}: expected one of server, {', '.join(KINDS)}")
    folder.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = folder / f"{name}.key", folder / f"{name}.key_secret"
    for f in (public_file, secret_file):
        if f.exists():
            raise KeysError(f"{f} exists already (remove it first to replace the key)")
    public, secret = zmq.curve_keypair()
    _write(secret_file, public, secret)
    _write(public_file, public, None)
    return public_file, secret_file


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeysError(f"{path}: cannot read the key: {e}") from None
    if len(public) != 40 or (secret and (secret_key is None or len(secret_key) != 40)):
        raise KeysError(f"{path}: not a CURVE {'key pair' if secret else 'public key'} (40-character Z85 keys)")
    return public, secret_key


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes

    @classmethod
    def load(cls, path: str | Path) -> KeyPair:
        public, secret = _load(Path(path), secret=True)
        assert secret is not None
        return cls(public, secret)


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs: its own key pair, and the fabric's server public key."""

    own: KeyPair
    server_public: bytes

    @classmethod
    def load(cls, key_file: str | Path, server_key: str | Path | None = None) -> ClientKeys:
        """``key_file``: a ``NAME.key_secret``; ``server_key``: ``server.key`` (by default the
        one in the keys directory above the key file, or ``FABRIC_SERVER_KEY``)."""
        key_file = Path(key_file)
        if server_key is None:
            server_key = os.environ.get("FABRIC_SERVER_KEY") or key_file.parent.parent / f"{SERVER}.key"
        public, _ = _load(Path(server_key), secret=False)
        return cls(KeyPair.load(key_file), public)


def client_keys_from_env(var: str) -> ClientKeys | None:
    """The client keys named by the environment variable ``var`` (None when it is unset or empty)."""
    path = os.environ.get(var)
    return ClientKeys.load(path) if path else None


def _first(candidates: list[Path]) -> Path:
    return next((p for p in candidates if p.is_file()), candidates[-1])


class KeyRing:
    """A node's view of a keys directory: its server key pair, its node key pair, and the public
    keys of every node, trainer and operator (the allow-lists), by public key.

    The two secrets are read from ``$CREDENTIALS_DIRECTORY`` when systemd provides them there
    (``LoadCredential=server.key_secret:...`` and ``node.key_secret:...``: they can stay readable
    by root alone), else from the keys directory (``server.key_secret``, then
    ``nodes/NODE_ID.key_secret`` or ``node.key_secret``)."""

    def __init__(self, keys_dir: str | Path, node_id: str, *, credentials: str | Path | None = None) -> None:
        self.keys_dir = Path(keys_dir)
        self.node_id = _check_name(node_id)
        if not self.keys_dir.is_dir():
            raise KeysError(f"keys directory {self.keys_dir} does not exist")
        creds = credentials if credentials is not None else os.environ.get("CREDENTIALS_DIRECTORY")
        first = [Path(creds)] if creds else []
        self.server = KeyPair.load(_first([d / f"{SERVER}.key_secret" for d in first] + [self.keys_dir / f"{SERVER}.key_secret"]))
        self.node = KeyPair.load(_first([d / "node.key_secret" for d in first] + [self.keys_dir / "node.key_secret",
                                         self.keys_dir / KINDS["node"] / f"{node_id}.key_secret"]))
        self.server_public = self.server.public
        self.users: dict[bytes, str] = {}  # public key → "kind:name"
        self.names: frozenset[str] = frozenset()
        self.counts: dict[str, int] = {}  # keys listed, per kind
        self.reload()

    def reload(self) -> dict[str, int]:
        """Read the allow-lists again (new keys, removed keys); returns the count per kind. The
        table is swapped whole: the authenticator thread never sees a half-read one."""
        users: dict[bytes, str] = {}
        counts = {}
        for kind, folder in KINDS.items():
            counts[kind] = 0
            for f in sorted((self.keys_dir / folder).glob("*.key")):
                public, _ = _load(f, secret=False)
                who = f"{kind}:{f.stem}"
                if public in users and users[public] != who:
                    raise KeysError(f"{f}: the same public key is also {users[public]}")
                users[public] = who
                counts[kind] += 1
        if users.get(self.node.public) != f"node:{self.node_id}":
            raise KeysError(f"{self.keys_dir / KINDS['node'] / (self.node_id + '.key')}: missing, or not the public "
                            "key of this node's secret key")
        self.users = users
        self.names = frozenset(users.values())
        self.counts = counts
        return counts

    def who(self, public_z85: bytes) -> str | None:
        """``kind:name`` of an allowed public key, or None."""
        return self.users.get(public_z85)

    def client(self) -> ClientKeys:
        """This node's client keys (peers, its role processes)."""
        return ClientKeys(self.node, self.server_public)


def list_keys(keys_dir: str | Path) -> list[dict[str, str]]:
    """Every key in a keys directory: kind, name, public key, and whether the secret is here."""
    keys_dir = Path(keys_dir)
    out = []
    for kind, folder in [(SERVER, None), *KINDS.items()]:
        files = [keys_dir / f"{SERVER}.key"] if folder is None else sorted((keys_dir / folder).glob("*.key"))
        for f in files:
            if not f.exists():
                continue
            public, _ = _load(f, secret=False)
            out.append({"kind": kind, "name": f.stem, "public_key": public.decode(),
                        "secret": "yes" if f.with_suffix(".key_secret").exists() else "no", "file": str(f)})
    return out
