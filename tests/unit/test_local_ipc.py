"""fabricd.local_ipc: the private directory and the socket names constructors look for."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fabricd import local_ipc

pytestmark = pytest.mark.unit


def test_the_directory_is_private_and_removed():
    d = local_ipc.make_dir()  # in the system's temp directory (pytest's tmp_path is too deep for sockets)
    assert d is not None and d.name.startswith("fabricd-ipc-")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (d / "left-by-a-killed-role.sock").write_bytes(b"")
    local_ipc.remove_dir(d)
    assert not d.exists()
    local_ipc.remove_dir(d)  # gone already: no error
    local_ipc.remove_dir(None)


def test_a_directory_too_deep_for_unix_sockets_is_refused(tmp_path):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    assert local_ipc.make_dir(base=str(deep)) is None
    assert list(deep.iterdir()) == []  # and nothing is left there


def test_a_constructor_finds_only_sockets_its_own_daemons_loaders_bound(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    tcp = "tcp://127.0.0.1:40001"
    assert local_ipc.local_endpoint(mine, tcp) is None  # no loader of this daemon serves it
    assert local_ipc.local_endpoint("", tcp) is None and local_ipc.local_endpoint(None, tcp) is None
    local_ipc.socket_file(other, tcp).write_bytes(b"")  # another daemon's loader
    assert local_ipc.local_endpoint(mine, tcp) is None
    local_ipc.socket_file(mine, tcp).write_bytes(b"")
    assert local_ipc.local_endpoint(mine, tcp) == local_ipc.endpoint_for(mine, tcp) == f"ipc://{mine}/" + \
        local_ipc.socket_file(mine, tcp).name
    # names are a function of the TCP endpoint alone, distinct per endpoint
    assert local_ipc.socket_file(mine, tcp) == local_ipc.socket_file(mine, tcp)
    assert local_ipc.socket_file(mine, tcp) != local_ipc.socket_file(mine, "tcp://127.0.0.1:40002")


def test_a_restart_removes_the_directory_a_killed_daemon_left(tmp_path):
    record = tmp_path / "ipc_dir"
    first = local_ipc.make_dir(record)
    (first / "0123456789abcdef.sock").write_bytes(b"")  # as a SIGKILLed daemon leaves it
    second = local_ipc.make_dir(record)
    try:
        assert not first.exists() and second.exists() and second != first
        assert record.read_text().strip() == str(second)
        record.write_text("/etc\n")  # a record naming anything but a socket directory is not followed
        third = local_ipc.make_dir(record)
        assert third is not None and second.exists() and Path("/etc").is_dir()
        local_ipc.remove_dir(third)
    finally:
        local_ipc.remove_dir(second)
