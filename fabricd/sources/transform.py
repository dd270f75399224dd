"""From a raw sample to the tokens and pixels of one training unit.

A *unit* is ``(sample id, piece)``. The planner sizes units from the index alone, so the
transform follows one length rule, stated here; its vectorized form lives once, in
:mod:`fabricd.planner.units` (:func:`num_pieces` / :func:`unit_lengths` here call it), and the
unit tests ``tests/unit/test_length_rule.py`` and ``tests/integration/test_exact_lengths.py``
check :func:`transform` against it:

* The full token sequence of a text sample is: ``BOS`` (if the tokenizer adds one), the images
  that have no placeholder, then the text split at its ``<image>`` placeholders with placeholder
  ``i`` replaced by image ``i``'s block (placeholders beyond the number of images removed; see
  :func:`fabricd.sources.formats.base.text_parts`), then ``EOS``. Each text part is encoded by
  the tokenizer's chunk rule (:mod:`fabricd.text`); an image block is ``image_id`` repeated as
  many times as the image takes tokens (:mod:`fabricd.images`). Its length is
  ``L = text_tokens + image tokens``, both from the index.
* A pre-tokenized sample's full sequence is its stored ids; nothing is added.
* A sample without images under ``long_samples == "split"`` has ``ceil(L / max_seq_len)``
  pieces; piece ``j`` is ``full[j*max_seq_len : (j+1)*max_seq_len]``.
* Any other sample has one piece, ``full[:max_seq_len]``, except that an image block cut by that
  boundary is dropped whole: the unit then ends where that block starts (and can be shorter than
  ``min(L, max_seq_len)``). Images wholly beyond the cut are dropped too. A unit left empty (an
  image block longer than ``max_seq_len`` at the very start) is a SampleError.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fabricd.errors import SampleError
from fabricd.images import ImageSpec, decode_fixed, decode_native
from fabricd.planner.units import LONG_SAMPLE_POLICIES, piece_counts, piece_lengths
from fabricd.sources.formats.base import RawSample, image_header_dims, text_parts
from fabricd.sources.index import SourceIndex
from fabricd.sources.reader import SourceReader
from fabricd.text import Tokenizer, chunk_bounds, load_tokenizer

__all__ = [
    "LONG_SAMPLE_MODES",
    "TransformSpec",
    "SampleData",
    "transform",
    "decode_image",
    "num_pieces",
    "unit_lengths",
    "image_tokens_per_sample",
    "SampleLoader",
]

log = logging.getLogger(__name__)

LONG_SAMPLE_MODES = LONG_SAMPLE_POLICIES


@dataclass(frozen=True)
class TransformSpec:
    """How samples become units: context length, long-sample policy and image geometry.

    ``images`` is the job's :class:`~fabricd.images.ImageSpec`; without it, fixed-mode geometry
    from ``image_tokens`` and ``image_size``.
    """

    max_seq_len: int
    long_samples: str
    image_tokens: int = 64
    image_size: int = 224
    images: ImageSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {self.max_seq_len!r}")
        if self.long_samples not in LONG_SAMPLE_MODES:
            raise ValueError(f"long_samples must be one of {LONG_SAMPLE_MODES}, got {self.long_samples!r}")
        if self.images is None:
            object.__setattr__(self, "images", ImageSpec(mode="fixed", image_tokens=self.image_tokens,
                                                         image_size=self.image_size))
        elif self.images.mode == "fixed":
            object.__setattr__(self, "image_tokens", self.images.image_tokens)
            object.__setattr__(self, "image_size", self.images.image_size)


@dataclass(frozen=True, eq=False)
class SampleData:
    """One unit: its tokens, where each image block starts and how long it is, the images'
    pixels (fixed: ``uint8[k, S, S, 3]``; native: patches ``uint8[P, 3*p*p]``), their grids
    (``int32[k, 3]``, ``(1, H/p, W/p)``; fixed: ``(1, S, S)``), and per position the target the
    loss trains on (HF ``labels`` convention, -100 = none) when the source says; None: every
    text token."""

    input_ids: np.ndarray
    image_starts: np.ndarray
    pixels: np.ndarray
    image_lengths: np.ndarray | None = None
    image_grid: np.ndarray | None = None
    targets: np.ndarray | None = None


def image_tokens_per_sample(index: SourceIndex, images: ImageSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample of ``index``: tokens its images take in all, and the sum of their patch counts
    and of their squares (vision cost), under ``images``. Vectorized."""
    n = index.num_samples
    owner = np.repeat(np.arange(n), index.num_images)
    tok = images.tokens(index.image_h, index.image_w)
    pt = images.patches(index.image_h, index.image_w).astype(np.float64)
    total = np.bincount(owner, weights=tok, minlength=n).astype(np.int64) if owner.size else np.zeros(n, np.int64)
    p1 = np.bincount(owner, weights=pt, minlength=n) if owner.size else np.zeros(n)
    p2 = np.bincount(owner, weights=pt * pt, minlength=n) if owner.size else np.zeros(n)
    return total, p1, p2


