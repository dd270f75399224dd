"""Role processes forked from the role template (``fabricd.roles.template``), supervised as before.

In one process (this test is the "daemon": a ROUTER where roles announce themselves, and the
``Supervisor``): a source loader forked from the template is this process's own child, announces
its true pid, serves exactly what an offline ``SampleLoader`` reads, is restarted with a new pid
after SIGKILL, and everything (template included) ends by pid on ``stop()``. Then with a real
daemon: roles are children of the daemon, forked from the template, serve, survive the
template's death, and die with a SIGKILLed daemon. And the fallbacks: spawning when turned off,
and giving the template up after repeated failures.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from fabric_client import protocol
from fabric_client.sockets import SocketFactory
from fabricd.config import load_job_spec
from fabricd.job import job_tokenizer, transform_spec
from fabricd.localnode import LocalDaemon
from fabricd.roles.base import RoleArgs
from fabricd.roles.sample_wire import decode_load_reply
from fabricd.roles.supervisor import MAX_TEMPLATE_FAILURES, Supervisor
from fabricd.roles.template import ForkedRole
from fabricd.sources.index import open_index
from fabricd.sources.transform import SampleLoader

from ..conftest import write_job
from .test_data_path import assert_exact, consume, expected, submit

pytestmark = [pytest.mark.integration]

SOURCE = "code"


class FakeDaemon:
    """A plaintext ROUTER standing in for the daemon's control endpoint: collects RoleHello."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sockets = SocketFactory(self.ctx)
        self.sock = self.sockets.router()
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def hello(self, role_id: str, pid: int, timeout: float = 60.0) -> protocol.RoleHello:
        """The first RoleHello of ``role_id`` that carries ``pid``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(200):
                continue
            frames = self.sock.recv_multipart()
            msg, _ = protocol.decode(frames[1:])
            if isinstance(msg, protocol.RoleHello) and msg.role_id == role_id and msg.pid == pid:
                return msg
        raise AssertionError(f"no hello from {role_id} pid {pid} within {timeout}s")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def loader_args(tmp_path: Path, corpus: Path, daemon: str) -> RoleArgs:
    job = write_job(tmp_path / "job.toml", corpus)
    return RoleArgs(kind="source_loader", role_id=f"t/loader/{SOURCE}/0", daemon=daemon, job="t",
                    spec_path=str(job), spec_origin=str(job), bind_host="127.0.0.1", heartbeat_s=0.2,
                    max_message_bytes=64 << 20, parent_pid=os.getpid(),
                    extra={"source": SOURCE, "data_roots": [str(corpus)], "index_dir": str(tmp_path / "indexes")})


def load_through(endpoint: str, ids: np.ndarray) -> list:
    """Units ``ids`` (piece 0) asked of the loader at ``endpoint`` over its wire."""
    ctx = zmq.Context()
    try:
        sock = SocketFactory(ctx).dealer()
        sock.connect(endpoint)
        msg = protocol.LoadRequest(job="t", source=SOURCE, req_id=1, count=len(ids))
        sock.send_multipart(protocol.encode(msg, (ids.astype(np.int64).tobytes(),
                                                  np.zeros(len(ids), np.int32).tobytes())))
        assert sock.poll(60_000), "the loader did not answer"
        reply, payload = protocol.decode(sock.recv_multipart(copy=False))
        assert isinstance(reply, protocol.LoadReply) and reply.req_id == 1
        units = decode_load_reply(reply, payload)
        sock.close(linger=0)
        return [u if isinstance(u, str) else np.array(u.input_ids) for u in units]
    finally:
        ctx.term()


def offline(args: RoleArgs, ids: np.ndarray) -> list:
    spec = load_job_spec(args.spec_path)
    source = next(s for s in spec.sources if s.name == SOURCE)
    tok = job_tokenizer(spec, parallel=False)
    index = open_index(source.name, source.path, format=source.format, index_dir=Path(args.extra["index_dir"]),
                       tokenizer=tok)
    units = SampleLoader(index, transform_spec(spec, SOURCE), tokenizer=tok).load(ids, np.zeros(len(ids), np.int32))
    return [u.reason if not hasattr(u, "input_ids") else np.array(u.input_ids) for u in units]


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def fake_daemon():
    d = FakeDaemon()
    yield d
    d.close()


@pytest.mark.timeout(180)
def test_forked_role_is_our_child_serves_restarts_and_ends_by_pid(tmp_path, tiny_corpus, fake_daemon):
    sup = Supervisor(backoff_s=0.1, backoff_max_s=0.5, template=True)
    args = loader_args(tmp_path, tiny_corpus, fake_daemon.endpoint)
    pids = []
    try:
        role = sup.start(args)
        wait_for(lambda: sup.poll() is not None and role.proc is not None, 120, "the role was not started")
        assert role.forked and isinstance(role.proc, ForkedRole)
        template_pid = sup.template.pid
        assert psutil.Process(template_pid).num_threads() == 1, "the template forks single-threaded"
        pids += [template_pid, role.pid]
        proc = psutil.Process(role.pid)
        assert proc.ppid() == os.getpid(), "a forked role is re-parented to the supervising process"
        assert "fabricd.roles.template" in " ".join(proc.cmdline()), "it was forked from the template"
        hello = fake_daemon.hello(args.role_id, role.pid)
        ids = np.array([0, 5, 11, 3], np.int64)
        assert_units_equal(load_through(hello.endpoint, ids), offline(args, ids))

        first = role.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: sup.poll() or role.exit_codes, 10, "the kill was not noticed")
        assert role.exit_codes[-1] == -signal.SIGKILL
        wait_for(lambda: (sup.poll(), role.alive and role.pid != first)[1], 30, "the role was not restarted")
        assert role.restarts == 1 and role.forked and psutil.Process(role.pid).ppid() == os.getpid()
        pids.append(role.pid)
        hello = fake_daemon.hello(args.role_id, role.pid)
        assert_units_equal(load_through(hello.endpoint, ids), offline(args, ids))
        assert sup.template.pid == template_pid and sup.template_status()["forks"] == 2
    finally:
        sup.stop()
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]
    assert sup.template_status()["pid"] is None


def assert_units_equal(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, str):
            assert isinstance(g, str)
        else:
            assert not isinstance(g, str), g
            np.testing.assert_array_equal(g, w)


@pytest.mark.timeout(120)
def test_exit_codes_of_forked_roles_reach_the_supervisor(tmp_path, tiny_corpus, fake_daemon):
    """A role that exits on its own (an unknown kind: exit code 2) is reported with its code and
    restarted with backoff, like a spawned one."""
    sup = Supervisor(backoff_s=0.2, backoff_max_s=1.0, template=True)
    args = loader_args(tmp_path, tiny_corpus, fake_daemon.endpoint)
    args = RoleArgs(**{**args.__dict__, "kind": "no_such_kind", "role_id": "t/odd/0"})
    try:
        role = sup.start(args)
        wait_for(lambda: (sup.poll(), len(role.exit_codes) >= 2)[1], 90, "the role did not exit twice")
        assert role.exit_codes[:2] == [2, 2] and role.forked
        assert role.restarts >= 1
    finally:
        sup.stop()


@pytest.mark.timeout(120)
def test_without_the_template_roles_are_spawned(tmp_path, tiny_corpus, fake_daemon):
    sup = Supervisor(backoff_s=0.1, backoff_max_s=0.5, env={**os.environ, "FABRICD_ROLE_TEMPLATE": "0"})
    args = loader_args(tmp_path, tiny_corpus, fake_daemon.endpoint)
    try:
        assert sup.template is None
        role = sup.start(args)
        assert not role.forked and role.pid is not None
        assert "fabricd.roles" in psutil.Process(role.pid).cmdline()
        fake_daemon.hello(args.role_id, role.pid)
    finally:
        sup.stop()
    assert gone(role.pid)


@pytest.mark.timeout(120)
def test_a_failing_template_is_given_up_and_roles_are_spawned(tmp_path, tiny_corpus, fake_daemon):
    sup = Supervisor(backoff_s=0.1, backoff_max_s=0.5, template=True)
    sup.template.ready_timeout_s = 0.0  # never ready in time: every launch fails
    args = loader_args(tmp_path, tiny_corpus, fake_daemon.endpoint)
    roles = []
    try:
        for i in range(MAX_TEMPLATE_FAILURES + 1):
            roles.append(sup.start(RoleArgs(**{**args.__dict__, "role_id": f"t/loader/{SOURCE}/{i}"})))
        assert sup.template is None, "the template should be given up"
        assert [r.forked for r in roles] == [False] * len(roles) and all(r.alive for r in roles)
        for r in roles:
            fake_daemon.hello(r.args.role_id, r.pid)
    finally:
        sup.stop()
    assert all(gone(r.pid) for r in roles)


# -- with a real daemon -----------------------------------------------------------------------


def daemon_children(daemon: LocalDaemon) -> dict[int, str]:
    out = {}
    for p in psutil.Process(daemon.proc.pid).children():
        try:
            out[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            pass
    return out


@pytest.mark.timeout(300)
def test_daemon_roles_come_from_the_template_survive_its_death_and_die_with_the_daemon(tmp_path, tiny_corpus):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1, prefetch=2)
    daemon = LocalDaemon(tmp_path / "node", node_id="tpl")
    daemon.start()
    try:
        submit(daemon, job_file)
        roles = {r["id"]: r for r in daemon.status()["jobs"]["t"]["roles"]}
        children = daemon_children(daemon)
        templates = [pid for pid, cmd in children.items() if "fabricd.roles.template" in cmd and pid not in
                     {r["pid"] for r in roles.values()}]
        assert len(templates) == 1, children
        assert str(tmp_path) in children[templates[0]], "the template names the daemon's state dir"
        for r in roles.values():
            assert r["pid"] in children, f"{r['id']} is not a child of the daemon"
            assert "fabricd.roles.template" in children[r["pid"]], f"{r['id']} was not forked from the template"
            assert psutil.Process(r["pid"]).name().startswith("fd-")

        # the template dies: the roles it forked keep serving, and a killed role still comes back
        os.kill(templates[0], signal.SIGKILL)
        loader = next(r for r in roles.values() if r["kind"] == "source_loader")
        os.kill(loader["pid"], signal.SIGKILL)
        steps = 6
        records = consume(daemon.address, "t", 0, 1, steps=steps, stall_s=1.0, deadline_s=120)[0]
        assert_exact(records, expected(job_file, range(steps)), 0)
        after = {r["id"]: r for r in daemon.status()["jobs"]["t"]["roles"]}
        assert after[loader["id"]]["restarts"] >= 1 and after[loader["id"]]["pid"] != loader["pid"]
        assert all(r["pid"] in daemon_children(daemon) for r in after.values())

        # the daemon is SIGKILLed: every role and the template die with it
        everyone = [r["pid"] for r in after.values()] + list(daemon_children(daemon))
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        wait_for(lambda: all(gone(p) for p in everyone), 10, "role processes outlived the SIGKILLed daemon")
    finally:
        daemon.stop()
