"""Same-node links over the daemon's private Unix socket directory (fabricd.local_ipc): loaders
to constructors, and constructors to trainers running as the daemon's user. Delivery stays
exact, the directory is private and goes with the daemon, and the config turns it off (the
links then use TCP with CurveZMQ, as across nodes)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from fabric_client import protocol
from fabric_client.keys import ClientKeys
from fabric_client.machine import machine_id
from fabricd import local_ipc
from fabricd.localnode import LocalDaemon

from ..conftest import in_forked_child, write_job
from .test_data_path import assert_exact, consume, expected, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _links(daemon: LocalDaemon, job: str) -> tuple[int, int]:
    """(loader links, local loader links) of the job's constructor, once it has connected."""
    deadline = time.monotonic() + 30
    while True:
        stats = [r["stats"] for r in daemon.status()["jobs"][job]["roles"]
                 if r["kind"] == "constructor" and r.get("stats")]
        links = (stats[0].get("loader_links", 0), stats[0].get("local_loader_links", 0)) if stats else (0, 0)
        if links[0] or time.monotonic() > deadline:
            return links
        time.sleep(0.2)


@pytest.mark.parametrize("local_ipc", [True, False])
def test_same_node_loaders_are_reached_by_unix_socket_and_deliver_exactly(tmp_path, tiny_corpus, local_ipc):
    daemon = LocalDaemon(tmp_path / "node", node_id="test", local_ipc=local_ipc)
    daemon.start()
    try:
        job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2)
        submit(daemon, job_file)
        want = expected(job_file, range(4))
        for d in range(2):  # a trainer of this host, under the daemon's user, streams over the Unix socket too
            stats: dict = {}
            records, _ = consume(daemon.address, "t", d, 2, steps=4, stats=stats)
            assert_exact(records, want, d)
            assert stats["stream_endpoint"].startswith("ipc://" if local_ipc else "tcp://"), stats["stream_endpoint"]
        links, local = _links(daemon, "t")
        security = daemon.status()["security"]
        assert not security["insecure"]  # the TCP sockets are CurveZMQ all the same
        if local_ipc:
            directory = Path(security["local_ipc"])
            assert links >= 1 and local == links, (links, local)  # one node: every loader is local
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # only the daemon's user gets in
            assert any(p.name.endswith(".sock") and stat.S_ISSOCK(p.stat().st_mode) for p in directory.iterdir())
        else:
            assert security["local_ipc"] is None
            assert links >= 1 and local == 0, (links, local)
    finally:
        daemon.stop()
    if local_ipc:
        assert not directory.exists(), "the daemon left its socket directory behind"


def _loader_socket(tmp_path: Path, tiny_corpus: Path, daemon: LocalDaemon) -> tuple[Path, Path]:
    """Run a one-rank job; (the daemon's socket directory, its source loader's Unix socket there)."""
    submit(daemon, write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1))
    directory = Path(daemon.status()["security"]["local_ipc"])
    deadline = time.monotonic() + 30
    while True:
        loaders = [r["endpoint"] for r in daemon.status()["jobs"]["t"]["roles"]
                   if r["kind"] == "source_loader" and r["endpoint"]]
        path = local_ipc.socket_file(directory, loaders[0]) if loaders else None
        if path is not None and path.exists():
            return directory, path
        assert time.monotonic() < deadline, "no source loader serves on the socket directory"
        time.sleep(0.1)


def test_the_unix_socket_serves_load_requests_only(tmp_path, tiny_corpus, local_daemon):
    """The plaintext socket is the loader's own request handler: anything but a LoadRequest is
    refused and counted, as on its CurveZMQ socket."""
    directory, loader_socket = _loader_socket(tmp_path, tiny_corpus, local_daemon)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{loader_socket}")
        sock.send_multipart(protocol.encode(protocol.Ping(nonce=7)))
        assert sock.poll(5000), "no answer on the Unix socket"
        reply, _ = protocol.decode(sock.recv_multipart())
    finally:
        sock.close()
    assert isinstance(reply, protocol.ErrorReply) and reply.code == protocol.ErrorCode.BAD_REQUEST, reply
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        loaders = [r["stats"] for r in local_daemon.status()["jobs"]["t"]["roles"]
                   if r["kind"] == "source_loader" and r.get("stats")]
        if any(s.get("malformed", 0) >= 1 for s in loaders):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the refused request was not counted")
    assert loader_socket.exists()  # and the loader still serves


