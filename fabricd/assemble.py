"""Turning one micro-batch's loaded units into the arrays a trainer receives.

This is the single place that decides batch content from (plan rows, loaded units): the data
constructor calls it on the data path and ``fabricd.expect`` calls it offline, so the expected
checksums are those of the very same function.

The skip rule (the determinism contract's point 4), decided here by :func:`apply_skip_records`:
a unit is dropped from step ``s`` if and only if the log records it as skipped *for step s*
(``sample_skipped`` with that step); such a unit is dropped whether or not it loads this time,
and every other unit is delivered. A unit that fails to load and has no record yet makes its
rank's batches of that step *undeliverable* until its skip is committed to the log (the
constructor reports it and waits). Before reporting, the constructor retries the load; when the
retry succeeds the unit is delivered and nothing is recorded (a reported unit is never delivered:
a report cannot be withdrawn). So the content of a step depends only on the log.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from fabric_client.batch import checksum

from .images import ImageSpec
from .pack import pack_micro_batch
from .sources.transform import SampleData

__all__ = ["MicroBatch", "RECORDED_SKIP", "UnitKey", "apply_skip_records", "assemble_micro_batch"]

#: (source index in the job spec, sample id, piece): one unit of a step's plan.
UnitKey = tuple[int, int, int]
#: The reason a unit recorded as skipped is dropped with (whatever its load gave this time).
RECORDED_SKIP = "recorded as skipped in the log"


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's arrays, their checksum, and the units skipped from it."""

    arrays: dict[str, np.ndarray]
    checksum: str
    samples: int
    tokens: int
    skipped: tuple[tuple[int, str], ...]   # (row position within the micro-batch, reason)


def assemble_micro_batch(
    units: Sequence[SampleData | str],
    *,
    source_ids: np.ndarray,
    sample_ids: np.ndarray,
    pieces: np.ndarray,
    images: ImageSpec | None = None,
    image_size: int | None = None,
) -> MicroBatch:
    """Pack the loaded ``units`` (a reason string for each one that failed) into a micro-batch."""
    keep = np.array([isinstance(u, SampleData) for u in units], dtype=bool)
    skipped = tuple((i, u) for i, u in enumerate(units) if not isinstance(u, SampleData))
    samples = [u for u in units if isinstance(u, SampleData)]
    arrays = pack_micro_batch(
        samples,
        source_ids=np.asarray(source_ids)[keep],
        sample_ids=np.asarray(sample_ids)[keep],
        pieces=np.asarray(pieces)[keep],
        image_size=image_size,
        images=images,
    )
    return MicroBatch(arrays=arrays, checksum=checksum(arrays), samples=len(samples),
                      tokens=int(len(arrays["input_ids"])), skipped=skipped)


def apply_skip_records(
    units: Sequence[SampleData | str | None],
    *,
    source_ids: np.ndarray,
    sample_ids: np.ndarray,
    pieces: np.ndarray,
    recorded: Collection[UnitKey],
) -> tuple[list[SampleData | str | None], list[int]]:
    """Apply the log's skip records of one step to loaded ``units`` (a reason string for a unit that
    failed, ``None`` for one not loaded).

    Returns the units to assemble (every recorded unit replaced by :data:`RECORDED_SKIP`) and the
    positions of the units that failed without a record: while that list is not empty, the batch
    must not be delivered.
    """
    out: list[SampleData | str | None] = list(units)
    unrecorded = []
    if len(out) != len(source_ids) or len(out) != len(sample_ids) or len(out) != len(pieces):
        raise ValueError(f"{len(out)} units for {len(source_ids)} plan rows")
    for i in range(len(out)):
        if recorded and (int(source_ids[i]), int(sample_ids[i]), int(pieces[i])) in recorded:
            out[i] = RECORDED_SKIP
        elif isinstance(out[i], str):
            unrecorded.append(i)
    return out, unrecorded
