"""The daemon as a systemd service: readiness, status, watchdog, stop and live reload.

:class:`ServiceLifecycle` is driven by the daemon's loop, once per turn (``turn(now)``), and by
its ``stop()``. Through a :class:`~fabricd.sdnotify.SystemdNotifier` it tells the service
manager (``Type=notify``):

- ``READY=1`` after the first full loop turn (the control socket is bound and the cluster,
  leadership and reconciler ran once): the daemon serves;
- ``STATUS=leader L term T ...`` whenever that line changes;
- ``WATCHDOG=1`` at most every half ``WatchdogSec=``, and only when :meth:`health_problem` finds
  nothing: a loop that wedges, or a daemon whose sockets are gone, stops pinging and is
  restarted by systemd;
- ``STOPPING=1`` when the daemon is asked to stop.

Reload (SIGHUP): :meth:`request_reload` only sets a flag, so it is safe in a signal handler; the
next turn re-reads the config file and calls each of :attr:`reload_hooks` with it, bracketed by
``RELOADING=1`` and ``READY=1``. What can change live is what a hook applies (the log level; the
key allow-lists); everything else in the file takes effect at the next restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import NodeConfig, load_node_config
from .errors import FabricdError
from .sdnotify import SystemdNotifier

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["ReloadHook", "ServiceLifecycle"]

log = logging.getLogger(__name__)

#: Applies what can change live from a re-read node config; may raise (logged, others still run).
ReloadHook = Callable[[NodeConfig], None]


class ServiceLifecycle:
    """What the service manager learns from one daemon, and the reloads it asks for."""

    def __init__(self, daemon: Daemon, notifier: SystemdNotifier | None = None) -> None:
        self.daemon = daemon
        self.notifier = notifier if notifier is not None else SystemdNotifier({}, unset_environment=False)
        #: called in order with the re-read config on each reload (SIGHUP)
        self.reload_hooks: list[ReloadHook] = []
        self.counters = {"reloads": 0, "reload_errors": 0, "health_failures": 0}
        self._ready = False
        self._reload_requested = False
        self._health_logged: str | None = None

    # -- called by the daemon --------------------------------------------------------------------

    def turn(self, now: float) -> None:
        """One loop turn finished its work at monotonic ``now``: reload if asked, then report."""
        if self._reload_requested:
            self._reload(now)
        line = self.status_line(now)
        if not self._ready:
            self._ready = True
            log.info("serving: %s", line)
            self.notifier.ready(line)
        else:
            self.notifier.status(line)
        if self.notifier.watchdog_due(now):
            problem = self.health_problem()
            if problem is None:
                self.notifier.watchdog(now)
            else:
                self.counters["health_failures"] += 1
                if problem != self._health_logged:
                    log.error("health check failed: %s; the systemd watchdog is not pinged", problem)
            self._health_logged = problem

    def stopping(self) -> None:
        """The daemon was asked to stop (safe from a signal handler)."""
        self.notifier.stopping("stopping")

    def request_reload(self) -> None:
        """Re-read the config at the next loop turn (safe from a signal handler)."""
        self._reload_requested = True

    # -- what is reported ------------------------------------------------------------------------

    def status_line(self, now: float) -> str:
        """One line for ``systemctl status``: the leader and term, jobs and local roles."""
        d = self.daemon
        leader = d.cluster.leader
        mine = " (this node)" if leader == d.cfg.node_id and d.cluster.is_leader(now) else ""
        return (f"leader {leader or '-'} term {d.cluster.term}{mine}; {len(d.jobs)} jobs, "
                f"{len(d.supervisor.roles)} local roles")

    def health_problem(self) -> str | None:
        """Why the watchdog must not be pinged, or None: the loop turns (the caller is one turn)
        and the control socket and ZeroMQ context are open."""
        if self.daemon.sock.closed:
            return "control socket closed"
        if self.daemon.ctx.closed:
            return "ZeroMQ context terminated"
        return None

    # -- reload ----------------------------------------------------------------------------------

    def _reload(self, now: float) -> None:
        self._reload_requested = False
        self.counters["reloads"] += 1
        self.notifier.reloading()
        path = self.daemon.cfg.file
        try:
            cfg = load_node_config(path)
        except FabricdError as e:
            self.counters["reload_errors"] += 1
            log.error("reload: %s; the running config stays", e)
        else:
            if cfg.node_id != self.daemon.cfg.node_id:
                self.counters["reload_errors"] += 1
                log.error("reload: %s: node.id = %r differs from the running %r; restart to change it; "
                          "nothing reloaded", path, cfg.node_id, self.daemon.cfg.node_id)
            else:
                log.info("reload: re-read %s", path)
                for hook in list(self.reload_hooks):
                    try:
                        hook(cfg)
                    except Exception:  # one bad hook must stop neither the others nor the daemon
                        self.counters["reload_errors"] += 1
                        log.exception("reload: %s failed", getattr(hook, "__qualname__", repr(hook)))
        self.notifier.ready(self.status_line(now))
