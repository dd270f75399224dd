"""Role processes as supervised children: started, watched, restarted with backoff, ended by pid.

The supervisor is polled from the daemon's event loop (no thread): ``poll()`` notices exits and
restarts what is due. A role that keeps crashing is restarted with exponential backoff up to a
maximum, so a poison input cannot turn into a fork storm.

Roles are forked from the daemon's role template (:mod:`fabricd.roles.template`), a preloaded
process, so that every role shares the interpreter and its libraries copy-on-write instead of
importing them privately; a forked role is still this process's own child (the template
double-forks and the daemon adopts the role as child subreaper), waited for and killed by pid
like a spawned one. Until the template is ready (the first second or two after the first role
is asked for) roles wait for it; when it cannot serve (it died, timed out, or this is not Linux)
a role is spawned instead (``python -m fabricd.roles ARGS_JSON``). After ``MAX_TEMPLATE_FAILURES``
failures in a row the template is given up and every role is spawned. ``FABRICD_ROLE_TEMPLATE=0``
in the daemon's environment spawns every role from the start.
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
from .template import MEMORY_ENV, ForkedRole, RoleTemplate, TemplateError

__all__ = ["RoleProcess", "Supervisor", "TEMPLATE_ENV", "MAX_TEMPLATE_FAILURES"]

log = logging.getLogger(__name__)

#: ``0`` in the daemon's environment: spawn every role (no template)
TEMPLATE_ENV = "FABRICD_ROLE_TEMPLATE"
#: template failures in a row (it died, timed out, refused) after which every role is spawned
MAX_TEMPLATE_FAILURES = 3


@dataclass
class RoleProcess:
    """One role's child process and what the daemon knows about it."""

    args: RoleArgs
    proc: subprocess.Popen | ForkedRole | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    endpoint: str | None = None        # announced by RoleHello
    last_seen: float = 0.0
    stats: protocol.RoleCounters = field(default_factory=protocol.RoleCounters)
    exit_codes: list[int] = field(default_factory=list)
    waiting: bool = False              # to be started once the role template is ready
    forked: bool = False               # forked from the role template (else spawned)

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
                 env: dict[str, str] | None = None, template: bool | None = None) -> None:
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.env = env
        self.roles: dict[str, RoleProcess] = {}
        if template is None:
            template = (os.environ if env is None else env).get(TEMPLATE_ENV, "1") != "0"
        #: the role template, or None: every role spawned (turned off, or given up)
        self.template: RoleTemplate | None = RoleTemplate(self._child_env, clock=clock) if template else None
        self._failures_seen = 0      # the template's failures and forks counted so far
        self._forks_seen = 0
        self._failures_in_a_row = 0
        # pid → psutil handle: CPU percent is measured between two calls on one handle (a fresh
        # handle always reads 0.0), and the metrics read CPU seconds and RSS through it too
        self._handles: dict[int, psutil.Process] = {}

    def start(self, args: RoleArgs) -> RoleProcess:
        role = self.roles.get(args.role_id) or RoleProcess(args)
        self.roles[args.role_id] = role
        self._spawn(role)
        return role

    def _spawn(self, role: RoleProcess) -> None:
        """Start ``role``'s process: forked by the template when it can, else spawned; or, while the
        template is getting ready, marked ``waiting`` (``poll()`` starts it)."""
        role.restart_at = None
        role.endpoint = None
        role.proc = None
        template = self._usable_template(role.args)
        if template is not None and not template.ready():
            if template.starting:  # still importing: start the role once it is ready
                if not role.waiting:
                    log.debug("%s %s waits for the role template", role.args.kind, role.role_id)
                role.waiting = True
                return
            template = None  # it has just failed: spawn this one (the next start launches it again)
            self._note_template_failures()
        role.waiting = False
        if template is not None:
            try:
                role.proc = ForkedRole(template.fork(role.args.to_json()))
                role.forked = True
            except TemplateError as e:
                log.warning("role template could not fork %s (%s); spawning it", role.role_id, e)
                self._note_template_failures()
        if role.proc is None:
            role.proc = subprocess.Popen([sys.executable, "-m", "fabricd.roles", role.args.to_json()],
                                         env=self._child_env(), stdin=subprocess.DEVNULL)
            role.forked = False
        role.started_at = self.clock()
        log.info("started %s %s (pid %d, %s)", role.args.kind, role.role_id, role.proc.pid,
                 "forked from the role template" if role.forked else "spawned")

    def _usable_template(self, args: RoleArgs) -> RoleTemplate | None:
        """The template, launched if it is not running; None once it is given up."""
        self._note_template_failures()
        if self.template is None:
            return None
        if self.template.proc is None:
            try:
                # the tag: the daemon's state directory (where the job specs live), for tools that
                # find a fabric's processes by path in their command lines
                self.template.start(tag=os.path.dirname(os.path.dirname(os.path.abspath(args.spec_path))))
            except (TemplateError, OSError) as e:
                log.warning("no role template (%s): roles are spawned", e)
                self.template = None
                return None
        return self.template

    def _note_template_failures(self) -> None:
        """Give the template up after MAX_TEMPLATE_FAILURES failures with no fork in between."""
        t = self.template
        if t is None:
            return
        if t.forks > self._forks_seen:
            self._forks_seen = t.forks
            self._failures_in_a_row = 0
        if t.failures > self._failures_seen:
            self._failures_in_a_row += t.failures - self._failures_seen
            self._failures_seen = t.failures
            if self._failures_in_a_row >= MAX_TEMPLATE_FAILURES:
                log.error("the role template failed %d times in a row (last: %s); every role is spawned from now on",
                          self._failures_in_a_row, t.last_error)
                t.stop()
                self.template = None

    def _child_env(self) -> dict[str, str]:
        """The environment of a role process (and of the role template): the daemon's, with
        ``FABRICD_ROLE_FAILPOINTS`` (if any) as its failpoints instead of the daemon's own (see
        ``fabricd.failpoints``), and the memory settings of ``template.MEMORY_ENV`` unless set."""
        env = dict(os.environ if self.env is None else self.env)
        for key, value in MEMORY_ENV.items():
            env.setdefault(key, value)
        env.pop(FAILPOINTS_ENV, None)
        role_points = env.pop(ROLE_FAILPOINTS_ENV, "")
        if role_points:
            env[FAILPOINTS_ENV] = role_points
        return env

    def poll(self) -> list[RoleProcess]:
        """Reap exited roles and restart the ones whose backoff has passed; start the ones waiting
        for the role template; returns the exited ones."""
        now = self.clock()
        exited = []
        for role in self.roles.values():
            if role.waiting:
                self._spawn(role)
                continue
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
        if self.template is not None and self.template.proc is not None:
            self.template.ready()  # notices a template that died (counted; launched again when needed)
            self._note_template_failures()
        return exited

    def stop(self, role_ids: list[str] | None = None, timeout: float = 5.0) -> None:
        """SIGTERM the roles (all by default), SIGKILL whatever is left after ``timeout``, reap all.
        Stopping all of them ends the role template too (a later ``start`` launches it again)."""
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
        if role_ids is None and self.template is not None:
            self.template.stop(timeout)

    def template_status(self) -> dict[str, Any]:
        """The role template: pid, ready, forks, failures, last error; ``{"enabled": False}`` when
        roles are spawned."""
        if self.template is None:
            return {"enabled": False}
        return {"enabled": True, **self.template.status()}

    def process(self, role: RoleProcess) -> psutil.Process | None:
        """The psutil handle of a running role's process (one per pid, kept), or None."""
        if not role.alive:
            return None
        pid = role.proc.pid
        handle = self._handles.get(pid)
        if handle is None:
            if len(self._handles) > 2 * len(self.roles) + 8:  # forget the pids of exited roles
                live = {r.pid for r in self.roles.values()}
                self._handles = {p: h for p, h in self._handles.items() if p in live}
            try:
                handle = self._handles[pid] = psutil.Process(pid)
            except psutil.Error:
                return None
        return handle

    def telemetry(self, role: RoleProcess) -> dict[str, Any]:
        """RSS and CPU percent (since the previous call) of one role process, or {} if it is
        not running."""
        p = self.process(role)
        if p is None:
            return {}
        try:
            with p.oneshot():
                return {"rss_mb": round(p.memory_info().rss / 2**20, 1), "cpu_percent": p.cpu_percent(None)}
        except psutil.Error:
            self._handles.pop(p.pid, None)
            return {}
