"""A real ``fabricd run`` under a notify socket the test binds, as systemd's ``Type=notify`` runs
it: READY=1 with a status line naming the leader and term, WATCHDOG=1 pings, a SIGHUP reload
(RELOADING=1, the new log level applied, READY=1 again) and STOPPING=1 on SIGTERM."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from fabricd.localnode import LocalDaemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class NotifyListener:
    """The service manager's side: an AF_UNIX datagram socket collecting notifications."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0,
                 after: int = 0) -> dict[str, str]:
        """The first message (index >= ``after``) carrying ``key`` (= ``value``), polling the socket."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages[after:]:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {self.messages}")
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def test_ready_status_watchdog_reload_stopping(tmp_path, notify):
    d = LocalDaemon(tmp_path / "d", node_id="solo", log_level="INFO",
                    extra_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    try:
        d.start()
        ready = notify.wait_for("READY", "1")
        assert ready["STATUS"].startswith("leader "), ready
        # a cluster of one leads at once: the status line follows (term 1, this node)
        status = notify.wait_for("STATUS", None)
        deadline = time.monotonic() + 30
        while "leader solo term 1 (this node)" not in status["STATUS"]:
            assert time.monotonic() < deadline, notify.messages
            status = notify.wait_for("STATUS", None, after=notify.messages.index(status) + 1)
        first = notify.messages.index(notify.wait_for("WATCHDOG", "1"))
        notify.wait_for("WATCHDOG", "1", after=first + 1)  # pinged again, not once
        assert "STOPPING" not in {k for m in notify.messages for k in m}

        # SIGHUP: re-read the config; the new log level applies without a restart
        d.config_path.write_text(d.config_path.read_text().replace('log_level = "INFO"', 'log_level = "DEBUG"'))
        mark = len(notify.messages)
        d.signal(signal.SIGHUP)
        reloading = notify.messages.index(notify.wait_for("RELOADING", "1", after=mark))
        notify.wait_for("READY", "1", after=reloading + 1)
        deadline = time.monotonic() + 10
        while "reload: log level INFO -> DEBUG" not in d.log_path.read_text():
            assert time.monotonic() < deadline, d.tail()
            time.sleep(0.05)
        assert d.proc is not None and d.proc.poll() is None  # still serving

        mark = len(notify.messages)
        d.signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", "1", after=mark)
        assert stopping["STATUS"] == "stopping"
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_no_notify_socket_still_serves(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    d = LocalDaemon(tmp_path / "d", node_id="plain")
    try:
        d.start()
        assert d.status()["node"] == "plain"
    finally:
        d.stop()