def truncated_lengths(index: SourceIndex, images: ImageSpec, max_seq_len: int) -> np.ndarray:
    """int64[N]: per sample with images, the exact length of its one unit under ``max_seq_len``
    (the length rule's cut: it ends where an image block straddling the boundary starts), from
    the index's layout columns; -1 for a sample without images or without a known layout (the
    rule's ``min(L, max_seq_len)`` is then an upper bound). A cut that would leave the unit empty
    is also -1 (that unit fails to load). Vectorized."""
    n = index.num_samples
    out = np.full(n, -1, np.int64)
    m = int(max_seq_len)
    if not index.image_h.size:
        return out
    owner = np.repeat(np.arange(n, dtype=np.int64), index.num_images)
    block = images.tokens(index.image_h, index.image_w).astype(np.int64)
    order = np.lexsort((index.image_seq, owner))           # images in sequence order, sample by sample
    o, b = owner[order], block[order]
    prev = np.cumsum(b) - b                                 # blocks before, across samples ...
    first = np.searchsorted(o, o, side="left")
    prev = prev - (np.cumsum(b) - b)[first]                 # ... within the image's own sample
    start = index.image_text_before[order] + prev
    known = np.ones(n, bool)
    np.logical_and.at(known, o, index.image_text_before[order] >= 0)
    straddle = (start < m) & (start + b > m) & (start > 0)
    total, _, _ = image_tokens_per_sample(index, images)
    full = index.text_tokens.astype(np.int64) + total
    cut = np.minimum(full, m)
    np.minimum.at(cut, o[straddle], start[straddle])
    empty = np.zeros(n, bool)
    empty[o[(start == 0) & (b > m)]] = True
    has = (index.num_images > 0) & known & ~empty
    out[has] = cut[has]
    return out


def num_pieces(num_images: np.ndarray, text_tokens: np.ndarray, spec: TransformSpec,
               image_tokens: np.ndarray | None = None) -> np.ndarray:
    """Number of units (pieces) of each sample, from index columns (``int64``): the planner's
    :func:`fabricd.planner.units.piece_counts`, the one implementation of the rule.
    ``image_tokens``: per sample, its images' tokens in all (None: fixed geometry)."""
    return piece_counts(text_tokens, num_images, max_seq_len=spec.max_seq_len, long_samples=spec.long_samples,
                        image_tokens=spec.image_tokens if image_tokens is None else image_tokens)


