"""CurveZMQ on every socket: only listed keys get in, and each kind of key may do only its own
kind of thing (issue: "Only the right keys get in").

A real daemon with a running job (its control socket, a constructor's trainer stream, a source
loader), probed with: no key (plaintext), a key nobody listed, and each listed kind of key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zmq

from fabric_client import protocol
from fabric_client.keys import ClientKeys, KeyPair, generate
from fabric_client.sockets import SocketFactory
from fabricd import fuzzing
from fabricd.localnode import KEYS_DIR_ENV, LocalDaemon, ensure_keys

from ..conftest import keyed_dealer, write_job
from .test_data_path import assert_exact, consume, expected, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _roles(daemon) -> dict[str, dict]:
    import time

    deadline = time.monotonic() + 30
    while True:
        roles = {r["kind"]: r for r in daemon.status()["jobs"]["t"]["roles"] if r["endpoint"]}
        if {"constructor", "source_loader"} <= set(roles) or time.monotonic() > deadline:
            return roles
        time.sleep(0.1)


def _ask(sock: zmq.Socket, endpoint: str, frames: list[bytes], wait_ms: int = 1500) -> protocol.Message | None:
    """Send one message; the reply, or None when nothing came back within ``wait_ms``."""
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        if not sock.poll(wait_ms):
            return None
        return protocol.decode(sock.recv_multipart())[0]
    finally:
        sock.close(linger=0)


def _stranger(tmp_path: Path) -> ClientKeys:
    """A well-formed trainer key that no allow-list names, with the fabric's real server key."""
    _, secret = generate(tmp_path / "elsewhere", "trainer", "mallory")
    return ClientKeys(KeyPair.load(secret), ClientKeys.load(Path(os.environ[KEYS_DIR_ENV]) / "server.key_secret",
                                                            Path(os.environ[KEYS_DIR_ENV]) / "server.key").server_public)


@pytest.fixture
def running(tmp_path, tiny_corpus):
    """A daemon ("test") running a job; the allow-lists it reads at start also list "node-x",
    another node of the fabric."""
    ensure_keys(os.environ[KEYS_DIR_ENV], ["test", "node-x"])
    daemon = LocalDaemon(tmp_path / "node", node_id="test")
    daemon.start()
    try:
        job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1)
        submit(daemon, job_file)
        yield daemon, job_file, _roles(daemon)
    finally:
        daemon.stop()


def test_no_key_and_unlisted_keys_get_no_answer_on_any_socket(tmp_path, running):
    daemon, _, roles = running
    ping = protocol.encode(protocol.Ping(nonce=1))
    ctx = zmq.Context.instance()
    stranger = _stranger(tmp_path)
    endpoints = {"control": daemon.address, "stream": roles["constructor"]["endpoint"],
                 "loader": roles["source_loader"]["endpoint"]}
    for name, endpoint in endpoints.items():
        assert _ask(SocketFactory(ctx).dealer(), endpoint, ping) is None, f"plaintext answered on {name}"
        assert _ask(SocketFactory(ctx, keys=stranger).dealer(), endpoint, ping) is None, \
            f"an unlisted key was answered on {name}"
    # listed keys of the wrong kind for the socket: trainers may not reach a source loader, nodes
    # and operators may not reach a trainer stream
    assert _ask(keyed_dealer("trainer"), endpoints["loader"], ping) is None
    assert _ask(keyed_dealer("operator"), endpoints["stream"], ping) is None
    assert _ask(keyed_dealer("node", "test"), endpoints["stream"], ping) is None
    # ... while the right kinds are answered (a source loader refuses a Ping: still an answer)
    assert isinstance(_ask(keyed_dealer("trainer"), endpoints["control"], ping), protocol.Pong)
    assert isinstance(_ask(keyed_dealer("node", "test"), endpoints["loader"], ping), protocol.ErrorReply)
    st = daemon.status()
    assert st["security"]["insecure"] is False and st["security"]["refused_handshakes"] >= 1


