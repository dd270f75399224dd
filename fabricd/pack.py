"""Packing: the loaded samples of one micro-batch → the arrays a trainer receives.

The samples are concatenated into one packed sequence (variable-length attention style: the
trainer uses ``cu_seqlens`` to keep sequences from attending to each other). Every output array
is C-contiguous and has a fixed dtype, also for zero samples, so the batch codec and the trainer
never special-case an empty micro-batch.

Output arrays (``T`` tokens, ``n`` samples, ``K`` images of ``S``×``S`` RGB):

=====================  ==================  ===================================================
name                   dtype[shape]        meaning
=====================  ==================  ===================================================
input_ids              int32[T]            the samples' token ids, concatenated
labels                 int32[T]            next token within the same sequence, ``-100`` at a
                                           sequence's last token and before an image token
position_ids           int32[T]            0.. within each sequence
cu_seqlens             int32[n+1]          sequence boundaries: ``0, L0, L0+L1, ...``
pixel_values           uint8[K, S, S, 3]   the images, in token order
image_token_offsets    int32[K]            offset of each image block in the packed sequence
source_ids             int32[n]            per sample: index of its source in the job
sample_ids             int64[n]            per sample: id within its source
pieces                 int32[n]            per sample: which context-sized piece of the sample
=====================  ==================  ===================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["PACKED_FIELDS", "IGNORE_INDEX", "IMAGE_ID", "SampleLike", "pack_micro_batch"]

#: Token id of an image placeholder token. MUST match ``fabricd.tokenizer.IMAGE_ID`` (= 2).
IMAGE_ID = 2
#: Label value the loss ignores (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

PACKED_FIELDS: tuple[str, ...] = (
    "input_ids",
    "labels",
    "position_ids",
    "cu_seqlens",
    "pixel_values",
    "image_token_offsets",
    "source_ids",
    "sample_ids",
    "pieces",
)


class SampleLike(Protocol):
    """One loaded, tokenized unit (``fabricd.sources.transform.SampleData`` satisfies it)."""

    input_ids: np.ndarray  # int32[L]
    image_starts: np.ndarray  # int32[k]: token offset of each image block within input_ids
    pixels: np.ndarray  # uint8[k, S, S, 3]


def pack_micro_batch(
    samples: Sequence[SampleLike],
    *,
    source_ids: np.ndarray,
    sample_ids: np.ndarray,
    pieces: np.ndarray,
    image_size: int,
) -> dict[str, np.ndarray]:
    """Pack ``samples`` into the arrays of :data:`PACKED_FIELDS` (see the module docstring).

    ``source_ids`` / ``sample_ids`` / ``pieces`` give one entry per sample. Raises
    ``ValueError`` naming the sample when an input is inconsistent (wrong lengths, image count
    or size, an image start outside its sequence).
    """
    n = len(samples)
    size = int(image_size)
    if size <= 0:
        raise ValueError(f"image_size = {image_size!r}: must be positive")
    ids_meta = {
        "source_ids": np.ascontiguousarray(source_ids, dtype=np.int32).reshape(-1),
        "sample_ids": np.ascontiguousarray(sample_ids, dtype=np.int64).reshape(-1),
        "pieces": np.ascontiguousarray(pieces, dtype=np.int32).reshape(-1),
    }
    for name, arr in ids_meta.items():
        if arr.shape[0] != n:
            raise ValueError(f"{name} has {arr.shape[0]} entries for {n} samples")

    tokens = [np.asarray(s.input_ids, dtype=np.int32).reshape(-1) for s in samples]
    starts = [np.asarray(s.image_starts, dtype=np.int32).reshape(-1) for s in samples]
    images = [np.asarray(s.pixels, dtype=np.uint8) for s in samples]
    lengths = np.fromiter((t.shape[0] for t in tokens), dtype=np.int64, count=n)
    for i, (t, st, px) in enumerate(zip(tokens, starts, images)):
        if px.ndim != 4 or px.shape[1:] != (size, size, 3) or px.shape[0] != st.shape[0]:
            raise ValueError(
                f"sample {i} (source {ids_meta['source_ids'][i]}, id {ids_meta['sample_ids'][i]}): "
                f"pixels {px.shape} for {st.shape[0]} image starts and image_size {size}"
            )
        if st.size and (st.min() < 0 or st.max() >= t.shape[0]):
            raise ValueError(f"sample {i}: image starts {st.tolist()} outside its {t.shape[0]} tokens")

    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total} tokens in one micro-batch exceed int32 offsets")

    input_ids = np.concatenate(tokens) if n else np.empty(0, dtype=np.int32)
    position_ids = (np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths)).astype(np.int32)

    labels = np.full(total, IGNORE_INDEX, dtype=np.int32)
    if total > 1:
        labels[:-1] = input_ids[1:]
        labels[:-1][input_ids[1:] == IMAGE_ID] = IGNORE_INDEX
    ends = cu[1:] - 1
    labels[ends[ends >= 0]] = IGNORE_INDEX  # a sequence's last token predicts nothing

    counts = np.fromiter((st.shape[0] for st in starts), dtype=np.int64, count=n)
    if counts.sum():
        image_token_offsets = (np.concatenate(starts).astype(np.int64) + np.repeat(cu[:-1], counts)).astype(np.int32)
        pixel_values = np.ascontiguousarray(np.concatenate(images))
    else:
        image_token_offsets = np.empty(0, dtype=np.int32)
        pixel_values = np.empty((0, size, size, 3), dtype=np.uint8)

    return {
        "input_ids": np.ascontiguousarray(input_ids, dtype=np.int32),
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu.astype(np.int32),
        "pixel_values": pixel_values,
        "image_token_offsets": image_token_offsets,
        **ids_meta,
    }
