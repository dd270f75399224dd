"""Turning one micro-batch's loaded units into the arrays a trainer receives.

This is the single place that decides batch content from (plan rows, loaded units): the data
constructor calls it on the data path and ``fabricd.expect`` calls it offline, so the expected
checksums are those of the very same function. Units that could not be loaded are dropped
(the deterministic skip rule) and reported back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fabric_client.batch import checksum

from .pack import pack_micro_batch
from .sources.transform import SampleData

__all__ = ["MicroBatch", "assemble_micro_batch"]


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
    image_size: int,
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
    )
    return MicroBatch(arrays=arrays, checksum=checksum(arrays), samples=len(samples),
                      tokens=int(len(arrays["input_ids"])), skipped=skipped)
