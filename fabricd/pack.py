"""Packing: the loaded samples of one micro-batch → the arrays a trainer receives.

The samples are concatenated into one packed sequence (variable-length attention style: the
trainer uses ``cu_seqlens`` to keep sequences from attending to each other). Every output array
is C-contiguous and has a fixed dtype, also for zero samples, so the batch codec and the trainer
never special-case an empty micro-batch.

Output arrays (``T`` tokens, ``n`` samples, ``K`` images; ``[images] mode = "fixed"`` images
are ``S``×``S`` RGB, ``"native"`` images are ``N`` patches of ``p``×``p`` in all; see
:mod:`fabricd.images`):

=====================  ==================  ===================================================
name                   dtype[shape]        meaning
=====================  ==================  ===================================================
input_ids              int32[T]            the samples' token ids, concatenated
labels                 int32[T]            next token within the same sequence, ``-100`` at a
                                           sequence's last token, before an image token, and
                                           where a pre-tokenized source's ``labels`` /
                                           ``loss_mask`` say no loss
position_ids           int32[T]            0.. within each sequence
cu_seqlens             int32[n+1]          sequence boundaries: ``0, L0, L0+L1, ...``
pixel_values           uint8[K, S, S, 3]   fixed: the images, in token order
                       uint8[N, 3·p·p]     native: their patches, image after image
image_grid_thw         int32[K, 3]         native only: ``(1, H/p, W/p)`` of each image
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

from .images import ImageSpec

__all__ = ["PACKED_FIELDS", "NATIVE_FIELDS", "IGNORE_INDEX", "IMAGE_ID", "SampleLike", "pack_micro_batch"]

#: The byte tokenizer's image token (``fabricd.tokenizer.IMAGE_ID``): how an image block is
#: recognised in a sample that does not say where its blocks end (no ``image_lengths``).
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
#: The arrays of a native-resolution job's micro-batch: ``image_grid_thw`` follows ``pixel_values``.
NATIVE_FIELDS: tuple[str, ...] = PACKED_FIELDS[:5] + ("image_grid_thw",) + PACKED_FIELDS[5:]


class SampleLike(Protocol):
    """One loaded, tokenized unit (``fabricd.sources.transform.SampleData`` satisfies it).

    Optional attributes: ``image_lengths`` (int32[k], tokens of each image block; absent: a
    block is the run of :data:`IMAGE_ID` tokens at its start), ``image_grid`` (int32[k, 3],
    native mode) and ``targets`` (int32[L], per position the id the loss trains on or -100; absent
    or None: every token but image tokens)."""

    input_ids: np.ndarray  # int32[L]
    image_starts: np.ndarray  # int32[k]: token offset of each image block within input_ids
    pixels: np.ndarray  # uint8[k, S, S, 3] (fixed) or uint8[P, 3*p*p] (native)


def _image_mask(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    mask = np.zeros(ids.shape[0], bool)
    if lengths is None:
        return ids == IMAGE_ID
    for st, ln in zip(starts.tolist(), np.asarray(lengths).tolist()):
        mask[st:st + ln] = True
    return mask


def pack_micro_batch(
    samples: Sequence[SampleLike],
    *,
    source_ids: np.ndarray,
    sample_ids: np.ndarray,
    pieces: np.ndarray,
    image_size: int | None = None,
    images: ImageSpec | None = None,
) -> dict[str, np.ndarray]:
    """Pack ``samples`` into the arrays of :data:`PACKED_FIELDS` (fixed images) or
    :data:`NATIVE_FIELDS` (native images); see the module docstring. ``images``: the job's image
    geometry (or ``image_size`` alone, for fixed images).

    ``source_ids`` / ``sample_ids`` / ``pieces`` give one entry per sample. Raises
    ``ValueError`` naming the sample when an input is inconsistent (wrong lengths, image count
    or size, an image start outside its sequence).
    """
    if images is None:
        if image_size is None:
            raise ValueError("pack_micro_batch needs images (or image_size)")
        images = ImageSpec(mode="fixed", image_size=int(image_size)) if int(image_size) > 0 else None
        if images is None:
            raise ValueError(f"image_size = {image_size!r}: must be positive")
    native = images.mode == "native"
    n = len(samples)
    size = images.image_size
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
    pixels = [np.asarray(s.pixels, dtype=np.uint8) for s in samples]
    grids = [np.asarray(getattr(s, "image_grid", None) if getattr(s, "image_grid", None) is not None
                        else np.zeros((0, 3)), dtype=np.int32).reshape(-1, 3) for s in samples]
    lengths = np.fromiter((t.shape[0] for t in tokens), dtype=np.int64, count=n)
    for i, (t, st, px) in enumerate(zip(tokens, starts, pixels)):
        where = f"sample {i} (source {ids_meta['source_ids'][i]}, id {ids_meta['sample_ids'][i]})"
        if native:
            g = grids[i]
            if (px.ndim != 2 or px.shape[1] != images.patch_dim or g.shape[0] != st.shape[0]
                    or int(np.prod(g, axis=1).sum()) != px.shape[0]):
                raise ValueError(f"{where}: patches {px.shape} and grids {g.tolist()} for {st.shape[0]} image "
                                 f"starts and patch_size {images.patch_size}")
        elif px.ndim != 4 or px.shape[1:] != (size, size, 3) or px.shape[0] != st.shape[0]:
            raise ValueError(f"{where}: pixels {px.shape} for {st.shape[0]} image starts and image_size {size}")
        if st.size and (st.min() < 0 or st.max() >= t.shape[0]):
            raise ValueError(f"sample {i}: image starts {st.tolist()} outside its {t.shape[0]} tokens")

    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total} tokens in one micro-batch exceed int32 offsets")

    input_ids = np.concatenate(tokens) if n else np.empty(0, dtype=np.int32)
    position_ids = (np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths)).astype(np.int32)

    # targets: per position, what the loss trains on there (-100: nothing); labels shift them by one
    parts = []
    for s, t, st in zip(samples, tokens, starts):
        own = getattr(s, "targets", None)
        if own is not None:
            parts.append(np.asarray(own, dtype=np.int32).reshape(-1))
        else:
            tg = t.copy()
            tg[_image_mask(t, st, getattr(s, "image_lengths", None))] = IGNORE_INDEX
            parts.append(tg)
    targets = np.concatenate(parts) if n else np.empty(0, dtype=np.int32)
    if targets.shape[0] != total:
        raise ValueError(f"targets of {targets.shape[0]} positions for {total} tokens")
    labels = np.full(total, IGNORE_INDEX, dtype=np.int32)
    if total > 1:
        labels[:-1] = targets[1:]
    ends = cu[1:] - 1
    labels[ends[ends >= 0]] = IGNORE_INDEX  # a sequence's last token predicts nothing

    counts = np.fromiter((st.shape[0] for st in starts), dtype=np.int64, count=n)
    if counts.sum():
        image_token_offsets = (np.concatenate(starts).astype(np.int64) + np.repeat(cu[:-1], counts)).astype(np.int32)
        pixel_values = np.ascontiguousarray(np.concatenate(pixels))
    else:
        image_token_offsets = np.empty(0, dtype=np.int32)
        pixel_values = (np.empty((0, images.patch_dim), dtype=np.uint8) if native
                        else np.empty((0, size, size, 3), dtype=np.uint8))

    out = {
        "input_ids": np.ascontiguousarray(input_ids, dtype=np.int32),
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu.astype(np.int32),
        "pixel_values": pixel_values,
    }
    if native:
        out["image_grid_thw"] = np.ascontiguousarray(np.concatenate(grids) if n else np.zeros((0, 3)), dtype=np.int32)
    out["image_token_offsets"] = image_token_offsets
    out.update(ids_meta)
    return out
