"""LocalDaemon(nice=N) runs the daemon, and so every role process it starts, N steps nicer than
the caller, as systemd/fabricd.service's Nice=5 does (scripts/bench/e2e.py --fabric-nice)."""

from __future__ import annotations

import os

import psutil
import pytest

from fabricd.localnode import LocalDaemon

from ..conftest import write_job
from .test_data_path import submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_daemon_and_its_roles_run_at_the_niceness_asked_for(tmp_path, tiny_corpus):
    want = min(19, os.nice(0) + 5)
    daemon = LocalDaemon(tmp_path / "node", node_id="test", nice=5)
    daemon.start()
    try:
        submit(daemon, write_job(tmp_path / "job.toml", tiny_corpus, dp_size=1))
        roles = [r["pid"] for r in daemon.status()["jobs"]["t"]["roles"] if r.get("pid")]
        assert roles, "no role process to look at"
        assert psutil.Process(daemon.proc.pid).nice() == want
        assert {psutil.Process(pid).nice() for pid in roles} == {want}
    finally:
        daemon.stop()
