"""A real etcd server for tests: its own ports, its own data dir, stopped by pid.

Debian's ``etcd-server`` package installs ``/usr/bin/etcd`` (and a systemd service on the default
ports 2379/2380, which these servers never touch: they listen on free ports). Without the binary
the tests that need one skip, saying so; ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from fabricd.localnode import free_port

__all__ = ["ETCD_BINARY", "EtcdServer", "etcd_missing"]

ETCD_BINARY = os.environ.get("FABRIC_TEST_ETCD") or shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT_S = 20.0


def etcd_missing() -> str | None:
    """Why no etcd server can be started here, or None."""
    if not os.access(ETCD_BINARY, os.X_OK):
        return (f"etcd not found ({ETCD_BINARY}): install Debian's etcd-server package "
                "(.ci/run does) to run the etcd lease backend tests")
    return None


class EtcdServer:
    """One single-member etcd cluster under ``workdir``; ``url`` is its client endpoint."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a free port can be taken between picking and binding it
            client, peer = free_port(), free_port()
            self.url = f"http://127.0.0.1:{client}"
            data = self.workdir / f"data-{attempt}"
            self._log = open(self.workdir / f"etcd-{attempt}.log", "wb")
            self.proc = subprocess.Popen(
                [ETCD_BINARY, "--name", "test", "--data-dir", str(data),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-cluster", f"test=http://127.0.0.1:{peer}", "--initial-cluster-state", "new"],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_healthy():
                return self.url
            self.stop()
        raise RuntimeError(f"etcd did not become healthy; see {self.workdir}")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1.0) as r:
                    if b'"true"' in r.read():
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def pause(self) -> None:
        """SIGSTOP the server: calls to it time out (an unreachable etcd)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
