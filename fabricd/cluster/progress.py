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

__all__ = ["MIN_GAIN", "delivered_frontier", "progress_record"]

#: Steps a rank must be ahead of what is recorded for it to be listed on its own: ranks one step
#: apart (reports of different heartbeat phases) are the steady state, covered by the floor.
MIN_GAIN = 2


def progress_record(state: FabricState, job: str, reported: Mapping[tuple[int, int], int], mp_size: int | None,
                    *, min_gain: int = MIN_GAIN, max_ahead: int = MAX_PROGRESS_AHEAD) -> dict[str, Any] | None:
    """The data of a ``job_progress`` record for ``job`` (active) from the ranks' reported next
    steps, or None if it would change nothing. ``mp_size`` None: the floor is not raised."""
    dp_size = state.jobs[job].dp_size
    floor = state.floor_step(job)
    # what the state holds per rank, by (dp, mp): O(ranks ahead of the floor), small in steady state
    recorded: dict[tuple[int, int], int] = {}
    for key, step in state.progress.get(job, {}).items():
        rank = _rank(key)
        if rank is not None and rank[0] < dp_size and (mp_size is None or rank[1] < mp_size):
            recorded[rank] = step
    known: dict[tuple[int, int], int] = {}  # rank -> (reported step, what the state says), reported ranks only
    lowest = None
    for rank, step in reported.items():
        if rank[0] >= dp_size or (mp_size is not None and rank[1] >= mp_size) or step > MAX_STEP:
            continue
        have = max(recorded.get(rank, 0), floor)
        known[rank] = step
        reached = step if step > have else have
        if lowest is None or reached < lowest:
            lowest = reached
    new_floor = floor
    if mp_size is not None and lowest is not None:
        silent = [step for rank, step in recorded.items() if rank not in known]
        if len(known) + len(silent) == dp_size * mp_size:
            new_floor = max(floor, min([lowest, *silent]))
    gains = []
    for (dp, mp), step in known.items():
        have = max(recorded.get((dp, mp), 0), new_floor)
        if step - have >= min_gain:
            gains.append((have - step, dp, mp, step))
    ahead = [[dp, mp, step] for _, dp, mp, step in sorted(gains)[:max_ahead]]
    if new_floor == floor and not ahead:
        return None
    return {"job": job, "floor": new_floor, "ahead": ahead}


def delivered_frontier(state: FabricState, job: str, live: Mapping[tuple[int, int], int], prefetch: int) -> int:
    """The first step no trainer of ``job`` can have received and no constructor built: the
    furthest step any rank is known to be at (recorded progress, or ``live`` reports from the
    constructors' heartbeats), plus the ``prefetch`` steps a constructor builds ahead of it, plus
    one. Steps before it are fixed; a DP-size change or a plan change takes effect at or after it."""
    reached = max([state.progress_floor.get(job, 0), *state.progress.get(job, {}).values(), *live.values()])
    return reached + int(prefetch) + 1


def _rank(key: str) -> tuple[int, int] | None:
    dp, _, mp = key.partition("/")
    return (int(dp), int(mp)) if dp.isdigit() and mp.isdigit() else None
