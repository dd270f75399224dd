"""Test hosts in Linux network namespaces, so chaos runs can partition daemons for real.

``NetnsLab`` makes one namespace per host, each with a veth pair into a bridge in the root
namespace (private addresses on a /24 of its own), so daemons in different namespaces, and
trainers in the root namespace, reach each other over a real (virtual) network. ``partition``
takes a host's link down — it can neither send nor receive — and ``heal`` brings it back.
Needs root and iproute2; ``available()`` says whether this machine allows it.
"""

from __future__ import annotations

import os
import secrets
import subprocess

__all__ = ["NetnsLab", "available"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def available() -> bool:
    """True when network namespaces can be created here (root, iproute2, kernel support)."""
    if os.geteuid() != 0:
        return False
    name = f"fabprobe{secrets.token_hex(3)}"
    try:
        if _ip("netns", "add", name, check=False).returncode != 0:
            return False
        _ip("netns", "del", name, check=False)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


class NetnsLab:
    """``hosts`` namespaces on one bridge; host ``i`` has address ``self.addresses[i]``."""

    def __init__(self, hosts: int) -> None:
        tag = secrets.token_hex(3)
        self.subnet = 10 + secrets.randbelow(240)   # 10.231.<subnet>.0/24: unlikely to collide
        self.bridge = f"fbr{tag}"
        self.namespaces = [f"fab{tag}{i}" for i in range(hosts)]
        self.addresses = [f"10.231.{self.subnet}.{i + 2}" for i in range(hosts)]
        self._veths = [(f"fv{tag}{i}", f"fp{tag}{i}") for i in range(hosts)]
        self._made: list[tuple[str, str]] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"10.231.{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for ns, (inner, outer), addr in zip(self.namespaces, self._veths, self.addresses):
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            self._made.append(("link", outer))
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def command(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace (exec'd: the pid is the program's)."""
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def partition(self, host: int) -> None:
        """Cut host ``host`` off the network (both directions)."""
        _ip("link", "set", self._veths[host][1], "down")

    def heal(self, host: int) -> None:
        _ip("link", "set", self._veths[host][1], "up")

    def close(self) -> None:
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made = []
