"""A daemon that plans with numpy (``FABRICD_NATIVE=0``) serves exactly the batches an oracle
planning with the C loops computes: daemons with and without the module agree on every step."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from fabricd.localnode import LocalDaemon
from fabricd.planner import native

from ..conftest import write_job
from .test_data_path import assert_exact, expected, run_ranks, submit

pytestmark = [pytest.mark.integration]


@pytest.mark.timeout(240)
def test_a_daemon_planning_with_numpy_serves_what_the_c_loops_plan(tmp_path, tiny_corpus):
    if native.module is None:
        if os.environ.get(native.ENV, "").strip() == "0":
            pytest.skip(f"{native.ENV}=0: this process plans with numpy too")
        pytest.fail(f"this process should plan with the C loops: {native.describe()}")
    dp, steps = 10, 3  # above 8 ranks LPT runs in chunks (one of the C loops)
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=dp, samples_per_step=40)
    daemon = LocalDaemon(tmp_path / "node", node_id="numpy", extra_env={native.ENV: "0"})
    daemon.start()
    try:
        assert daemon.status()["planner"] == f"numpy ({native.ENV}=0)"
        shown = subprocess.run([sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()",
                                "--address", daemon.address, "status"], capture_output=True, text=True, check=True,
                               timeout=30).stdout
        assert f"planner: numpy ({native.ENV}=0)" in shown
        submit(daemon, job_file)
        got = run_ranks(daemon.address, "t", dp, 1, steps)
        want = expected(job_file, range(steps))  # planned here, with the C loops
        for (d, _), records in got.items():
            assert_exact(records, want, d)
    finally:
        pids = [daemon.proc.pid] + [p.pid for p in daemon.descendants()]
        daemon.stop()
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes outlived the daemon: {alive}"
