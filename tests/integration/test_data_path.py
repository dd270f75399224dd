"""The data path end to end: a real daemon process, real role processes, real Loaders.

Every delivery test compares what trainers received with ``BatchOracle``, the offline
computation from the job spec alone, batch for batch (checksums of the content).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fabric_client import Loader, protocol
from fabric_client.errors import FabricUnavailable, RemoteError
from fabricd.config import load_job_spec
from fabricd.expect import BatchOracle

from ..conftest import keyed_dealer, write_job

pytestmark = [pytest.mark.integration]


def submit(daemon, job_file: Path, timeout: float = 90.0) -> None:
    with daemon.client() as client:
        client.request(protocol.SubmitJob(spec_toml=job_file.read_text(), spec_path=str(job_file)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = daemon.status()["jobs"].get(load_job_spec(job_file).name, {})
        if job.get("serving"):
            return
        assert job.get("state") != "failed", job["error"]
        time.sleep(0.1)
    raise AssertionError(f"job not ready in {timeout}s:\n{daemon.tail()}")


def consume(address, job, dp_rank, dp_size, *, steps, mp_rank=0, state=None, stop_after=None, stats=None, **kw):
    """Pull batches until ``steps`` (or ``stop_after`` steps); return (records, state_dict).
    ``stats``: a dict to update with the loader's counters at the end."""
    records = []
    loader = Loader(address, job=job, dp_rank=dp_rank, dp_size=dp_size, mp_rank=mp_rank, max_steps=steps,
                    deadline_s=kw.pop("deadline_s", 60.0), **kw)
    if state is not None:
        loader.load_state_dict(state)
    with loader:
        for batch in loader:
            units = list(zip(batch["source_ids"].tolist(), batch["sample_ids"].tolist(), batch["pieces"].tolist()))
            records.append(((batch.step, batch.dp_rank, batch.micro_batch), batch.checksum, units, mp_rank))
            if stop_after is not None and batch.micro_batch + 1 == batch.num_micro_batches and batch.step + 1 >= stop_after:
                break
        if stats is not None:
            stats.update(loader.stats)
        return records, loader.state_dict()


