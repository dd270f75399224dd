"""A poison-proof log: whatever the leader is asked to record — valid records, records naming jobs
and roles that do not exist, every field of every record kind given a wrong type or an extreme
value — what reaches the log always applies. Replaying the log from scratch never raises and
rebuilds exactly the leader's state, and a refused record never takes good ones with it."""

from __future__ import annotations

import json
import random

import pytest

from fabricd import fuzzing
from fabricd.cluster.controller import ClusterController
from fabricd.cluster.log import CheckpointLog
from fabricd.cluster.records import RECORD_TYPES
from fabricd.cluster.state import FabricState, StateError
from fabricd.cluster.telemetry import NodeTelemetry

from .test_cluster_controller import _cfg

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

JOBS = ("j", "k")


def _proposals(rng: random.Random, n: int) -> list[tuple[str, object]]:
    """A mix: plausible records about the jobs there are, random valid-typed records, and
    per-field mutations (wrong types, 2^70, -1, huge lists, deep nesting) of every kind."""
    mutations = [(kind, json.loads(h)) for kind, cls in RECORD_TYPES.items()
                 for _, h in fuzzing.field_mutations(cls, rng) if b"[[[[[[" not in h and len(h) < 100_000]
    out = []
    for _ in range(n):
        roll = rng.random()
        kind = rng.choice(sorted(RECORD_TYPES))
        if roll < 0.4:
            data = fuzzing.valid_record(RECORD_TYPES[kind], rng)
            for key in ("job",):
                if key in data:
                    data[key] = rng.choice(JOBS)
            if kind == "job_submitted":
                data["dp_size"] = rng.randint(1, 8)
            out.append((kind, data))
        elif roll < 0.7:
            out.append((kind, fuzzing.valid_record(RECORD_TYPES[kind], rng)))
        else:
            kind, data = rng.choice(mutations)
            data.pop("v", None)
            out.append((kind, data))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_what_the_leader_records_always_replays(tmp_path, seed):
    rng = random.Random(seed)
    c = ClusterController(_cfg(tmp_path), now=0.0)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    accepted = refused = 0
    for batch_no in range(60):
        batch = _proposals(rng, rng.randint(1, 6))
        for entry in batch:  # one by one, as the daemon falls back to when a batch is refused
            try:
                c.propose([entry], 0.01 + batch_no / 1000)
                accepted += 1
            except StateError:
                refused += 1
    assert accepted > 20 and refused > 20, (accepted, refused)
    snapshot = c.state.to_snapshot()
    c.log.close()

    replayed = FabricState()
    log = CheckpointLog(tmp_path / "st" / "log", fsync=False)
    log.open()
    for rec in log.read(1, limit=1_000_000):
        replayed.apply(rec)  # never raises: every committed record applies
    log.close()
    assert replayed.to_snapshot() == snapshot


def test_a_refused_record_in_a_batch_costs_only_itself(tmp_path):
    c = ClusterController(_cfg(tmp_path), now=0.0)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    good = ("job_submitted", {"job": "j", "spec_toml": "x", "spec_origin": "/x", "fingerprint": "", "dp_size": 2})
    bad = ("trainer_progress", {"job": "j", "dp_rank": 0, "mp_rank": 0, "next_step": 2**70})
    with pytest.raises(StateError, match="next_step"):
        c.propose([good, bad], 0.01)
    assert "j" not in c.state.jobs  # the batch is atomic at this level ...
    c.propose([good], 0.02)  # ... and the daemon re-proposes the rest one by one (Daemon.propose)
    assert "j" in c.state.jobs and c.state.next_step("j", 0) == 0
    c.log.close()