def unit_lengths(num_images: np.ndarray, text_tokens: np.ndarray, pieces: np.ndarray,
                 spec: TransformSpec, image_tokens: np.ndarray | None = None) -> np.ndarray:
    """Token length of unit ``(sample, piece)`` by the length rule (``int64``): the planner's
    :func:`fabricd.planner.units.piece_lengths`, the one implementation of the rule.

    Exact, except for a truncated sample whose cut falls inside an image block: its unit is
    shorter than this (it ends where that block starts). The index does not record placeholder
    positions, so this is then an upper bound.
    """
    return piece_lengths(text_tokens, num_images, pieces, max_seq_len=spec.max_seq_len,
                         image_tokens=spec.image_tokens if image_tokens is None else image_tokens)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to ``uint8[size, size, 3]`` RGB (BILINEAR resize).

    Raises ValueError (or whatever Pillow raises) on corrupt bytes; refuses images with more
    pixels than Pillow's decompression-bomb limit before decoding them.
    """
    return decode_fixed(data, size)


_BYTES = load_tokenizer(None)


def full_sequence(raw: RawSample, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray | None]:
    """The full sequence of a sample without images, and its targets (None: train on all).
    Raises ValueError for a pre-tokenized id outside the tokenizer's vocabulary."""
    if raw.input_ids is not None:
        ids = np.asarray(raw.input_ids, np.int32)
        if ids.size and int(ids.max()) >= tokenizer.vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the job tokenizer's vocabulary "
                             f"({tokenizer.vocab_size} tokens): was the source tokenized with another tokenizer?")
        return ids, raw.targets
    (text,) = text_parts(raw.text or "", 0)[1]
    (ids,) = tokenizer.encode_texts([text])
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    full = np.empty(len(head) + ids.shape[0] + 1, np.int32)
    full[:len(head)] = head
    full[len(head):-1] = ids
    full[-1] = tokenizer.eos_id
    return full, None


