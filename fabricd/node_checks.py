"""What a node config can get wrong beyond its types: endpoint and host syntax (checked when the
config is loaded, by :mod:`fabricd.config`), and the machine it runs on (checked by ``fabricd
run`` before the daemon starts: :func:`check_node_environment`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import NodeConfig

__all__ = ["valid_host", "endpoint_problem", "check_node_environment"]

_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def valid_host(host: str) -> bool:
    """A DNS name (RFC 1123 labels), an IPv4 or a bracket-less IPv6 address, or ``*``."""
    if host == "*":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host or len(host) > 253 or not set(host) <= _HOST_CHARS:
        return False
    return all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
               for label in host.rstrip(".").split("."))


def endpoint_problem(value: str, *, bind: bool) -> str | None:
    """Why ``value`` is not a ``tcp://HOST:PORT`` (``[v6]`` brackets allowed; port 0 = any and
    host ``*`` only where ``bind``) or ``ipc://PATH`` endpoint; None when it is one."""
    if value.startswith("ipc://"):
        return "ipc:// needs a path" if len(value) == len("ipc://") else None
    if not value.startswith("tcp://"):
        return "expected a tcp://HOST:PORT or ipc://PATH endpoint"
    hostport = value[len("tcp://"):]
    host, sep, port = hostport.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        return "expected tcp://HOST:PORT (the host is missing)"
    if not port.isdigit() or not (0 if bind else 1) <= int(port) <= 65535:
        return f"port {port!r} must be an integer in {0 if bind else 1}..65535"
    if not valid_host(host) or (not bind and host == "*"):
        return f"host {host!r} is not a host name or IP address"
    return None


def check_node_environment(cfg: NodeConfig) -> None:
    """Check what a valid config can still get wrong on this machine, before the daemon starts:
    ``node.state_dir`` is a writable directory, and ``node.advertise_host`` and the host of
    ``node.control`` resolve to an address of this machine that roles can bind. Raises
    :class:`ConfigError` naming the key and the value."""
    state_dir = cfg.state_dir
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(cfg.file, "node.state_dir", str(state_dir), "exists and is not a directory")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(cfg.file, "node.state_dir", str(state_dir),
                          f"not a writable directory: {e.strerror or e}") from e
    hosts = [("node.advertise_host", cfg.advertise_host, cfg.advertise_host)]
    if cfg.control.startswith("tcp://"):
        host = cfg.control[len("tcp://"):].rpartition(":")[0].strip("[]")
        if host != "*":
            hosts.append(("node.control", cfg.control, host))
    for key, value, host in hosts:
        try:
            infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise ConfigError(cfg.file, key, value, f"host {host!r} does not resolve: {e}") from e
        family, _, _, _, addr = infos[0]
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
        except OSError as e:
            raise ConfigError(cfg.file, key, value,
                              f"{host!r} ({addr[0]}) is not an address of this machine: {e.strerror or e}") from e
