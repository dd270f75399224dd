"""free_port: a port a daemon can bind later, kept out of the range outgoing connections draw from."""

from __future__ import annotations

import socket

import pytest

from fabricd.localnode import _ephemeral_range, free_port

pytestmark = pytest.mark.unit


def test_free_ports_lie_below_the_ephemeral_range_and_are_free():
    low, high = _ephemeral_range()
    assert 1024 <= low <= high
    ports = {free_port() for _ in range(20)}
    if low > 21000:  # room below the range (Linux's default 32768..60999)
        assert all(20000 <= p < low for p in ports), sorted(ports)
    assert len(ports) > 1  # not one fixed port for every caller
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free right now