def run_ranks(address, job, dp_size, mp_size, steps, **kw):
    results, errors = {}, []

    def target(d, m):
        try:
            results[(d, m)] = consume(address, job, d, dp_size, mp_rank=m, steps=steps, **kw)[0]
        except Exception as e:  # surfaced below
            errors.append((d, m, e))

    threads = [threading.Thread(target=target, args=(d, m)) for d in range(dp_size) for m in range(mp_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == dp_size * mp_size
    return results


def expected(job_file: Path, steps, dp_size=None) -> dict:
    oracle = BatchOracle(load_job_spec(job_file), dp_size=dp_size)
    return {b.key(): b for s in steps for b in oracle.step(s)}


def assert_exact(records, want: dict, dp_rank: int) -> None:
    keys = [k for k, *_ in records]
    mine = sorted(k for k in want if k[1] == dp_rank)
    assert keys == mine, "lost, repeated or out-of-order batches"
    assert [c for _, c, *_ in records] == [want[k].checksum for k in keys], "batch content differs"


@pytest.mark.timeout(180)
def test_delivery_matches_offline_expectation(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, mp_size=2)
    submit(local_daemon, job_file)
    steps = 6
    got = run_ranks(local_daemon.address, "t", 2, 2, steps)
    want = expected(job_file, range(steps))
    for (d, m), records in got.items():
        assert_exact(records, want, d)
    # model-parallel ranks of one DP rank receive the same batches
    assert [r[1] for r in got[(0, 0)]] == [r[1] for r in got[(0, 1)]]
    status = local_daemon.status()
    assert status["jobs"]["t"]["counters"]["plans_computed"] >= steps


@pytest.mark.timeout(180)
def test_corrupt_samples_are_skipped_deterministically_and_counted(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1, samples_per_step=32)
    want = expected(job_file, range(8))
    skipped = sum(b.skipped for b in want.values())
    assert skipped > 0, "the tiny corpus should contain corrupt samples in the first steps"
    submit(local_daemon, job_file)
    records, _ = consume(local_daemon.address, "t", 0, 1, steps=8)
    assert_exact(records, want, 0)
    deadline = time.monotonic() + 10
    while local_daemon.status()["jobs"]["t"]["counters"]["skipped_units"] < skipped:
        assert time.monotonic() < deadline, "skips were not reported to the daemon"
        time.sleep(0.1)


@pytest.mark.timeout(180)
def test_resume_from_state_dict_continues_exactly(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1, prefetch=3)
    submit(local_daemon, job_file)
    first, state = consume(local_daemon.address, "t", 0, 1, steps=6, stop_after=3)
    assert state["job"] == "t" and state["next_step"] == 3 and state["next_micro"] == 0
    assert len(json.dumps(state)) < 100
    rest, _ = consume(local_daemon.address, "t", 0, 1, steps=6, state=state)
    assert_exact(first + rest, expected(job_file, range(6)), 0)


@pytest.mark.timeout(240)
def test_resume_with_another_world_size_loses_and_repeats_nothing(tmp_path, tiny_corpus, local_daemon):
    steps, switch = 6, 3
    job2 = write_job(tmp_path / "job2.toml", tiny_corpus, dp_size=2, samples_per_step=12)
    submit(local_daemon, job2)
    before = []
    for d in range(2):
        records, state = consume(local_daemon.address, "t", d, 2, steps=steps, stop_after=switch)
        before += records
        assert state["next_step"] == switch
    job3 = write_job(tmp_path / "job3.toml", tiny_corpus, dp_size=3, samples_per_step=12)
    submit(local_daemon, job3)  # same job, resubmitted with 3 DP ranks
    after = []
    for d in range(3):
        after += consume(local_daemon.address, "t", d, 3, steps=steps, state=state)[0]
    got = Counter(u for records in (before, after) for *_, units, _m in records for u in units)
    oracle = BatchOracle(load_job_spec(job2))
    want = Counter()
    for s in range(steps):
        plan = oracle.planner.plan(s, 2)
        want.update(zip(plan.source.tolist(), plan.sample_id.tolist(), plan.piece.tolist()))
    skipped = sum(b.skipped for s in range(steps) for b in oracle.step(s))
    # every planned unit arrived exactly once, except the corrupt ones (skipped by rule)
    assert max(got.values()) == 1, "a unit was repeated"
    assert set(got) <= set(want) and sum(want.values()) - sum(got.values()) == skipped
    assert_exact([r for r in after if r[0][1] == 1], expected(job3, range(switch, steps)), 1)


@pytest.mark.timeout(180)
def test_malformed_messages_are_dropped_and_the_daemon_keeps_serving(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1)
    submit(local_daemon, job_file)
    located = None
    garbage = [[b"\x00\xff garbage"], [b'{"v": 1, "t": "locate"}'], [b'{"v": 7, "t": "ping"}'],
               [b'{"v": 1, "t": "nope"}'], [b'{"v": 1, "t": "plan_request", "job": "t", "step": -1, "ranks": [0]}'],
               []]
    with local_daemon.client() as client:
        located, _ = client.request(protocol.Locate(job="t", dp_rank=0, dp_size=1))
    for endpoint, kind in ((local_daemon.address, "node"), (located.endpoint, "trainer")):
        sock = keyed_dealer(kind, "test")  # authenticated: the garbage reaches the decoders
        sock.connect(endpoint)
        for frames in garbage:
            sock.send_multipart(frames or [b""])
        replies = []
        while len(replies) < len(garbage) and sock.poll(5000):
            replies.append(protocol.decode(sock.recv_multipart())[0])
        sock.close()
        assert len(replies) == len(garbage), f"{endpoint} stopped answering"
        assert all(isinstance(r, protocol.ErrorReply) for r in replies)
    status = local_daemon.status()
    assert status["counters"]["malformed_dropped"] >= 5
    records, _ = consume(local_daemon.address, "t", 0, 1, steps=3)
    assert_exact(records, expected(job_file, range(3)), 0)


@pytest.mark.timeout(60)
def test_invalid_job_is_refused_naming_the_key(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus)
    bad = job_file.read_text().replace("micro_batch_tokens = 8192", "micro_batch_tokens = -1")
    with local_daemon.client() as client, pytest.raises(RemoteError) as info:
        client.request(protocol.SubmitJob(spec_toml=bad, spec_path=str(job_file)))
    assert info.value.code == "invalid_spec"
    assert "batch.micro_batch_tokens" in info.value.reason and "-1" in info.value.reason


@pytest.mark.timeout(240)
def test_killed_roles_are_restarted_and_nothing_is_lost(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1, prefetch=2)
    submit(local_daemon, job_file)
    steps = 14
    out = {}

    def trainer():
        out["records"] = consume(local_daemon.address, "t", 0, 1, steps=steps, stall_s=1.0, deadline_s=90)[0]

    thread = threading.Thread(target=trainer)
    thread.start()
    roles = {r["kind"]: r for r in local_daemon.status()["jobs"]["t"]["roles"]}
    time.sleep(0.5)
    for kind in ("source_loader", "constructor"):
        os.kill(roles[kind]["pid"], signal.SIGKILL)
        time.sleep(0.7)
    thread.join(200)
    assert "records" in out, "the trainer did not finish"
    assert_exact(out["records"], expected(job_file, range(steps)), 0)
    restarts = {r["id"]: r["restarts"] for r in local_daemon.status()["jobs"]["t"]["roles"]}
    assert sum(restarts.values()) >= 2


@pytest.mark.timeout(240)
def test_constructor_killed_mid_batch_at_a_failpoint_loses_nothing(tmp_path, tiny_corpus):
    """The serving constructor is armed (SIGUSR1) to SIGKILL itself after its 5th send: one
    model-parallel rank then holds a micro-batch the other does not, and the rest of the step
    is unsent. Its restarted process is not armed, and resumes both ranks exactly."""
    from fabricd import failpoints
    from fabricd.localnode import LocalDaemon

    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1, mp_size=2, prefetch=3)
    armed = tmp_path / "failpoints"
    with LocalDaemon(tmp_path / "node", node_id="fp", extra_env={failpoints.FILE_ENV: str(armed)}) as daemon:
        submit(daemon, job_file)
        (con,) = [r for r in daemon.status()["jobs"]["t"]["roles"] if r["kind"] == "constructor"]
        armed.write_text("delivery.after_send=kill@5")
        os.kill(con["pid"], signal.SIGUSR1)
        steps = 8
        got = run_ranks(daemon.address, "t", 1, 2, steps, stall_s=1.0, deadline_s=90)
        want = expected(job_file, range(steps))
        for records in got.values():
            assert_exact(records, want, 0)
        (after,) = [r for r in daemon.status()["jobs"]["t"]["roles"] if r["kind"] == "constructor"]
        assert after["restarts"] == 1 and after["pid"] != con["pid"], "the armed process should die once"


@pytest.mark.timeout(30)
def test_unreachable_fabric_raises_instead_of_hanging():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(FabricUnavailable):
        for _ in Loader(f"tcp://127.0.0.1:{port}", job="t", dp_rank=0, dp_size=1, deadline_s=1.5):
            pass
    assert time.monotonic() - started < 10


@pytest.mark.timeout(120)
def test_fabricctl_expect_and_status(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2)
    fabricctl = [sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()"]
    out = subprocess.run([*fabricctl, "expect", str(job_file), "--steps", "0:2"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    want = expected(job_file, range(2))
    assert {(r["step"], r["dp_rank"], r["micro_batch"]): r["checksum"] for r in rows} == \
        {k: b.checksum for k, b in want.items()}
    subprocess.run([*fabricctl, "--address", local_daemon.address, "submit", str(job_file), "--wait"],
                   check=True, timeout=90, capture_output=True)
    status = subprocess.run([*fabricctl, "--address", local_daemon.address, "status"], capture_output=True,
                            text=True, check=True, timeout=30).stdout
    assert "job t: ready, serving" in status and "constructor/0" in status
    assert np.all([r["tokens"] > 0 for r in rows])
