"""From a raw sample to the tokens and pixels of one training unit.

A *unit* is ``(sample id, piece)``. The planner sizes units from the index alone, so the
transform follows one length rule, stated here; its vectorized form lives once, in
:mod:`fabricd.planner.units` (:func:`num_pieces` / :func:`unit_lengths` here call it), and the
unit test ``tests/unit/test_length_rule.py`` checks :func:`transform` against it:

* The full token sequence of a sample is: the images that have no placeholder (each an
  ``image_tokens``-long block of ``IMAGE_ID``), then the text split at its ``<image>``
  placeholders with placeholder ``i`` replaced by image ``i``'s block (placeholders beyond the
  number of images removed), then ``EOS_ID``. Text bytes map to ``byte + BYTE_OFFSET``. Its
  length is ``L = text_tokens + num_images * image_tokens``.
* A sample without images under ``long_samples == "split"`` has ``ceil(L / max_seq_len)``
  pieces; piece ``j`` is ``full[j*max_seq_len : (j+1)*max_seq_len]``.
* Any other sample has one piece, ``full[:max_seq_len]``, except that an image block cut by that
  boundary is dropped whole: the unit then ends where that block starts (and can be shorter than
  ``min(L, max_seq_len)``). Images wholly beyond the cut are dropped too. A unit left empty (an
  image block longer than ``max_seq_len`` at the very start) is a SampleError.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fabricd.errors import SampleError
from fabricd.planner.units import LONG_SAMPLE_POLICIES, piece_counts, piece_lengths
from fabricd.sources.index import SourceIndex
from fabricd.sources.reader import RawSample, SourceReader
from fabricd.tokenizer import EOS_ID, IMAGE_ID, IMAGE_PLACEHOLDER, encode_bytes

__all__ = [
    "LONG_SAMPLE_MODES",
    "TransformSpec",
    "SampleData",
    "transform",
    "decode_image",
    "num_pieces",
    "unit_lengths",
    "SampleLoader",
]

log = logging.getLogger(__name__)

LONG_SAMPLE_MODES = LONG_SAMPLE_POLICIES


@dataclass(frozen=True)
class TransformSpec:
    """How samples become units: context length, long-sample policy and image geometry."""

    max_seq_len: int
    long_samples: str
    image_tokens: int
    image_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {self.max_seq_len!r}")
        if self.long_samples not in LONG_SAMPLE_MODES:
            raise ValueError(f"long_samples must be one of {LONG_SAMPLE_MODES}, got {self.long_samples!r}")
        if not isinstance(self.image_tokens, int) or self.image_tokens < 1:
            raise ValueError(f"image_tokens must be a positive int, got {self.image_tokens!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")


@dataclass(frozen=True, eq=False)
class SampleData:
    """One unit: its tokens, where each image block starts, and the images' pixels (same order)."""

    input_ids: np.ndarray
    image_starts: np.ndarray
    pixels: np.ndarray


