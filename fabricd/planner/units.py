"""Units and THE length rule: how many units a sample makes and how long each one is.

A *unit* is ``(sample id, piece)``: a sample, or one context-sized piece of a long text-only
sample. The rule is implemented once, here, by :func:`piece_counts` and :func:`piece_lengths`;
the planner (:func:`build_units`) and the sample transform (``fabricd.sources.transform``) both
call them, so the lengths the planner balances and packs by are the lengths the transform makes.

The rule, for a sample of ``text_tokens`` tokens (BOS/EOS included) and ``num_images`` images
taking ``image_tokens`` tokens in all (``num_images * image_tokens`` when every image takes the
same, as in ``[images] mode = "fixed"``; the sum of each image's count from its header
dimensions in ``"native"`` mode), full length ``L = text_tokens + image_tokens``:

* text-only (``num_images == 0``) under ``"split"``: ``ceil(L / max_seq_len)`` pieces, piece
  ``j`` of ``min(max_seq_len, L - j * max_seq_len)`` tokens;
* any other sample: one piece of ``min(L, max_seq_len)`` tokens. This is exact except when the
  context boundary cuts an image block of a truncated sample: the transform drops that block and
  the unit ends where it starts, so the unit is shorter than the rule says (by less than
  ``image_tokens``). The index does not record where placeholders sit, so the rule is then an
  upper bound, which is what balancing and micro-batch packing need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["LONG_SAMPLE_POLICIES", "SourceUnits", "piece_counts", "piece_lengths", "build_units"]

log = logging.getLogger(__name__)

LONG_SAMPLE_POLICIES = ("split", "truncate")


def _image_total(num_images: np.ndarray, image_tokens: int | np.ndarray) -> np.ndarray:
    """Tokens of each sample's images: ``image_tokens`` is per image (an int, every image the
    same) or per sample (an array: the sample's images in all)."""
    if np.ndim(image_tokens) == 0:
        return np.asarray(num_images, dtype=np.int64) * int(image_tokens)
    return np.asarray(image_tokens, dtype=np.int64)


def _full_lengths(text_tokens: np.ndarray, num_images: np.ndarray, image_tokens: int | np.ndarray) -> np.ndarray:
    return np.asarray(text_tokens, dtype=np.int64) + _image_total(num_images, image_tokens)


def piece_counts(text_tokens: np.ndarray, num_images: np.ndarray, *, max_seq_len: int, long_samples: str,
                 image_tokens: int | np.ndarray) -> np.ndarray:
    """int64: number of units (pieces) of each sample, by the module's rule. Vectorized."""
    imgs = np.asarray(num_images, dtype=np.int64)
    if long_samples != "split":
        return np.ones(np.broadcast(np.asarray(text_tokens), imgs).shape, dtype=np.int64)
    full = _full_lengths(text_tokens, imgs, image_tokens)
    return np.where(imgs == 0, -(-full // int(max_seq_len)), 1)


def piece_lengths(text_tokens: np.ndarray, num_images: np.ndarray, piece: np.ndarray, *, max_seq_len: int,
                  image_tokens: int | np.ndarray) -> np.ndarray:
    """int64: token length of unit ``(sample, piece)`` by the module's rule (0 for a piece past
    the sample's end). Vectorized; arguments broadcast."""
    msl = int(max_seq_len)
    full = _full_lengths(text_tokens, num_images, image_tokens)
    return np.clip(full - np.asarray(piece, dtype=np.int64) * msl, 0, msl)


@dataclass(frozen=True)
class SourceUnits:
    """The units of one source, in sample order (pieces of a sample are consecutive)."""

    name: str
    sample_id: np.ndarray  # int64[N]  sample id = row of the source's index
    piece: np.ndarray  # int32[N]  0 unless the sample was split
    tokens: np.ndarray  # int32[N]  length of the unit in tokens
    images: np.ndarray  # int32[N]  images in the unit
    #: vision work of the unit's images: sum of their patch counts, and of their squares
    #: (float64[N]); zeros when the job's cost model has no vision terms to weigh
    patches: np.ndarray | None = None
    patches_sq: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])


def build_units(
    name: str,
    text_tokens: np.ndarray,
    num_images: np.ndarray,
    *,
    max_seq_len: int,
    long_samples: str,
    image_tokens: int | np.ndarray,
    patches: np.ndarray | None = None,
    patches_sq: np.ndarray | None = None,
    exact: np.ndarray | None = None,
) -> SourceUnits:
    """Expand samples into units by the module's length rule (:func:`piece_counts`,
    :func:`piece_lengths`). ``image_tokens``: per image (an int) or per sample (an array, the
    sample's images in all). ``patches`` / ``patches_sq``: per sample, the sum of its images'
    patch counts and of their squares (vision cost; None: from ``image_tokens`` when it is an
    int, else zeros). A unit carries its sample's ``num_images`` and vision work (an upper bound
    when truncated). ``exact``: per sample, the exact length of a one-unit sample with images
    when the layout is known (``-1``: use the rule's upper bound); see
    ``fabricd.sources.transform.truncated_lengths``. Validates every input and names the source
    and the bad value. O(N + units).
    """
    if long_samples not in LONG_SAMPLE_POLICIES:
        raise ValueError(f"source {name!r}: unknown long_samples policy {long_samples!r}; expected one of {LONG_SAMPLE_POLICIES}")
    if isinstance(max_seq_len, bool) or int(max_seq_len) != max_seq_len or not 1 <= int(max_seq_len) < 2**31:
        raise ValueError(f"source {name!r}: max_seq_len must be an integer in [1, 2**31), got {max_seq_len!r}")
    scalar = np.ndim(image_tokens) == 0
    if scalar and (isinstance(image_tokens, bool) or int(image_tokens) != image_tokens or int(image_tokens) < 0):
        raise ValueError(f"source {name!r}: image_tokens must be an integer >= 0, got {image_tokens!r}")
    msl = int(max_seq_len)
    text = np.asarray(text_tokens).astype(np.int64, copy=False).ravel()
    imgs = np.asarray(num_images).astype(np.int64, copy=False).ravel()
    if text.shape != imgs.shape:
        raise ValueError(f"source {name!r}: text_tokens has {text.shape[0]} rows but num_images has {imgs.shape[0]}")
    img_total = _image_total(imgs, image_tokens).ravel()
    if img_total.shape != text.shape:
        raise ValueError(f"source {name!r}: image_tokens has {img_total.shape[0]} rows for {text.shape[0]} samples")
    if text.size:
        bad = np.flatnonzero(text <= 0)
        if bad.size:
            raise ValueError(f"source {name!r}: sample {int(bad[0])} has text_tokens {int(text[bad[0]])} (must be > 0, EOS included)")
        bad = np.flatnonzero(imgs < 0)
        if bad.size:
            raise ValueError(f"source {name!r}: sample {int(bad[0])} has num_images {int(imgs[bad[0]])} (must be >= 0)")
        bad = np.flatnonzero(img_total < 0)
        if bad.size:
            raise ValueError(f"source {name!r}: sample {int(bad[0])} has image_tokens {int(img_total[bad[0]])} (must be >= 0)")
        if int(imgs.max()) >= 2**31:
            raise ValueError(f"source {name!r}: num_images {int(imgs.max())} does not fit int32")
    npieces = piece_counts(text, imgs, max_seq_len=msl, long_samples=long_samples, image_tokens=img_total)
    total = int(npieces.sum())
    sample_id = np.repeat(np.arange(text.size, dtype=np.int64), npieces)
    first = np.cumsum(npieces) - npieces
    piece = np.arange(total, dtype=np.int64) - np.repeat(first, npieces)
    tokens = piece_lengths(text[sample_id], imgs[sample_id], piece, max_seq_len=msl, image_tokens=img_total[sample_id])
    if exact is not None:
        ex = np.asarray(exact, dtype=np.int64).ravel()[sample_id]
        use = (ex >= 0) & (npieces[sample_id] == 1) & (imgs[sample_id] > 0)
        tokens = np.where(use, np.minimum(ex, tokens), tokens)
    pt = psq = None  # no vision work to weigh: no per-unit arrays (16 bytes a unit saved)
    if patches is not None:
        p1 = np.asarray(patches, dtype=np.float64).ravel()
        p2 = np.asarray(patches_sq if patches_sq is not None else p1 * p1, dtype=np.float64).ravel()
        pt, psq = p1[sample_id], p2[sample_id]
    return SourceUnits(
        name=str(name),
        sample_id=sample_id,
        piece=piece.astype(np.int32),
        tokens=tokens.astype(np.int32),
        images=imgs[sample_id].astype(np.int32),
        patches=pt,
        patches_sq=psq,
    )
