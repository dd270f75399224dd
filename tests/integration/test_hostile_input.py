"""What a hostile caller sends on a plain DEALER socket cannot break a live fabric.

Each test reproduces a way the fabric broke before typed, range-checked records (issue 7's table,
rows 1-4 and 13), against a real daemon with real role processes, then checks that nothing
crashed or restarted, the drops were counted, nothing reached the log, and delivery is still
exact against the offline expectation.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import zmq

from fabric_client import protocol
from fabric_client.limits import MAX_STEP
from fabricd import fuzzing

from ..conftest import keyed_dealer, write_job
from .test_data_path import assert_exact, consume, expected, submit

pytestmark = [pytest.mark.integration]

BAD_ROLE_STATS = [
    {"subscriptions": [1, 2]}, {"subscriptions": 5}, {"subscriptions": "ab"}, {"subscriptions": None},
    {"subscriptions": [{}]}, {"subscriptions": [{"dp_rank": 0, "mp_rank": 0}]},
    {"departed": 5}, {"departed": None}, {"departed": [[0, 0, 2**70]]},
    {"subscriptions": [{"dp_rank": 0, "mp_rank": 0, "next_step": 2**62}]},
]


def _send_all(endpoint: str, messages: list[list[bytes]], *, expect_replies: bool, kind: str = "node") -> list:
    """Send every message from one DEALER authenticated as ``kind`` (by default the daemon's own
    node key: the hostile insider, whose messages reach the decoders and handlers); collect the
    replies (each must be an ErrorReply)."""
    sock = keyed_dealer(kind, "test", hwm=0)
    sock.connect(endpoint)
    try:
        for frames in messages:
            sock.send_multipart(frames or [b""])
        replies = []
        while expect_replies and len(replies) < len(messages) and sock.poll(10_000):
            replies.append(protocol.decode(sock.recv_multipart())[0])
        return replies
    finally:
        sock.close()


def _roles(status: dict, job: str) -> dict[str, dict]:
    return {r["id"]: r for r in status["jobs"][job]["roles"]}


@pytest.mark.timeout(240)
def test_poisoned_role_stats_plans_and_subscriptions_are_dropped(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1)
    submit(local_daemon, job_file)
    deadline = time.monotonic() + 30
    while True:  # every role up and announced
        before = local_daemon.status()
        roles = _roles(before, "t")
        if all(r["endpoint"] for r in roles.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    constructor = next(r for r in roles.values() if r["kind"] == "constructor" and r["endpoint"])
    loader = next(r for r in roles.values() if r["kind"] == "source_loader" and r["endpoint"])
    pid = before["pid"]

    head = fuzzing.header
    daemon_msgs = [[head({"t": "role_stats", "role_id": rid, "stats": stats})]
                   for rid in (constructor["id"], loader["id"]) for stats in BAD_ROLE_STATS]
    daemon_msgs += [[head({"t": "plan_request", "job": "t", "step": step, "ranks": [0]})]
                    for step in (2**62, MAX_STEP + 1, -1)]
    daemon_msgs += [[b"[" * 100_000], [head({"t": "skip_report", "job": "t", "step": -1, "source": "code",
                                             "sample_id": 0, "piece": 0, "reason": "forged"})]]
    replies = _send_all(local_daemon.address, daemon_msgs, expect_replies=True)
    assert len(replies) == len(daemon_msgs), "the daemon stopped answering"
    assert all(isinstance(r, protocol.ErrorReply) and r.code == "malformed" for r in replies), replies

    # the constructor: a subscription at step 2^62 and deep nesting; the loader: deep nesting
    sub = head({"t": "subscribe", "job": "t", "fingerprint": "", "dp_rank": 0, "mp_rank": 0,
                "next_step": 2**62, "next_micro": 0, "credits": 1})
    assert len(_send_all(constructor["endpoint"], [[sub], [b"[" * 100_000]], expect_replies=True,
                         kind="trainer")) == 2
    _send_all(loader["endpoint"], [[b"[" * 100_000], [head({"t": "load_request", "job": "t", "source": "code",
                                                             "req_id": 2**70, "count": 1})]], expect_replies=False)

    # everything is still up, nothing restarted, nothing absurd reached the state
    records, _ = consume(local_daemon.address, "t", 0, 1, steps=3)
    assert_exact(records, expected(job_file, range(3)), 0)
    after = local_daemon.status()
    assert after["pid"] == pid
    assert after["counters"]["malformed_dropped"] >= len(daemon_msgs)
    assert after["dropped"]["malformed"] >= len(daemon_msgs)
    for rid in (constructor["id"], loader["id"]):
        assert _roles(after, "t")[rid]["restarts"] == 0, f"{rid} restarted"
    progress = after["jobs"]["t"]
    assert progress["progress_floor"] <= 3 and all(s <= 3 for s in progress["progress"].values()), progress
    assert after["jobs"]["t"]["skipped_recorded"] == before["jobs"]["t"]["skipped_recorded"]


@pytest.mark.timeout(240)
def test_every_field_of_every_record_mutated_is_dropped_counted_and_logged_briefly(
        tmp_path, tiny_corpus, local_daemon):
    """Each field of each record type in turn given a wrong type or an extreme value: the daemon
    answers every one with a refusal, counts it, writes nothing to the log, and its own log grows
    by a bounded amount (rate-limited, truncated warnings)."""
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1)
    submit(local_daemon, job_file)
    rng = random.Random(7)
    messages = [[h] for name in sorted(protocol.message_types())
                for _, h in fuzzing.field_mutations(protocol.message_types()[name], rng)]
    assert len(messages) > 500
    before = local_daemon.status()
    log_size = local_daemon.log_path.stat().st_size
    replies = _send_all(local_daemon.address, messages, expect_replies=True)
    assert len(replies) == len(messages), "the daemon stopped answering"
    assert {r.code for r in replies} == {"malformed"}
    after = local_daemon.status()
    assert after["pid"] == before["pid"]
    assert after["counters"]["malformed_dropped"] - before["counters"]["malformed_dropped"] == len(messages)
    assert sum(after["log_lines_suppressed"].values()) > 0
    grown = local_daemon.log_path.stat().st_size - log_size
    assert grown < 20_000, f"the daemon log grew by {grown} bytes for {len(messages)} malformed messages"
    # the log did not take any of it: no progress or skip beyond what trainers did
    assert after["jobs"]["t"]["skipped_recorded"] == before["jobs"]["t"]["skipped_recorded"]
    records, _ = consume(local_daemon.address, "t", 0, 1, steps=2)
    assert_exact(records, expected(job_file, range(2)), 0)
    assert json.dumps(after)  # status stays JSON


@pytest.mark.timeout(240)
def test_sigterm_is_honoured_within_seconds_under_a_flood(tmp_path, tiny_corpus, local_daemon):
    """While a flood of malformed messages (deep nesting, huge lists) keeps the control socket
    busy, SIGTERM still stops the daemon and its roles within a few seconds."""
    import signal
    import threading

    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1)
    submit(local_daemon, job_file)
    rng = random.Random(5)
    flood = [[h] for name in ("plan_request", "role_stats", "locate", "subscribe")
             for _, h in fuzzing.field_mutations(protocol.message_types()[name], rng)] * 20
    stop = threading.Event()

    def hammer() -> None:
        sock = keyed_dealer("node", "test")
        sock.connect(local_daemon.address)
        try:
            for frames in flood:
                if stop.is_set():
                    break
                if sock.poll(100, zmq.POLLOUT):
                    sock.send_multipart(frames, zmq.NOBLOCK)
                while sock.poll(0):
                    sock.recv_multipart()
        finally:
            sock.close()

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    time.sleep(1.0)  # the flood is under way
    proc = local_daemon.proc
    started = time.monotonic()
    local_daemon.signal(signal.SIGTERM)
    proc.wait(timeout=30)
    took = time.monotonic() - started
    stop.set()
    thread.join(10)
    assert proc.returncode == 0, local_daemon.tail()
    assert took < 10.0, f"SIGTERM took {took:.1f}s under the flood"
