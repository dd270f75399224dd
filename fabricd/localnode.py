"""A fabricd daemon as a local child process: for the demo, benchmarks, tests and trying things.

``LocalDaemon`` writes a node config into a work directory, starts ``python -m fabricd run``,
waits for its control endpoint, and on exit stops it and every process it started, by pid
(SIGTERM, then SIGKILL after a grace period), so nothing is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fabric_client import protocol

from .ctl import ControlClient

__all__ = ["LocalDaemon"]


class LocalDaemon:
    """One daemon process with its config, state and log under ``workdir``."""

    def __init__(self, workdir: str | Path, *, node_id: str = "local", loader_workers: int = 1,
                 log_level: str = "INFO", extra_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        self.node_id = node_id
        self.loader_workers = loader_workers
        self.log_level = log_level
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.config_path = self.workdir / "fabricd.toml"
        self.log_path = self.workdir / "fabricd.log"
        self._log_file = None

    def start(self, timeout: float = 30.0) -> str:
        """Start the daemon; return its control endpoint once it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = self.workdir / "state"
        endpoint_file = state / "control.endpoint"
        endpoint_file.unlink(missing_ok=True)
        self.config_path.write_text(
            f'[node]\nid = "{self.node_id}"\ncontrol = "tcp://127.0.0.1:0"\nadvertise_host = "127.0.0.1"\n'
            f'state_dir = "{state}"\nlog_level = "{self.log_level}"\n\n'
            f"[roles]\nloader_workers = {self.loader_workers}\nrestart_backoff_s = 0.2\n"
            "restart_backoff_max_s = 2.0\nheartbeat_s = 0.5\n"
        )
        self._log_file = open(self.log_path, "ab")
        env = {**os.environ, **self.extra_env}
        self.proc = subprocess.Popen([sys.executable, "-m", "fabricd", "run", "--config", str(self.config_path)],
                                     stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fabricd exited with {self.proc.returncode}; see {self.log_path}:\n{self.tail()}")
            if endpoint_file.exists():
                self.address = endpoint_file.read_text().strip()
                with ControlClient(self.address, timeout_s=2.0, retries=0) as client:
                    try:
                        client.request(protocol.Hello(protocol=protocol.PROTOCOL_VERSION, peer="ctl"))
                        return self.address
                    except Exception:  # not answering yet
                        pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fabricd did not come up within {timeout:.0f}s; see {self.log_path}:\n{self.tail()}")

    def client(self, timeout_s: float = 10.0) -> ControlClient:
        if self.address is None:
            raise RuntimeError("daemon not started")
        return ControlClient(self.address, timeout_s=timeout_s)

    def status(self) -> dict:
        with self.client() as c:
            reply, _ = c.request(protocol.StatusRequest())
        return reply.status

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemon (SIGTERM → SIGKILL) and kill any descendant that outlived it."""
        if self.proc is None:
            return
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=5)
        if self._log_file is not None:
            self._log_file.close()
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> LocalDaemon:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
