"""The chaos suite under pytest: seeded faults against a real 3-daemon fabric, then invariants.

CI runs a short schedule covering every fault kind once; ``-m slow`` adds a longer random one
(``scripts/chaos.py --faults 200`` is the full run).
"""

from __future__ import annotations

import pytest

from fabricd.chaos import FAULT_KINDS, ChaosRun

pytestmark = [pytest.mark.cluster]

INVARIANTS = ("lost", "duplicated", "mismatched", "stale_term_applied", "log_divergence", "two_leaders_in_a_term",
              "unrecovered", "orphaned_processes", "daemon_crashes", "malformed_casualties", "unrecorded_failures")


def _run(tmp_path, seed, kinds, faults=None, cluster_extra=""):
    run = ChaosRun(tmp_path / "chaos", seed=seed, cluster_extra=cluster_extra)
    try:
        run.start()
        for kind in kinds:
            record = run.inject(kind)
            if faults is not None:
                faults.append(record)
        return run.finish()
    finally:
        run.close()


@pytest.mark.timeout(420)
def test_every_fault_kind_once(tmp_path):
    faults = []
    summary = _run(tmp_path, seed=11, kinds=FAULT_KINDS, faults=faults)
    assert summary["faults"] == len(FAULT_KINDS) and summary["steps_checked"] > 0
    assert {k: summary[k] for k in INVARIANTS} == dict.fromkeys(INVARIANTS, 0), summary
    (armed,) = [f for f in faults if f.kind == "failpoint_constructor"]
    assert " (hit)" in armed.detail, f"no serving constructor died at its failpoint: {armed}"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("lease_backend", ["etcd"], indirect=True)
def test_leader_faults_on_the_etcd_lease_backend(tmp_path, lease_backend):
    """Leader kills and pauses (and a shadow kill) with etcd granting the lease: nothing lost or
    repeated, one leader per term (a term being the leader key's create revision)."""
    summary = _run(tmp_path, seed=3, kinds=("kill_leader", "pause_leader", "kill_shadow", "kill_leader"),
                   cluster_extra=lease_backend)
    assert {k: summary[k] for k in INVARIANTS} == dict.fromkeys(INVARIANTS, 0), summary


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_random_fault_schedule(tmp_path):
    import random

    rng = random.Random(5)
    summary = _run(tmp_path, seed=5, kinds=[rng.choice(FAULT_KINDS) for _ in range(25)])
    assert {k: summary[k] for k in INVARIANTS} == dict.fromkeys(INVARIANTS, 0), summary


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_partitions_in_network_namespaces(tmp_path):
    from fabricd.chaos import PARTITION_KINDS
    from fabricd.netns import available

    if not available():
        pytest.skip("network namespaces need root and iproute2")
    run = ChaosRun(tmp_path / "chaos", seed=2, netns=True)
    try:
        run.start()
        for kind in PARTITION_KINDS * 3:
            run.inject(kind)
        summary = run.finish()
    finally:
        run.close()
    assert {k: summary[k] for k in INVARIANTS} == dict.fromkeys(INVARIANTS, 0), summary