def chunked_piece(raw: RawSample, piece: int, spec: TransformSpec, tokenizer: Tokenizer, chunk_tokens: np.ndarray, *,
                  source: str = "", sample_id: int = -1) -> SampleData:
    """Unit ``piece`` of a text-only sample of several chunks, encoding only the chunks it covers
    (``chunk_tokens``: the index's token count of each chunk). The same tokens as
    :func:`transform`: the chunk rule makes the whole text's ids the chunks' ids end to end, so a
    piece of a 12 M-character document costs about one piece of encoding, not the document's.
    Raises SampleError for a piece that does not exist or a text whose chunks no longer have the
    indexed counts (it changed since it was indexed)."""
    tok = tokenizer
    (text,) = text_parts(raw.text or "", 0)[1]
    bounds = chunk_bounds(text)
    counts = np.asarray(chunk_tokens, np.int64)
    if len(bounds) != len(counts):
        raise SampleError(source, sample_id, f"its text has {len(bounds)} chunks, {len(counts)} when indexed")
    bos = int(tok.bos_id is not None)
    starts = bos + np.concatenate([[0], np.cumsum(counts)])  # chunk k: tokens [starts[k], starts[k+1])
    total = int(starts[-1]) + 1  # the EOS
    m = spec.max_seq_len
    pieces = -(-total // m) if spec.long_samples == "split" else 1
    if piece < 0 or piece >= pieces:
        raise SampleError(source, sample_id, f"piece {piece} out of range: the sample has {pieces} piece(s)")
    lo, hi = piece * m, min((piece + 1) * m, total)
    k0 = int(np.searchsorted(starts[1:], lo, side="right"))   # first chunk ending after lo
    k1 = int(np.searchsorted(starts[:-1], hi, side="left"))   # chunks starting before hi
    encoded = tok.encode_chunks([text[a:b] for a, b in bounds[k0:k1]])
    out = np.empty(hi - lo, np.int32)
    filled = 0

    def put(offset: int, ids: np.ndarray) -> None:
        nonlocal filled
        a, b = max(lo, offset), min(hi, offset + len(ids))
        if a < b:
            out[a - lo:b - lo] = ids[a - offset:b - offset]
            filled += b - a

    if tok.bos_id is not None:
        put(0, np.array([tok.bos_id], np.int32))
    for k, ids in zip(range(k0, k1), encoded):
        if len(ids) != counts[k]:
            raise SampleError(source, sample_id, f"chunk {k} encodes to {len(ids)} tokens, {int(counts[k])} when "
                                                 "indexed (changed since?)")
        put(int(starts[k]), ids)
    put(total - 1, np.array([tok.eos_id], np.int32))
    if filled != hi - lo:  # cannot happen when the counts hold; never deliver uninitialized memory
        raise SampleError(source, sample_id, f"piece {piece}: {filled} of {hi - lo} tokens made")
    return _data(out, [], [], [], spec.images, None)


def transform(raw: RawSample, piece: int, spec: TransformSpec, *, source: str = "", sample_id: int = -1,
              tokenizer: Tokenizer | None = None, image_hw: np.ndarray | None = None,
              full: tuple[np.ndarray, np.ndarray | None] | None = None) -> SampleData:
    """The unit ``piece`` of ``raw`` under ``spec``, by the module's length rule.

    ``tokenizer``: the job's (None: bytes). ``image_hw``: ``int[k, 2]``, the header dimensions
    the index holds for the sample's images (None: read from the images now); native mode sizes
    the image blocks from them, as the planner does. ``full``: the sample's full sequence and
    targets when the caller has it already (a text-only sample; see :func:`full_sequence`).
    Decodes only the images that survive truncation. Raises SampleError for a piece that does
    not exist, an empty unit, or an image that cannot be decoded or changed since it was indexed.
    """
    piece = int(piece)
    tok = tokenizer if tokenizer is not None else _BYTES
    geo = spec.images
    m = spec.max_seq_len
    if not raw.images:
        try:
            ids, targets = full if full is not None else full_sequence(raw, tok)
        except ValueError as e:
            raise SampleError(source, sample_id, str(e)) from None
        total = ids.shape[0]
        pieces = -(-total // m) if spec.long_samples == "split" else 1
        if piece < 0 or piece >= pieces or total == 0:
            raise SampleError(source, sample_id, f"piece {piece} out of range: the sample has {pieces} piece(s)")
        lo, hi = piece * m, min((piece + 1) * m, total)
        return _data(ids[lo:hi], [], [], [], geo, targets[lo:hi] if targets is not None else None)

    if piece != 0:
        raise SampleError(source, sample_id, f"piece {piece} out of range: a sample with images has 1 piece")
    n = len(raw.images)
    if image_hw is None:
        image_hw = np.asarray([image_header_dims(b) for b in raw.images], np.int64).reshape(n, 2)
    hw = np.asarray(image_hw, np.int64).reshape(-1, 2)
    if hw.shape[0] != n:
        raise SampleError(source, sample_id, f"the sample has {n} images but the index {hw.shape[0]}")
    block_len = geo.tokens(hw[:, 0], hw[:, 1])
    order, parts = text_parts(raw.text or "", n)
    encoded = tok.encode_texts(parts)
    lead = len(order) - (len(parts) - 1)
    segments: list[np.ndarray] = []
    starts: list[int] = []
    kept: list[int] = []
    length = 0

    def add_image(img: int) -> bool:
        nonlocal length
        t = int(block_len[img])
        if length + t > m:
            return False  # cut by the boundary or wholly beyond: dropped, the unit ends here
        starts.append(length)
        kept.append(img)
        segments.append(np.full(t, tok.image_id, dtype=np.int32))
        length += t
        return True

    def add_tokens(toks: np.ndarray) -> bool:
        nonlocal length
        room = m - length
        segments.append(toks[:room])
        length += min(len(toks), room)
        return len(toks) <= room

    full_ok = tok.bos_id is None or add_tokens(np.array([tok.bos_id], np.int32))
    if full_ok:
        for img in order[:lead]:
            if not add_image(img):
                full_ok = False
                break
    if full_ok:
        for k, ids in enumerate(encoded):
            if k > 0 and not add_image(order[lead + k - 1]):
                full_ok = False
                break
            if not add_tokens(ids):
                full_ok = False
                break
        if full_ok:
            add_tokens(np.array([tok.eos_id], np.int32))
    if length == 0:
        raise SampleError(source, sample_id,
                          f"empty unit: an image block of {int(block_len[order[0]])} tokens does not fit "
                          f"in max_seq_len {m}")
    pixels, grids = [], []
    for img in kept:
        try:
            if geo.mode == "fixed":
                pixels.append(decode_fixed(raw.images[img], geo.image_size))
                grids.append((1, geo.image_size, geo.image_size))
            else:
                px, grid = decode_native(raw.images[img], geo, (int(hw[img, 0]), int(hw[img, 1])))
                pixels.append(px)
                grids.append(grid)
        except Exception as e:  # noqa: BLE001 - any decoder failure is this sample's, never fatal
            raise SampleError(source, sample_id, f"image {img}: cannot decode: {type(e).__name__}: {e}") from e
    ids = np.concatenate(segments).astype(np.int32, copy=False)
    return _data(ids, starts, [int(block_len[i]) for i in kept], pixels, geo, None, grids)


def _data(ids: np.ndarray, starts: list[int], lengths: list[int], pixels: list[np.ndarray], geo: ImageSpec,
          targets: np.ndarray | None, grids: list[tuple[int, int, int]] | None = None) -> SampleData:
    if pixels:
        px = np.concatenate(pixels) if geo.mode == "native" else np.stack(pixels)
    elif geo.mode == "native":
        px = np.zeros((0, geo.patch_dim), np.uint8)
    else:
        px = np.zeros((0, geo.image_size, geo.image_size, 3), np.uint8)
    return SampleData(
        input_ids=np.ascontiguousarray(ids, dtype=np.int32),
        image_starts=np.asarray(starts, dtype=np.int32),
        pixels=px,
        image_lengths=np.asarray(lengths, dtype=np.int32),
        image_grid=np.asarray(grids or [], dtype=np.int32).reshape(-1, 3),
        targets=None if targets is None else np.ascontiguousarray(targets, dtype=np.int32),
    )


class SampleLoader:
    """What a source-loader process does: read + decode + transform units of one source."""

    def __init__(self, index: SourceIndex, spec: TransformSpec, *, cache_bytes: int = 256 << 20,
                 roots: Sequence[Path] | None = None, tokenizer: Tokenizer | None = None) -> None:
        """``roots``: the node's data roots, re-checked whenever a data file is opened (see
        :class:`~fabricd.sources.reader.SourceReader`); None for offline tools. ``tokenizer``:
        the job's, the one the index was built with (None: bytes)."""
        self.index = index
        self.spec = spec
        self.tokenizer = tokenizer if tokenizer is not None else _BYTES
        self.reader = SourceReader(index, cache_bytes=cache_bytes, roots=roots)

    def load(self, sample_ids: np.ndarray, pieces: np.ndarray) -> list[SampleData | SampleError]:
        """Units ``(sample_ids[i], pieces[i])``, in order; a failing unit is a SampleError in its
        slot. A sample asked for with several pieces is read once (and, unless it is long enough
        to be encoded chunk by chunk, encoded once)."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        pcs = np.asarray(pieces, dtype=np.int64).reshape(-1)
        if ids.shape != pcs.shape:
            raise ValueError(f"sample_ids and pieces differ in length: {ids.shape[0]} != {pcs.shape[0]}")
        uniq, inverse = np.unique(ids, return_inverse=True)
        raws = self.reader.read(uniq)
        out: list[SampleData | SampleError] = []
        name = self.index.name
        idx = self.index
        encoded: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # this request's full sequences
        for k in range(ids.shape[0]):
            raw = raws[inverse[k]]
            if isinstance(raw, SampleError):
                out.append(raw)
                continue
            sid = int(ids[k])
            try:
                if raw.images:
                    lo, hi = idx.image_start[sid], idx.image_start[sid + 1]
                    hw = np.stack([idx.image_h[lo:hi], idx.image_w[lo:hi]], axis=1)
                    out.append(transform(raw, int(pcs[k]), self.spec, source=name, sample_id=sid,
                                         tokenizer=self.tokenizer, image_hw=hw))
                elif raw.input_ids is None and idx.num_chunks[sid] > 1:
                    c0, c1 = idx.chunk_start[sid], idx.chunk_start[sid + 1]
                    out.append(chunked_piece(raw, int(pcs[k]), self.spec, self.tokenizer, idx.chunk_tokens[c0:c1],
                                             source=name, sample_id=sid))
                else:
                    if sid not in encoded:
                        encoded[sid] = self._full(sid, raw)
                    out.append(transform(raw, int(pcs[k]), self.spec, source=name, sample_id=sid,
                                         tokenizer=self.tokenizer, full=encoded[sid]))
            except SampleError as e:
                out.append(e)
        return out

    def _full(self, sample_id: int, raw: RawSample) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            return full_sequence(raw, self.tokenizer)
        except ValueError as e:
            raise SampleError(self.index.name, sample_id, str(e)) from None

    def close(self) -> None:
        """Release the reader's files and cache."""
        self.reader.close()
