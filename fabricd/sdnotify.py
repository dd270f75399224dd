"""Tell systemd how the daemon is doing: the ``sd_notify`` protocol, without libsystemd.

A unit with ``Type=notify`` starts the daemon with ``$NOTIFY_SOCKET`` naming an ``AF_UNIX``
datagram socket the service manager listens on. Each notification is one datagram of
newline-separated ``KEY=VALUE`` lines: ``READY=1`` (startup finished), ``STATUS=...`` (a line
for ``systemctl status``), ``WATCHDOG=1`` (alive; with ``WatchdogSec=`` systemd kills and
restarts a daemon that stops sending it), ``RELOADING=1`` and ``STOPPING=1``. A socket name
starting with ``@`` is in the Linux abstract namespace (the ``@`` stands for a leading NUL byte).
With the watchdog on, systemd also sets ``$WATCHDOG_USEC`` (the timeout in microseconds) and
``$WATCHDOG_PID`` (the process it applies to; another process must ignore it).

:class:`SystemdNotifier` is a no-op when ``$NOTIFY_SOCKET`` is unset (the daemon run by hand or
by a test), and never raises: a notification that cannot be sent is counted and logged (rate
limited), and the daemon keeps serving. By default it removes the three variables from the
environment once read, so the role processes the daemon spawns neither inherit the socket nor
believe the watchdog is theirs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["NOTIFY_ENV", "SystemdNotifier", "parse_notify_address", "watchdog_interval_s"]

log = logging.getLogger(__name__)

NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
#: Longest STATUS= text sent (systemd shows one line; a datagram must stay small).
MAX_STATUS_CHARS = 512
#: Seconds between repeated log lines about notifications that cannot be sent.
SEND_ERROR_LOG_EVERY_S = 60.0


def parse_notify_address(value: str) -> str | bytes | None:
    """The ``sendto`` address of a ``$NOTIFY_SOCKET`` value: a filesystem path (str), an abstract
    name (bytes with a leading NUL, from ``@name``), or None for a value this notifier cannot use
    (empty, relative, or another transport such as ``vsock:``)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8", "surrogateescape") if len(value) > 1 else None
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds that applies to process ``pid``, or None when the watchdog
    is off: ``$WATCHDOG_USEC`` unset, not a positive integer, or ``$WATCHDOG_PID`` set to
    another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1e6


class SystemdNotifier:
    """Sends sd_notify datagrams to the service manager, if there is one.

    ``environ`` defaults to ``os.environ``; with ``unset_environment`` (the default) the notify
    variables are removed from it once read. ``enabled`` says whether a socket was given;
    ``watchdog_s`` is the watchdog timeout (None: off). ``counters`` counts datagrams ``sent``
    and ``failed``, and ``watchdog`` pings.
    """

    def __init__(self, environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = True,
                 pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = parse_notify_address(raw)
        self.watchdog_s = watchdog_interval_s(env, os.getpid() if pid is None else pid) if self.address else None
        if unset_environment:
            for key in NOTIFY_ENV:
                env.pop(key, None)
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET = %r: not a path or @abstract name; systemd notifications are off", raw)
        self.counters = {"sent": 0, "failed": 0, "watchdog": 0}
        self._sock: socket.socket | None = None
        self._last_error_logged: float | None = None
        self._next_watchdog_at: float | None = None
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True iff it was sent. Values are made one line
        (a newline would start another key); nothing is sent when notifications are off."""
        if self.address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ").replace("\r", " ")
            lines.append(f"{key}={text}")
        payload = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError as e:
            self.counters["failed"] += 1
            now = time.monotonic()
            if self._last_error_logged is None or now - self._last_error_logged >= SEND_ERROR_LOG_EVERY_S:
                self._last_error_logged = now
                log.warning("cannot notify systemd at %r (%s); %d notifications failed so far",
                            self.address, e, self.counters["failed"])
            return False
        self.counters["sent"] += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: the daemon serves (``READY=1``, with a status line if given)."""
        if status is None:
            return self.notify(READY=1)
        self._last_status = status[:MAX_STATUS_CHARS]
        return self.notify(READY=1, STATUS=self._last_status)

    def status(self, text: str) -> bool:
        """Set the line ``systemctl status`` shows; an unchanged line is not sent again."""
        text = text[:MAX_STATUS_CHARS]
        if text == self._last_status:
            return False
        self._last_status = text
        return self.notify(STATUS=text)

    def watchdog_due(self, now: float) -> bool:
        """True when a ``WATCHDOG=1`` ping is due at monotonic ``now``: the watchdog is on and half
        its timeout passed since the last ping (the first ping is due at once)."""
        return self.watchdog_s is not None and (self._next_watchdog_at is None or now >= self._next_watchdog_at)

    def watchdog(self, now: float) -> bool:
        """Ping the watchdog if due at ``now`` (at most every half timeout); True iff sent. Call it
        only after the daemon's own health check passed: a daemon that stops pinging is restarted."""
        interval = self.watchdog_s
        if interval is None or not self.watchdog_due(now):
            return False
        self._next_watchdog_at = now + interval / 2
        sent = self.notify(WATCHDOG=1)
        if sent:
            self.counters["watchdog"] += 1
        return sent

    def reloading(self) -> bool:
        """A reload (SIGHUP) started; ``ready()`` ends it. Carries ``MONOTONIC_USEC`` as systemd's
        ``Type=notify-reload`` asks."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        """The daemon is shutting down (``STOPPING=1``)."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status[:MAX_STATUS_CHARS])

    def close(self) -> None:
        """Close the socket; later notifications open it again."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
