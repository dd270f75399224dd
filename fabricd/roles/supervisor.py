"""Role processes as supervised children: started, watched, restarted with backoff, ended by pid.

The supervisor is polled from the daemon's event loop (no thread): ``poll()`` notices exits and
restarts what is due. A role that keeps crashing is restarted with exponential backoff up to a
maximum, so a poison input cannot turn into a fork storm.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from fabric_client import protocol

from ..failpoints import ENV_VAR as FAILPOINTS_ENV
from ..failpoints import ROLE_ENV as ROLE_FAILPOINTS_ENV
from .base import RoleArgs

__all__ = ["RoleProcess", "Supervisor"]

log = logging.getLogger(__name__)


@dataclass
class RoleProcess:
    """One role's child process and what the daemon knows about it."""

    args: RoleArgs
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    endpoint: str | None = None        # announced by RoleHello
    last_seen: float = 0.0
    stats: protocol.RoleCounters = field(default_factory=protocol.RoleCounters)
    exit_codes: list[int] = field(default_factory=list)

    @property
    def role_id(self) -> str:
        return self.args.role_id

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Starts role processes, restarts the ones that exit, and stops them all by pid."""

    def __init__(self, *, backoff_s: float, backoff_max_s: float, clock: Callable[[], float] = time.monotonic,
                 env: dict[str, str] | None = None) -> None:
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.env = env
        self.roles: dict[str, RoleProcess] = {}

    def start(self, args: RoleArgs) -> RoleProcess:
        role = self.roles.get(args.role_id) or RoleProcess(args)
        self.roles[args.role_id] = role
        self._spawn(role)
        return role

    def _spawn(self, role: RoleProcess) -> None:
        role.proc = subprocess.Popen([sys.executable, "-m", "fabricd.roles", role.args.to_json()],
                                     env=self._child_env(), stdin=subprocess.DEVNULL)
        role.started_at = self.clock()
        role.restart_at = None
        role.endpoint = None
        log.info("started %s %s (pid %d)", role.args.kind, role.role_id, role.proc.pid)

    def _child_env(self) -> dict[str, str]:
        """The environment of a role process: the daemon's, with ``FABRICD_ROLE_FAILPOINTS`` (if
        any) as its failpoints instead of the daemon's own (see ``fabricd.failpoints``)."""
        env = dict(os.environ if self.env is None else self.env)
        env.pop(FAILPOINTS_ENV, None)
        role_points = env.pop(ROLE_FAILPOINTS_ENV, "")
        if role_points:
            env[FAILPOINTS_ENV] = role_points
        return env

    def poll(self) -> list[RoleProcess]:
        """Reap exited roles and restart the ones whose backoff has passed; returns the exited ones."""
        now = self.clock()
        exited = []
        for role in self.roles.values():
            if role.proc is not None and role.restart_at is None:
                code = role.proc.poll()
                if code is not None:
                    role.exit_codes = (role.exit_codes + [code])[-10:]
                    role.endpoint = None
                    # a role that ran for a while before dying starts again at the base delay
                    ran = now - role.started_at
                    streak = 0 if ran > 30 else min(role.restarts, 16)
                    delay = min(self.backoff_max_s, self.backoff_s * (2 ** streak))
                    role.restart_at = now + delay
                    exited.append(role)
                    log.warning("%s %s (pid %d) exited with %s; restarting in %.1fs",
                                role.args.kind, role.role_id, role.proc.pid, code, delay)
            if role.restart_at is not None and now >= role.restart_at:
                role.restarts += 1
                self._spawn(role)
        return exited

    def stop(self, role_ids: list[str] | None = None, timeout: float = 5.0) -> None:
        """SIGTERM the roles (all by default), SIGKILL whatever is left after ``timeout``, reap all."""
        ids = list(self.roles) if role_ids is None else role_ids
        procs = []
        for rid in ids:
            role = self.roles.pop(rid, None)
            if role is not None and role.proc is not None and role.proc.poll() is None:
                role.proc.send_signal(signal.SIGTERM)
                procs.append(role.proc)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def telemetry(self, role: RoleProcess) -> dict[str, Any]:
        """RSS and CPU of one role process (psutil), or {} if it is not running."""
        if not role.alive:
            return {}
        try:
            p = psutil.Process(role.proc.pid)
            with p.oneshot():
                return {"rss_mb": round(p.memory_info().rss / 2**20, 1), "cpu_percent": p.cpu_percent(None)}
        except psutil.Error:
            return {}