def num_pieces(num_images: np.ndarray, text_tokens: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Number of units (pieces) of each sample, from index columns (``int64``): the planner's
    :func:`fabricd.planner.units.piece_counts`, the one implementation of the rule."""
    return piece_counts(text_tokens, num_images, max_seq_len=spec.max_seq_len, long_samples=spec.long_samples,
                        image_tokens=spec.image_tokens)


def unit_lengths(num_images: np.ndarray, text_tokens: np.ndarray, pieces: np.ndarray,
                 spec: TransformSpec) -> np.ndarray:
    """Token length of unit ``(sample, piece)`` by the length rule (``int64``): the planner's
    :func:`fabricd.planner.units.piece_lengths`, the one implementation of the rule.

    Exact, except for a truncated sample whose cut falls inside an image block: its unit is
    shorter than this (it ends where that block starts). The index does not record placeholder
    positions, so this is then an upper bound.
    """
    return piece_lengths(text_tokens, num_images, pieces, max_seq_len=spec.max_seq_len,
                         image_tokens=spec.image_tokens)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to ``uint8[size, size, 3]`` RGB (BILINEAR resize).

    Raises ValueError (or whatever Pillow raises) on corrupt bytes; refuses images with more
    pixels than Pillow's decompression-bomb limit before decoding them.
    """
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and w * h > limit:
            raise ValueError(f"image of {w}x{h} pixels exceeds the decompression-bomb limit of {limit}")
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # DCT-domain downscale: never below the requested size
        out = img if img.mode in ("RGB", "L") else img.convert("RGB")
        if out.size != (size, size):
            out = out.resize((size, size), Image.BILINEAR)  # gray is resized before it is widened
        if out.mode != "RGB":
            out = out.convert("RGB")
        return np.asarray(out, dtype=np.uint8)


def _layout(raw: RawSample) -> tuple[list[int], list[bytes]]:
    """(image order in the sequence, text parts): images ``order[:lead]`` go first, where
    ``lead = len(order) - (len(parts) - 1)``, then ``parts[0], order[lead], parts[1], ...``."""
    parts = raw.text.split(IMAGE_PLACEHOLDER)
    n = len(raw.images)
    holders = len(parts) - 1
    if holders > n:  # placeholders beyond the number of images are removed
        parts = parts[:n] + ["".join(parts[n:])]
        holders = n
    # placeholder i takes image i; images without a placeholder go first, in schema order
    order = list(range(holders, n)) + list(range(holders))
    return order, [p.encode("utf-8") for p in parts]


def transform(raw: RawSample, piece: int, spec: TransformSpec, *, source: str = "",
              sample_id: int = -1) -> SampleData:
    """The unit ``piece`` of ``raw`` under ``spec``, by the module's length rule.

    Decodes only the images that survive truncation. Raises SampleError for a piece that does
    not exist, an empty unit, or an image that cannot be decoded.
    """
    piece = int(piece)
    order, parts = _layout(raw)
    m = spec.max_seq_len
    if not raw.images:
        data = b"".join(parts)
        total = len(data) + 1
        pieces = -(-total // m) if spec.long_samples == "split" else 1
        if piece < 0 or piece >= pieces:
            raise SampleError(source, sample_id, f"piece {piece} out of range: the sample has {pieces} piece(s)")
        lo, hi = piece * m, min((piece + 1) * m, total)
        ids = np.empty(hi - lo, dtype=np.int32)
        text_hi = min(hi, total - 1)
        ids[: max(text_hi - lo, 0)] = encode_bytes(data[lo:text_hi])
        if hi == total:
            ids[-1] = EOS_ID
        return SampleData(ids, np.zeros(0, np.int32), np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8))

    if piece != 0:
        raise SampleError(source, sample_id, f"piece {piece} out of range: a sample with images has 1 piece")
    lead = len(order) - (len(parts) - 1)
    segments: list[np.ndarray] = []
    starts: list[int] = []
    kept: list[int] = []
    length = 0
    block = np.full(spec.image_tokens, IMAGE_ID, dtype=np.int32)

    def add_image(img: int) -> bool:
        nonlocal length
        if length + spec.image_tokens > m:
            return False  # cut by the boundary or wholly beyond: dropped, the unit ends here
        starts.append(length)
        kept.append(img)
        segments.append(block)
        length += spec.image_tokens
        return True

    def add_tokens(toks: np.ndarray) -> bool:
        nonlocal length
        room = m - length
        segments.append(toks[:room])
        length += min(len(toks), room)
        return len(toks) <= room

    full = True
    for img in order[:lead]:
        if not add_image(img):
            full = False
            break
    if full:
        for k, part in enumerate(parts):
            if k > 0 and not add_image(order[lead + k - 1]):
                full = False
                break
            if not add_tokens(encode_bytes(part)):
                full = False
                break
        if full:
            add_tokens(np.array([EOS_ID], np.int32))
    if length == 0:
        raise SampleError(source, sample_id,
                          f"empty unit: an image block of {spec.image_tokens} tokens does not fit "
                          f"in max_seq_len {m}")
    ids = np.concatenate(segments).astype(np.int32, copy=False)
    pixels = np.empty((len(kept), spec.image_size, spec.image_size, 3), dtype=np.uint8)
    for k, img in enumerate(kept):
        try:
            pixels[k] = decode_image(raw.images[img], spec.image_size)
        except Exception as e:  # noqa: BLE001 - any decoder failure is this sample's, never fatal
            raise SampleError(source, sample_id, f"image {img}: cannot decode: {type(e).__name__}: {e}") from e
    return SampleData(ids, np.asarray(starts, dtype=np.int32), pixels)


class SampleLoader:
    """What a source-loader process does: read + decode + transform units of one source."""

    def __init__(self, index: SourceIndex, spec: TransformSpec, *, cache_bytes: int = 256 << 20,
                 roots: Sequence[Path] | None = None) -> None:
        """``roots``: the node's data roots, re-checked whenever a data file is opened (see
        :class:`~fabricd.sources.reader.SourceReader`); None for offline tools."""
        self.index = index
        self.spec = spec
        self.reader = SourceReader(index, cache_bytes=cache_bytes, roots=roots)

    def load(self, sample_ids: np.ndarray, pieces: np.ndarray) -> list[SampleData | SampleError]:
        """Units ``(sample_ids[i], pieces[i])``, in order; a failing unit is a SampleError in its
        slot. A sample asked for with several pieces is read once."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        pcs = np.asarray(pieces, dtype=np.int64).reshape(-1)
        if ids.shape != pcs.shape:
            raise ValueError(f"sample_ids and pieces differ in length: {ids.shape[0]} != {pcs.shape[0]}")
        uniq, inverse = np.unique(ids, return_inverse=True)
        raws = self.reader.read(uniq)
        out: list[SampleData | SampleError] = []
        name = self.index.name
        for k in range(ids.shape[0]):
            raw = raws[inverse[k]]
            if isinstance(raw, SampleError):
                out.append(raw)
                continue
            try:
                out.append(transform(raw, int(pcs[k]), self.spec, source=name, sample_id=int(ids[k])))
            except SampleError as e:
                out.append(e)
        return out

    def close(self) -> None:
        """Release the reader's files and cache."""
        self.reader.close()
