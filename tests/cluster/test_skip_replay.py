"""A transient read error on a 3-daemon fabric: the unit's skip is recorded before its step is
delivered; the leader is then killed, delivery continues under the new leader, and a replay of
the whole run from step 0 delivers the very same batches: all equal the offline expectation
computed with the log's skip records."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from fabric_client import Loader
from fabricd.config import load_job_spec
from fabricd.expect import BatchOracle, skips_from_logs
from fabricd.failpoints import ROLE_ENV
from fabricd.localnode import LocalCluster

from ..conftest import write_job
from ..integration.test_data_path import assert_exact
from ..integration.test_transient_skips import FAIL_STEP, STEPS, pick_unit
from .test_failover import logs_prefix_consistent, submit_to_leader

pytestmark = [pytest.mark.cluster]


@pytest.mark.timeout(180)
def test_skip_survives_a_leader_kill_and_a_replay_delivers_the_same(tmp_path, tiny_corpus):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, samples_per_step=16)
    rank, source, sample_id = pick_unit(job_file)
    # fails on the first 20 loads in any loader process, restarted or re-placed ones included: a
    # constructor gives up after two, but a trainer that relocated under load has the group's
    # standby build the step too, and with two failures per process the standby's load could
    # succeed after the primary's had used them up (then the unit is delivered, rightly unskipped)
    env = {ROLE_ENV: f"loader.transient_error=fail({source}:{sample_id}*20)"}
    with LocalCluster(tmp_path / "cluster", nodes=3, loader_workers=1, extra_env=env) as cluster:
        leader = submit_to_leader(cluster, job_file)
        out, errors = {}, []
        threads = _consume(cluster, STEPS, out, errors, pace_s=0.3)
        deadline = time.monotonic() + 90
        while not all(any(k[0] > FAIL_STEP for k, *_ in list(out[d])) for d in range(2)):
            assert time.monotonic() < deadline and not errors, f"no delivery past step {FAIL_STEP}: {errors}"
            time.sleep(0.05)
        cluster.kill(leader, signal.SIGKILL)  # the skip is committed: the rank got past its step
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert cluster.leader(exclude=(leader,)) != leader
        replay = []
        with Loader(cluster.addresses, job="t", dp_rank=rank, dp_size=2, max_steps=STEPS, deadline_s=60,
                    stall_s=1.0) as loader:
            loader.load_state_dict({"job": "t", "next_step": 0, "next_micro": 0})
            replay = [((b.step, b.dp_rank, b.micro_batch), b.checksum) for b in loader]
    logs = [d.workdir / "state" / "log" for d in cluster.daemons.values()]
    skips = skips_from_logs(logs, "t")
    assert (source, sample_id, 0, FAIL_STEP) in skips, "the failed unit's skip is not in the log"
    spec = load_job_spec(job_file)
    oracle = BatchOracle(spec, skips=skips)
    want = {b.key(): b for s in range(STEPS) for b in oracle.step(s)}
    for d in range(2):
        assert_exact([(k, c) for k, c, _ in out[d]], want, d)
    assert_exact(replay, want, rank)
    without = {b.key(): b.checksum for b in BatchOracle(spec, skips=skips - {(source, sample_id, 0, FAIL_STEP)})
               .step(FAIL_STEP)}
    assert any(without[k] != want[k].checksum for k in without if k[1] == rank), "the skip changed nothing"
    assert cluster.leftovers == [], "role processes outlived their daemon"
    logs_prefix_consistent(cluster)


def _consume(cluster: LocalCluster, steps: int, out: dict, errors: list, pace_s: float) -> list[threading.Thread]:
    """Two trainer ranks pulling ``steps`` steps; ``out[d]`` grows as batches arrive."""
    def run(d: int) -> None:
        try:
            for b in Loader(cluster.addresses, job="t", dp_rank=d, dp_size=2, max_steps=steps, deadline_s=90,
                            stall_s=1.0):
                out[d].append(((b.step, b.dp_rank, b.micro_batch), b.checksum, time.monotonic()))
                time.sleep(pace_s)
        except Exception as e:  # surfaced by the test
            errors.append((d, e))

    for d in range(2):
        out[d] = []
    threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in range(2)]
    for t in threads:
        t.start()
    return threads
