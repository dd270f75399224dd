"""fabricd.local_ipc: the private directory and the socket names constructors look for."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
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


def test_trainer_sockets_send_each_reply_back_on_the_socket_its_request_came_in_on():
    import zmq

    from fabricd.roles.delivery import TrainerSockets

    ctx = zmq.Context.instance()
    routers = [ctx.socket(zmq.ROUTER) for _ in range(2)]
    dealers = [ctx.socket(zmq.DEALER) for _ in range(2)]
    try:
        for i, (r, d) in enumerate(zip(routers, dealers)):
            r.setsockopt(zmq.ROUTER_MANDATORY, 1)
            r.bind(f"inproc://trainer-sockets-{i}")
            d.connect(f"inproc://trainer-sockets-{i}")
        mux = TrainerSockets(routers)
        ids = []
        for i, (r, d) in enumerate(zip(routers, dealers)):
            d.send(b"hello %d" % i)
            routing_id, body = r.recv_multipart()
            ids.append(mux.identity(r, routing_id))
            assert ids[-1][0] == i and ids[-1][1:] == routing_id
        for i, identity in enumerate(ids):
            mux.send_multipart([identity, b"reply %d" % i])
        for i, d in enumerate(dealers):
            assert d.poll(2000) and d.recv() == b"reply %d" % i
        with pytest.raises(zmq.ZMQError):  # no socket 7: as a ROUTER answers a departed peer
            mux.send_multipart([b"\x07" + ids[0][1:], b"lost"])
        with pytest.raises(zmq.ZMQError):
            mux.send_multipart([b"", b"lost"])
        with pytest.raises(ValueError):
            TrainerSockets([])
    finally:
        for s in routers + dealers:
            s.close(linger=0)


def test_a_trainer_uses_the_unix_socket_only_where_it_can_connect(tmp_path):
    import socket

    from fabric_client.loader import _usable_unix_socket

    path = tmp_path / "c.sock"
    assert _usable_unix_socket(f"ipc://{path}") == ""  # not on this host
    assert _usable_unix_socket("") == "" and _usable_unix_socket("tcp://127.0.0.1:1") == ""
    path.write_bytes(b"")
    assert _usable_unix_socket(f"ipc://{path}") == ""  # a file, not a socket
    path.unlink()
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        assert _usable_unix_socket(f"ipc://{path}") == f"ipc://{path}"
    finally:
        server.close()


NOGROUP = 65534  # a group that is on every Debian-like machine and that no test process is in


def _refuse(*_):  # chown, as the packaged unit's system call filter answers it, or for a non-member
    raise PermissionError(1, "Operation not permitted")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to a group one is not in takes root")
def test_the_trainer_directory_is_shared_with_its_group_only_and_removed(tmp_path):
    record = tmp_path / "trainer_ipc_dir"
    d = local_ipc.make_shared_dir(NOGROUP, record)
    assert d is not None and d.name.startswith("fabricd-trainers-")
    try:
        st = d.stat()
        assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == NOGROUP  # the group may enter, not create
        assert record.read_text().strip() == str(d)
        tcp = "tcp://127.0.0.1:40002"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(local_ipc.socket_file(d, tcp)))
            local_ipc.share_socket(d, tcp)
            f = local_ipc.socket_file(d, tcp).stat()
            # connectable by whoever can enter the directory: its owner and its group
            assert stat.S_ISSOCK(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o666
        finally:
            sock.close()
        second = local_ipc.make_shared_dir(NOGROUP, record)  # a restart after a kill removes the first
        assert second is not None and not d.exists()
        d = second
    finally:
        local_ipc.remove_dir(d)


def test_a_trainer_directory_the_group_cannot_be_given_is_not_used(monkeypatch):
    made: list[Path] = []
    real = local_ipc.make_dir
    monkeypatch.setattr(local_ipc, "make_dir", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    monkeypatch.setattr(local_ipc.os, "chown", _refuse)  # the daemon's user is not in the group
    assert local_ipc.make_shared_dir(NOGROUP) is None
    assert len(made) == 1 and made[0] is not None and not made[0].exists()  # nothing left behind


@pytest.mark.skipif(os.geteuid() != 0, reason="preparing a directory of another group takes root")
def test_under_systemd_the_directory_is_the_groups_by_the_drop_ins_setgid_parent(monkeypatch):
    """As the packaged unit runs it: $RUNTIME_DIRECTORY/trainers made by the drop-in (setgid, the
    group's) and chown denied to the daemon: the new directory is the group's all the same."""
    runtime = Path(tempfile.mkdtemp(prefix="rt-"))  # short: pytest's tmp_path is too deep for sockets
    try:
        prepared = runtime / local_ipc.RUNTIME_SUBDIR
        prepared.mkdir()
        os.chown(prepared, -1, NOGROUP)
        os.chmod(prepared, 0o2750)
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
        monkeypatch.setattr(local_ipc.os, "chown", _refuse)
        d = local_ipc.make_shared_dir(NOGROUP)
        assert d is not None and d.parent == prepared
        st = d.stat()
        assert st.st_gid == NOGROUP and stat.S_IMODE(st.st_mode) & 0o7777 in (0o750, 0o2750)
        local_ipc.remove_dir(d)
        prepared.rmdir()  # without the drop-in's directory: no trainer sockets, said in the log
        assert local_ipc.make_shared_dir(NOGROUP) is None
    finally:
        local_ipc.remove_dir(runtime)