def _probe_as_nobody(endpoint: str, out) -> None:
    """In a forked child: drop to user nobody, ask the loader's Unix socket, report the answer."""
    os.setgid(65534)
    os.setuid(65534)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart(protocol.encode(protocol.Ping(nonce=9)))
    out.put(bool(sock.poll(2000)))
    sock.close()
    ctx.term()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_reach_the_unix_socket(tmp_path, tiny_corpus, local_daemon):
    directory, loader_socket = _loader_socket(tmp_path, tiny_corpus, local_daemon)

    def probe() -> bool:
        return in_forked_child(_probe_as_nobody, f"ipc://{loader_socket}", timeout=30)

    os.chmod(loader_socket, 0o777)  # whatever the socket file's own mode, the directory keeps others out
    assert probe() is False, "a process of another user got an answer from the loader's Unix socket"
    os.chmod(directory, 0o755)  # the control: with the directory open, the same probe gets in
    try:
        assert probe() is True, "the probe cannot tell: it got no answer even through an open directory"
    finally:
        os.chmod(directory, 0o700)


def _consume_as(uid: int, gid: int, groups: list[int], address: str, dp_rank: int, dp_size: int, out) -> None:
    """In a forked child: take the trainer key, become ``uid`` with those groups, stream a rank."""
    try:
        keys = ClientKeys.load(os.environ["FABRIC_KEY"])  # read while still allowed to
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        stats: dict = {}
        records, _ = consume(address, "t", dp_rank, dp_size, steps=4, stats=stats, keys=keys)
        out.put((records, stats["stream_endpoint"]))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.put(e)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become another user")
def test_trainers_of_the_trainer_group_stream_over_a_socket_shared_with_it(tmp_path, tiny_corpus):
    """[security] trainer_group: a trainer of another user in that group streams over the shared
    Unix socket, one not in it over TCP with CurveZMQ; both get exactly what the oracle says, and
    the loaders' sockets stay in the private directory."""
    nobody, nogroup, other_gid = 65534, 65534, 65533
    daemon = LocalDaemon(tmp_path / "node", node_id="test", trainer_group="nogroup")
    daemon.start()
    try:
        job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2)
        submit(daemon, job_file)
        want = expected(job_file, range(4))
        security = daemon.status()["security"]
        shared, private = Path(security["trainer_ipc"]["dir"]), Path(security["local_ipc"])
        assert security["trainer_ipc"]["group"] == "nogroup"
        st = shared.stat()
        assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == nogroup
        machine_id()  # cached before the fork: the child, as nobody, cannot read this venv's stdlib
        # rank 0: nobody, in the group as a supplementary one; rank 1: nobody, not in it
        for rank, groups, scheme in ((0, [nogroup], "ipc://"), (1, [], "tcp://")):
            got = in_forked_child(_consume_as, nobody, other_gid, groups, daemon.address, rank, 2, timeout=90)
            assert not isinstance(got, BaseException), got
            records, endpoint = got
            assert endpoint.startswith(scheme), (rank, endpoint)
            if scheme == "ipc://":
                assert Path(endpoint[len("ipc://"):]).parent == shared
            assert_exact(records, want, rank)
        socks = [p for p in shared.iterdir()]
        # the sockets are anyone's: the directory (0750, the group's) is what keeps others out, as
        # rank 1 found
        assert socks and all(stat.S_ISSOCK(p.stat().st_mode) and stat.S_IMODE(p.stat().st_mode) == 0o666
                             for p in socks)
        constructors = [r for r in daemon.status()["jobs"]["t"]["roles"] if r["kind"] == "constructor"]
        assert len(socks) == len(constructors)  # the trainer streams only: the loaders stay private
        assert stat.S_IMODE(private.stat().st_mode) == 0o700 and any(private.iterdir())
        shown = subprocess.run([sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()",
                                "--address", daemon.address, "status"], capture_output=True, text=True, check=True,
                               timeout=30).stdout
        assert f"same-node links: Unix sockets in {private}" in shown
        assert f"trainers of group nogroup: {shared}" in shown
    finally:
        daemon.stop()
    assert not shared.exists() and not private.exists(), "the daemon left a socket directory behind"
