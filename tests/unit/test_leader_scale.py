"""What keeps the leader's per-turn cost independent of the state's size: recent records are read
from memory (not once per shadow from disk), and a proposal does not copy the state, yet a
refused proposal still leaves the state exactly as the log says."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabricd.cluster.controller import ClusterController
from fabricd.cluster import log as log_module
from fabricd.cluster.log import CheckpointLog
from fabricd.cluster.log_files import encode_record
from fabricd.cluster.state import FabricState, StateError

from .test_cluster_controller import _cfg, _job
from .test_replication import make_records

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_recent_records_come_from_memory_and_equal_what_the_files_hold(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(log_module, "RECENT_RECORDS", 1000)
    log = CheckpointLog(tmp_path / "log", fsync=False, segment_bytes=20_000)
    state = log.open()
    n = 1500
    for _ in range(0, n, 100):
        log.append(make_records(state, 1, 100))
    file_reads = []
    real = CheckpointLog._read_segment
    monkeypatch.setattr(CheckpointLog, "_read_segment",
                        lambda self, *a: file_reads.append(a) or real(self, *a))
    assert len(log._recent) == 1000
    recent = log.read(n - 300, 400)
    assert [r.seq for r in recent] == list(range(n - 300, n + 1)) and file_reads == []
    assert log.term_at(n - 5) == 1 and file_reads == []
    old = log.read(3, 10)  # older than what memory holds: from the files
    assert file_reads and [r.seq for r in old] == list(range(3, 13))
    log.truncate_after(n - 50)
    log.append(make_records(log.state_at(n - 50), 2, 3))
    mine = log.read(n - 60, 100)
    assert log._recent_bytes == sum(len(encode_record(r)) for r in log._recent)
    log.close()
    again = CheckpointLog(tmp_path / "log", fsync=False, segment_bytes=20_000)
    again.open()
    assert again.read(n - 60, 100) == mine and [r.term for r in mine][-4:] == [1, 2, 2, 2]
    again.close()


def test_a_proposal_does_not_copy_the_state_and_a_refused_one_changes_nothing(tmp_path: Path,
                                                                             monkeypatch) -> None:
    c = ClusterController(_cfg(tmp_path), now=0.0)
    c.tick(0.0, telemetry=dict, roles=dict)
    c.propose([_job()], 0.01)

    def no_copy(self):
        raise AssertionError("propose copied the whole state")

    monkeypatch.setattr(FabricState, "copy", no_copy)
    c.propose([("trainer_progress", {"job": "j", "dp_rank": 1, "mp_rank": 0, "next_step": 3})], 0.02)
    before, last = c.state.to_snapshot(), c.log.last_position
    with pytest.raises(StateError):  # the second record refers to a job that does not exist
        c.propose([("trainer_progress", {"job": "j", "dp_rank": 0, "mp_rank": 0, "next_step": 9}),
                   ("job_cancelled", {"job": "nope", "reason": ""})], 0.03)
    assert c.state.to_snapshot() == before and c.log.last_position == last
    assert c.replica.state is c.state
    c.propose([("job_progress", {"job": "j", "floor": 4, "ahead": []})], 0.04)
    assert c.state.next_step("j", 0) == 4
    c.log.close()
    assert ClusterController(_cfg(tmp_path), now=10.0).state == c.state
