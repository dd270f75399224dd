"""The leader's duties on a cluster of one: what peers' heartbeats say is recorded. Heartbeats are
typed records (validated at decode, see test_cluster_pieces): a rank outside the job or a job
that does not exist is ignored, never a crash and never a reason to drop the good ones."""

from __future__ import annotations

import pytest

from fabricd.cluster.telemetry import NodeTelemetry, RoleView
from fabricd.leadership import Leadership

from .test_cluster_controller import ClusterController, _cfg, _job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def test_out_of_range_declarations_are_ignored_and_the_rest_recorded(tmp_path):
    cfg = _cfg(tmp_path)
    c = ClusterController(cfg, now=0.0)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    c.propose([_job()], 0.01)  # job "j", dp_size 2

    def propose(entries, now):
        c.propose(entries, now)
        return True

    lead = Leadership(cfg, c, {}, propose)
    me = c.members.members["a"]
    me.telemetry = NodeTelemetry(trainer_hosts=[("j", 0, 0, "gpu-3", 5), ("j", 5, 0, "gpu-9", 5),
                                                ("nojob", 0, 0, "gpu-1", 5)])
    me.roles = {"j/constructor/0": RoleView(trainers=[(1, 0, 4), (7, 0, 9)]),
                "nojob/constructor/0": RoleView(trainers=[(0, 0, 3)])}
    lead.run(0.5)
    assert c.state.hosts == {"j": {"0/0": ["gpu-3", 5]}}  # rank 5 is outside dp_size 2: dropped
    assert c.state.progress["j"] == {"1/0": 4}
    c.log.close()
