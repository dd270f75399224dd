"""Online mixing survives a leader failover: three daemons, trainers reporting a high loss on one
source, the leader killed after its policy made a few changes. The new leader continues the policy
from the state in the log (its rounds go on counting, in its own term), and what the trainers
received is exactly what ``expect`` computes from the spec plus the newest log's changes."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from fabricd.config import load_job_spec
from fabricd.expect import BatchOracle, log_plan_changes, log_skips, newest_log_state
from fabricd.localnode import LocalCluster

from ..conftest import write_job
from ..integration.test_data_path import assert_exact
from .test_failover import consume_all, logs_prefix_consistent, submit_to_leader
from .test_plan_change_failover import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 48
HARD = "code"  # the source the "model" keeps finding hard


def report_losses(loader, batch) -> None:
    """What a training loop reports after a step: the mean loss per source of its batch."""
    names = loader.source_names
    counts = np.bincount(batch["source_ids"], minlength=len(names))
    loader.report({names[i]: ((5.0 if names[i] == HARD else 1.0) * int(counts[i]), int(counts[i]))
                   for i in np.flatnonzero(counts)})


def online_changes(cluster: LocalCluster, node: str) -> list:
    st = cluster.status(node) or {}
    return [c for c in st.get("jobs", {}).get("t", {}).get("plan_changes", ()) if c["origin"] == "online:odm"]


@pytest.mark.timeout(300)
def test_leader_killed_while_online_mixing(tmp_path, tiny_corpus):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, samples_per_step=12)
    job_file.write_text(job_file.read_text().replace(
        'kind = "linear"', 'kind = "linear"\nonline = "odm"\nonline_every_steps = 1\nonline_alpha = 0.5', 1))
    spec = load_job_spec(job_file)
    assert spec.online.enabled
    with LocalCluster(tmp_path / "cluster", nodes=3, loader_workers=2) as cluster:
        leader = submit_to_leader(cluster, job_file)
        term = cluster.status(leader)["term"]
        out, errors = {}, []
        threads = consume_all(cluster, 2, STEPS, out, errors, pace_s=0.3, on_batch=report_losses)
        wait_for(lambda: len(online_changes(cluster, leader)) >= 3, 90, "the policy made no changes")
        cluster.kill(leader, signal.SIGKILL)
        new = cluster.leader(exclude=(leader,))
        assert new != leader
        for t in threads:
            t.join(250)
        assert not errors, errors
    assert cluster.leftovers == [], "role processes outlived their daemon"
    logs_prefix_consistent(cluster)
    state = newest_log_state([d.workdir / "state" / "log" for d in cluster.daemons.values()])
    changes = log_plan_changes(state, "t")
    assert all(c.origin == "online:odm" and c.policy is not None for c in changes)
    # one policy across the failover: rounds count on, and the new leader made some of them
    assert [c.policy.rounds for c in changes] == list(range(1, len(changes) + 1)), [c.policy.rounds for c in changes]
    assert any(c.term > term for c in changes), "the new leader did not continue the policy"
    assert [c.at_step for c in changes] == sorted(c.at_step for c in changes)
    oracle = BatchOracle(spec, skips=log_skips(state, "t"), plan_changes=changes)
    want = {b.key(): b for s in range(STEPS) for b in oracle.step(s)}
    for d in range(2):
        assert_exact([(k, c) for k, c, _ in out[d]], want, d)