def test_each_kind_of_key_may_do_only_its_own_kind_of_thing(tmp_path, running):
    daemon, job_file, roles = running
    head = fuzzing.header
    cancel = [head({"t": "cancel_job", "job": "t"})]
    role_hello = [head({"t": "role_hello", "role_id": roles["constructor"]["id"], "kind": "constructor",
                        "endpoint": "tcp://10.9.9.9:1", "pid": 1})]
    peer = [head({"t": "peer", "sender": "node-x", "kind": "lease_ack", "body": {"term": 2**40}})]
    peer_as_other = [head({"t": "peer", "sender": "node-y", "kind": "lease_ack", "body": {"term": 2**40}})]
    skip = [head({"t": "skip_report", "job": "t", "step": 1, "source": "code", "sample_id": 0, "piece": 0,
                  "reason": "forged", "dp_rank": 0})]
    locate = protocol.encode(protocol.Locate(job="t", dp_rank=0, dp_size=1))
    # a trainer key: no cancelling, no peer messages, no registering as a role, no skip reports
    for frames in (cancel, role_hello, peer, skip):
        reply = _ask(keyed_dealer("trainer"), daemon.address, frames)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == "forbidden", (frames, reply)
    # an operator key may not register roles or send peer messages either
    for frames in (role_hello, peer):
        reply = _ask(keyed_dealer("operator"), daemon.address, frames)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == "forbidden", reply
    # another node's key (a peer) may not register roles here, nor speak as another node
    for frames in (role_hello, peer_as_other):
        reply = _ask(keyed_dealer("node", "node-x"), daemon.address, frames)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == "forbidden", reply
    # what each kind is for still works: a trainer locates, an operator reads status
    located = _ask(keyed_dealer("trainer"), daemon.address, locate)
    assert isinstance(located, protocol.Located), located
    st = daemon.status()
    assert st["dropped"].get("forbidden", 0) == 8
    assert "t" in st["jobs"] and st["jobs"]["t"]["state"] == "ready", "a refused cancel cancelled nothing"
    assert st["jobs"]["t"]["skipped_recorded"] == 0, "a forged skip report reached the log"
    # the constructor the forged RoleHello named still serves: delivery is exact
    records, _ = consume(daemon.address, "t", 0, 1, steps=2)
    assert_exact(records, expected(job_file, range(2)), 0)
    assert json.dumps(st)


def test_a_key_added_to_the_allow_lists_gets_in_after_sighup(tmp_path, running):
    """Key rotation without a restart: a new trainer key is unknown until the daemon (SIGHUP)
    and its role processes read the allow-lists again; then it locates and streams."""
    import signal
    import time

    daemon, job_file, _ = running
    _, secret = generate(os.environ[KEYS_DIR_ENV], "trainer", f"bob-{os.getpid()}-{time.monotonic_ns()}")
    bob = ClientKeys.load(secret)
    ping = protocol.encode(protocol.Ping(nonce=3))
    assert _ask(SocketFactory(zmq.Context.instance(), keys=bob).dealer(), daemon.address, ping) is None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    reply = None
    while reply is None and time.monotonic() < deadline:
        reply = _ask(SocketFactory(zmq.Context.instance(), keys=bob).dealer(), daemon.address, ping, wait_ms=500)
    assert isinstance(reply, protocol.Pong), "the new key was not let in after SIGHUP"
    assert daemon.proc.poll() is None
    records, _ = consume(daemon.address, "t", 0, 1, steps=2, keys=bob)  # the constructor knows bob too
    assert_exact(records, expected(job_file, range(2)), 0)


def test_a_job_that_names_its_trainers_serves_only_them(tmp_path, tiny_corpus):
    """``job.trainers``: only those trainer keys may locate the job or stream its data; another
    trainer key of the same fabric is refused at the daemon and at the constructor."""
    import time

    keys = ensure_keys(os.environ[KEYS_DIR_ENV], ["test"])
    eve = f"eve-{os.getpid()}-{time.monotonic_ns()}"
    generate(keys, "trainer", eve)  # listed in the fabric's allow-lists (before the daemon starts)
    daemon = LocalDaemon(tmp_path / "node", node_id="test")
    daemon.start()
    try:
        job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1)
        job_file.write_text(job_file.read_text().replace("[job]\n", '[job]\ntrainers = ["trainer"]\n', 1))
        submit(daemon, job_file)
        eve_keys = ClientKeys.load(keys / f"trainers/{eve}.key_secret")
        locate = protocol.encode(protocol.Locate(job="t", dp_rank=0, dp_size=1))
        reply = _ask(SocketFactory(zmq.Context.instance(), keys=eve_keys).dealer(), daemon.address, locate)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == "forbidden" and eve in reply.reason, reply
        located = _ask(keyed_dealer("trainer"), daemon.address, locate)
        assert isinstance(located, protocol.Located), located
        assert not located.local_endpoint  # no Unix socket for such a job: only a key says who streams
        subscribe = protocol.encode(protocol.Subscribe(job="t", fingerprint=located.fingerprint, dp_rank=0, mp_rank=0,
                                                       next_step=0, next_micro=0, credits=1))
        reply = _ask(SocketFactory(zmq.Context.instance(), keys=eve_keys).dealer(), located.endpoint, subscribe)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == "forbidden", reply
        records, _ = consume(daemon.address, "t", 0, 1, steps=2)  # the named trainer is served, exactly
        assert_exact(records, expected(job_file, range(2)), 0)
    finally:
        daemon.stop()
