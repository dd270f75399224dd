"""What the leader records of its trainers' progress: one compact ``job_progress`` record per job.

Constructors report where each trainer rank is (``[dp_rank, mp_rank, next_step]``) in their
members' heartbeats. Recording every rank's every step would cost the log O(ranks) per step; a
``job_progress`` record instead says "every rank reached ``floor``" plus a short list of ranks
well ahead of what is recorded for them, so in steady state (ranks advancing together) it costs
one small record per job per recording, whatever the number of ranks.

Promises of :func:`progress_record`:

- The floor is raised only to a step *every* rank of the job (``dp_size`` × ``mp_size``) is
  known to have reached, by a report or by the state; while some rank is unknown (or the
  ``mp_size`` is), it stays where it is.
- A rank is listed only if its report is at least ``min_gain`` steps past what the state (with
  the new floor) already says for it; at most ``max_ahead`` ranks, those gaining most first.
- Nothing is proposed when neither the floor nor any listed rank would move: ``None``.

Pure: it reads the state and the reports, and returns the record's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fabric_client.limits import MAX_STEP
from fabricd.cluster.state import MAX_PROGRESS_AHEAD, FabricState

__all__ = ["MIN_GAIN", "progress_record"]

#: Steps a rank must be ahead of what is recorded for it to be listed on its own: ranks one step
#: apart (reports of different heartbeat phases) are the steady state, covered by the floor.
MIN_GAIN = 2


def progress_record(state: FabricState, job: str, reported: Mapping[tuple[int, int], int], mp_size: int | None,
                    *, min_gain: int = MIN_GAIN, max_ahead: int = MAX_PROGRESS_AHEAD) -> dict[str, Any] | None:
    """The data of a ``job_progress`` record for ``job`` (active) from the ranks' reported next
    steps, or None if it would change nothing. ``mp_size`` None: the floor is not raised."""
    dp_size = state.jobs[job]["dp_size"]
    ranks = {r: s for r, s in reported.items()
             if r[0] < dp_size and (mp_size is None or r[1] < mp_size) and s <= MAX_STEP}
    floor = state.floor_step(job)
    new_floor = floor
    if mp_size is not None:
        reached = [max(step, state.next_step(job, dp, mp)) for (dp, mp), step in ranks.items()]
        for key, step in state.progress.get(job, {}).items():
            rank = _rank(key)
            if rank is not None and rank not in ranks and rank[0] < dp_size and rank[1] < mp_size:
                reached.append(step)
        if len(reached) == dp_size * mp_size:
            new_floor = max(floor, min(reached))
    gains = []
    for (dp, mp), step in ranks.items():
        known = max(state.next_step(job, dp, mp), new_floor)
        if step - known >= min_gain:
            gains.append((known - step, dp, mp, step))
    ahead = [[dp, mp, step] for _, dp, mp, step in sorted(gains)[:max_ahead]]
    if new_floor == floor and not ahead:
        return None
    return {"job": job, "floor": new_floor, "ahead": ahead}


def _rank(key: str) -> tuple[int, int] | None:
    dp, _, mp = key.partition("/")
    return (int(dp), int(mp)) if dp.isdigit() and mp.isdigit() else None
