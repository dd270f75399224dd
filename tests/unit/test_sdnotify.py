"""sd_notify: addresses, the watchdog interval, datagrams on a socket the test binds (path and
abstract), rate limiting of WATCHDOG=1 by the injected time, and failures that never raise."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from fabricd.sdnotify import SystemdNotifier, parse_notify_address, watchdog_interval_s

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


@pytest.fixture
def listener(tmp_path):
    """An AF_UNIX datagram socket bound at a path, as systemd binds /run/systemd/notify."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def _recv(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def _nothing_queued(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_parse_notify_address():
    assert parse_notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_notify_address("@/org/freedesktop/systemd1/notify") == b"\0/org/freedesktop/systemd1/notify"
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert parse_notify_address(unusable) is None, unusable


def test_watchdog_interval():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid=7) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "7"}, pid=7) == 0.5
    assert watchdog_interval_s({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "8"}, pid=7) is None  # another process's
    for bad in ("", "0", "-5", "1e6", "abc"):
        assert watchdog_interval_s({"WATCHDOG_USEC": bad}, pid=7) is None, bad
    assert watchdog_interval_s({}, pid=7) is None


def test_off_without_socket_sends_nothing_and_never_raises():
    n = SystemdNotifier({})
    assert not n.enabled and n.watchdog_s is None
    assert n.ready("x") is False and n.status("y") is False and n.stopping() is False
    assert n.watchdog_due(0.0) is False and n.watchdog(0.0) is False
    assert n.counters == {"sent": 0, "failed": 0, "watchdog": 0}


def test_datagrams_reach_a_bound_socket(listener):
    path, sock = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "1"}
    n = SystemdNotifier(env)
    assert env == {"OTHER": "1"}  # unset: children must not inherit the socket or the watchdog
    assert n.enabled and n.watchdog_s == 2.0
    assert n.ready("leader a term 3") is True
    assert _recv(sock) == {"READY": "1", "STATUS": "leader a term 3"}
    assert n.status("leader a term 3") is False  # unchanged: not sent again
    assert n.status("leader b\nterm 4") is True
    assert _recv(sock) == {"STATUS": "leader b term 4"}  # a newline cannot smuggle in another key
    assert n.stopping() is True
    assert _recv(sock) == {"STOPPING": "1"}
    assert n.reloading() is True
    msg = _recv(sock)
    assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) > 0
    assert n.counters["sent"] == 4 and n.counters["failed"] == 0


def test_watchdog_at_most_every_half_interval(listener):
    path, sock = listener
    n = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    sent = [t for t in (100.0, 100.1, 100.49, 100.5, 100.7, 100.99, 101.0, 101.2) if n.watchdog(t)]
    assert sent == [100.0, 100.5, 101.0]
    for _ in sent:
        assert _recv(sock) == {"WATCHDOG": "1"}
    assert _nothing_queued(sock)
    assert n.counters["watchdog"] == 3


def test_watchdog_off_when_it_belongs_to_another_pid(listener):
    path, sock = listener
    n = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=4242)
    assert n.watchdog_s is None and n.watchdog(0.0) is False
    assert n.ready() is True and _recv(sock) == {"READY": "1"}  # notifications still go out


def test_abstract_socket():
    name = f"fabricd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready() is True
        assert _recv(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_send_failure_is_counted_not_raised(tmp_path):
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert n.ready() is False and n.stopping() is False
    assert n.counters == {"sent": 0, "failed": 2, "watchdog": 0}


def test_unusable_value_turns_notifications_off():
    env = {"NOTIFY_SOCKET": "vsock:2:9999", "WATCHDOG_USEC": "1000000"}
    n = SystemdNotifier(env)
    assert not n.enabled and n.watchdog_s is None and n.ready() is False
    assert env == {}
