"""The interface every source format implements: index a data file, read samples by row, sniff.

A format is one module under :mod:`fabricd.sources.formats` with one :class:`SourceFormat`
subclass, registered in :data:`fabricd.sources.formats.REGISTRY`. What is generic (discovering
files, fingerprints, persisting the index, checking ids and data roots, the token layout of a
sample) lives outside the formats; a format only knows its own bytes.

* :meth:`SourceFormat.index_file` turns one data file into a :class:`FileIndex`: a locator per
  sample (``row``, ``extent``), its exact token count (through :class:`IndexContext`, which
  applies the job's tokenizer and the layout rule) and, per image, where its bytes are and its
  dimensions read from the header. It never decodes pixels, holds memory bounded by a batch of
  rows, and reports progress through ``ctx.on_bytes``. A sample it cannot use is skipped and
  counted (``FileIndex.skipped``); a file it cannot use at all raises (the caller records why).
* :meth:`SourceFormat.reader` returns a :class:`FormatReader` serving :class:`RawSample` by
  sample, given the index rows. A bad sample is a string (the reason) in its slot, never an
  exception.
* :meth:`SourceFormat.sniff` says, from a few bytes, why a file is not this format (submission
  checks).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image

from fabricd import tokenizer as byte_tok
from fabricd.text import Tokenizer

__all__ = ["RawSample", "FileIndex", "IndexContext", "Layout", "SourceFormat", "FormatReader", "ReadRequest",
           "image_header_dims", "IMAGE_PLACEHOLDER", "text_parts"]

IMAGE_PLACEHOLDER = "<image>"
#: data files a reader keeps open at once, per source
MAX_OPEN_FILES = 64


@dataclass(frozen=True, eq=False)
class RawSample:
    """One sample as stored.

    Text formats set ``text`` (placeholders included) and ``images`` (encoded bytes, in schema
    order). Pre-tokenized formats set ``input_ids`` (the whole sequence: nothing is added) and,
    optionally, ``targets``: per position the id the loss trains on at that position, or -100
    (the Hugging Face ``labels`` convention, before the shift); None trains on every token.
    """

    text: str | None = None
    images: tuple[bytes, ...] = ()
    input_ids: np.ndarray | None = None
    targets: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RawSample):
            return NotImplemented

        def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            return (a is None) == (b is None) and (a is None or np.array_equal(a, b))

        return (self.text == other.text and self.images == other.images and same(self.input_ids, other.input_ids)
                and same(self.targets, other.targets))

    __hash__ = None  # type: ignore[assignment]


@dataclass(eq=False)
class FileIndex:
    """The index rows of one data file. Per-sample arrays have ``n`` rows; per-image arrays have
    ``num_images.sum()`` rows, the images of sample 0 first. Optional arrays default to zeros
    (``extent``, ``image_loc``) or -1 (``image_h``, ``image_w``: header unreadable)."""

    row: np.ndarray            # int64[n]: the format's locator (row, byte offset, document)
    text_tokens: np.ndarray    # int64[n]: tokens of the sample without its images (BOS/EOS included)
    num_images: np.ndarray     # int32[n]
    skipped: int = 0           # rows of the file skipped (malformed, null text, ...)
    extent: np.ndarray | None = None     # int64[n]: a second locator (e.g. a member's length)
    image_len: np.ndarray | None = None  # int64[m]: encoded bytes of each image
    image_loc: np.ndarray | None = None  # int64[m]: where each image is (e.g. a member's offset)
    image_h: np.ndarray | None = None    # int32[m]
    image_w: np.ndarray | None = None    # int32[m]
    #: the sample's layout (see IndexContext.count_layout): per image, text tokens before its
    #: block in the full sequence (-1: unknown) and its rank in sequence order
    image_text_before: np.ndarray | None = None  # int64[m]
    image_seq: np.ndarray | None = None          # int32[m]
    #: pre-tokenized formats: the largest token id in the file (-1: not known without reading it all)
    max_token_id: int = -1
    #: per sample, the token counts of its chunks when it is a text-only sample of several (see
    #: IndexContext.count_layout); None: none has
    chunk_tokens: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        n = int(np.asarray(self.row).shape[0])
        m = int(np.asarray(self.num_images, dtype=np.int64).sum())
        self.row = np.asarray(self.row, np.int64)
        self.text_tokens = np.asarray(self.text_tokens, np.int64)
        self.num_images = np.asarray(self.num_images, np.int32)
        self.extent = np.zeros(n, np.int64) if self.extent is None else np.asarray(self.extent, np.int64)
        self.image_len = np.zeros(m, np.int64) if self.image_len is None else np.asarray(self.image_len, np.int64)
        self.image_loc = np.zeros(m, np.int64) if self.image_loc is None else np.asarray(self.image_loc, np.int64)
        self.image_h = np.full(m, -1, np.int32) if self.image_h is None else np.asarray(self.image_h, np.int32)
        self.image_w = np.full(m, -1, np.int32) if self.image_w is None else np.asarray(self.image_w, np.int32)
        self.image_text_before = (np.full(m, -1, np.int64) if self.image_text_before is None
                                  else np.asarray(self.image_text_before, np.int64))
        if self.image_seq is None:  # schema order
            starts = np.repeat(np.cumsum(self.num_images, dtype=np.int64) - self.num_images, self.num_images)
            self.image_seq = (np.arange(m, dtype=np.int64) - starts).astype(np.int32)
        self.image_seq = np.asarray(self.image_seq, np.int32)
        for name in ("text_tokens", "num_images", "extent"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"FileIndex.{name} has shape {getattr(self, name).shape}, expected ({n},)")
        if self.chunk_tokens is not None and len(self.chunk_tokens) != n:
            raise ValueError(f"FileIndex.chunk_tokens has {len(self.chunk_tokens)} entries, expected {n}")
        for name in ("image_len", "image_loc", "image_h", "image_w", "image_text_before", "image_seq"):
            if getattr(self, name).shape != (m,):
                raise ValueError(f"FileIndex.{name} has shape {getattr(self, name).shape}, expected ({m},)")


def text_parts(text: str, num_images: int) -> tuple[list[int], list[str]]:
    """THE layout of a text sample with ``num_images`` images: ``(order, parts)``.

    ``text`` is split at its ``<image>`` placeholders; placeholders beyond ``num_images`` are
    removed (the parts around them joined). Images without a placeholder go first, in their
    order: the sequence is ``order[:lead]`` images, then ``parts[0], order[lead], parts[1], ...``
    with ``lead = len(order) - (len(parts) - 1)``. Each part is encoded on its own.
    """
    parts = text.split(IMAGE_PLACEHOLDER)
    holders = len(parts) - 1
    if holders > num_images:
        parts = parts[:num_images] + ["".join(parts[num_images:])]
        holders = num_images
    order = list(range(holders, num_images)) + list(range(holders))
    return order, parts


def image_header_dims(data: bytes | None = None, path: Path | None = None) -> tuple[int, int]:
    """``(height, width)`` of an encoded image from its header, without decoding pixels;
    ``(-1, -1)`` when it cannot be read (the sample then fails when it is loaded)."""
    try:
        src = io.BytesIO(data) if data is not None else path
        with Image.open(src) as img:
            w, h = img.size
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - bombs, truncation, unknown formats: all "unreadable"
        return -1, -1


_NO_CHUNKS = np.zeros(0, np.int64)


class Layout(NamedTuple):
    """What :meth:`IndexContext.count_layout` finds: per sample ``counts`` (text tokens, specials
    included) and ``chunks`` (the token count of each chunk of a text-only sample of several
    chunks, else empty); per image ``before`` (text tokens before its block) and ``seq`` (its
    rank in sequence order)."""

    counts: np.ndarray
    before: np.ndarray
    seq: np.ndarray
    chunks: list[np.ndarray]


class IndexContext:
    """What a format's :meth:`~SourceFormat.index_file` gets: the tokenizer and layout rule,
    progress reporting, and the source directory (files a sample refers to must stay in it)."""

    def __init__(self, tokenizer: Tokenizer, source_dir: Path, on_bytes: Callable[[int], None]) -> None:
        self.tokenizer = tokenizer
        self.source_dir = source_dir
        self.on_bytes = on_bytes

    def count_samples(self, texts: Sequence[str], num_images: Sequence[int]) -> np.ndarray:
        """int64: the text tokens of each sample (specials included, images not), by the layout
        rule and the tokenizer's chunk rule; the parts of all samples are encoded in one batch."""
        return self.count_layout(texts, num_images)[0]

    def count_layout(self, texts: Sequence[str], num_images: Sequence[int]) -> Layout:
        """:meth:`count_samples` with the layout of each sample (:class:`Layout`): per image
        (``sum(num_images)`` rows, each sample's images in schema order) the text tokens before
        its block in the full sequence and its rank in sequence order, and per text-only sample
        of several chunks its chunks' token counts. With the images' token counts, the layout
        gives where every block starts, so the planner knows a truncated sample's exact length;
        with the chunk counts a loader encodes only the chunks a piece of a long document covers."""
        tok = self.tokenizer
        bos = int(tok.bos_id is not None)
        nimg = [int(n) for n in num_images]
        counts = np.full(len(texts), tok.specials, np.int64)
        before = np.zeros(sum(nimg), np.int64)
        seq = np.zeros(sum(nimg), np.int32)
        chunks: list[np.ndarray] = [_NO_CHUNKS] * len(texts)
        parts: list[str] = []
        spans: list[tuple[int, int, list[int]]] = []  # (sample, first part, order) of samples with images
        plain: list[int] = []
        plain_texts: list[str] = []
        for k, (t, n) in enumerate(zip(texts, nimg)):
            if n == 0:
                plain.append(k)
                plain_texts.append(t if IMAGE_PLACEHOLDER not in t else text_parts(t, 0)[1][0])
                continue
            order, ps = text_parts(t, n)
            spans.append((k, len(parts), order))
            parts.extend(ps)
        if tok.kind == "bytes":  # a byte's token is the byte: no chunk index needed to cut a piece
            both = byte_tok.text_token_counts(pa.array(plain_texts + parts, pa.large_string())).astype(np.int64) - 1
            plain_counts, part_counts = both[:len(plain)], both[len(plain):]  # (- 1: it adds an EOS)
        else:
            totals, per_chunk = tok.count_chunks(plain_texts + parts)
            plain_counts, part_counts = totals[:len(plain)], totals[len(plain):]
            for k, c in zip(plain, per_chunk[:len(plain)]):
                if len(c) > 1:
                    chunks[k] = c
        counts[plain] += plain_counts
        first_image = np.concatenate([[0], np.cumsum(nimg)]).astype(np.int64)
        for i, (k, p0, order) in enumerate(spans):
            nparts = (spans[i + 1][1] if i + 1 < len(spans) else len(parts)) - p0
            pc = part_counts[p0:p0 + nparts]
            counts[k] += int(pc.sum())
            base = int(first_image[k])
            lead = len(order) - (nparts - 1)
            for rank, img in enumerate(order):
                seq[base + img] = rank
                # lead images follow BOS; the image at placeholder j follows parts[0..j]
                before[base + img] = bos + (0 if rank < lead else int(pc[:rank - lead + 1].sum()))
        return Layout(counts, before, seq, chunks)


@dataclass(frozen=True)
class ReadRequest:
    """The index rows of the samples asked from one data file, in request order. ``images[k]``
    holds sample ``k``'s ``(loc, len)`` per image."""

    rows: np.ndarray
    extents: np.ndarray
    images: list[list[tuple[int, int]]] = field(default_factory=list)


class FormatReader:
    """Reads samples of one source's data files. Not thread-safe. ``open_path(file_idx)`` gives
    a data file's path after checking it against the node's data roots (raises PermissionError
    when it leads outside them): :meth:`_file` calls it whenever a file is (re)opened, and keeps
    at most :data:`MAX_OPEN_FILES` open (least recently used closed first). A format implements
    :meth:`_open_file` (its handle needs only ``close()``) and :meth:`read`."""

    def __init__(self, paths: Sequence[Path], open_path: Callable[[int], Path], *, cache_bytes: int,
                 source_dir: Path) -> None:
        self.paths = list(paths)
        self.open_path = open_path
        self.cache_bytes = int(cache_bytes)
        self.source_dir = source_dir
        self.cache_hits = 0
        self.cache_misses = 0
        self._files: OrderedDict[int, Any] = OrderedDict()

    @property
    def cache_nbytes(self) -> int:
        """Bytes held in caches now (0 for formats without one)."""
        return 0

    def _open_file(self, path: Path) -> Any:
        """The format's handle on data file ``path`` (already checked against the roots)."""
        raise NotImplementedError

    def _file(self, fi: int) -> Any:
        """The open handle of data file ``fi``, opening it (and closing the least recently used
        one past :data:`MAX_OPEN_FILES`) when needed."""
        f = self._files.get(fi)
        if f is not None:
            self._files.move_to_end(fi)
            return f
        f = self._open_file(self.open_path(fi))
        self._files[fi] = f
        while len(self._files) > MAX_OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return f

    def _drop(self, fi: int) -> None:
        """Close data file ``fi``: it is opened (and checked) again on its next read."""
        f = self._files.pop(fi, None)
        if f is not None:
            f.close()

    def read(self, file_idx: int, request: ReadRequest) -> list[RawSample | str]:
        """The samples of ``request`` from data file ``file_idx``: a RawSample, or the reason it
        cannot be read, per slot. Never raises for bad data."""
        raise NotImplementedError

    def close(self) -> None:
        """Close open files (and drop caches, in formats that have them)."""
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing must not fail the caller
                pass
        self._files.clear()


class SourceFormat:
    """One source format (see the module docstring). Instances are stateless."""

    #: the name a job spec's ``format`` uses
    name: str = "?"
    #: file extensions (lower case) of its data files; a directory source holds every such file
    extensions: tuple[str, ...] = ()
    #: True when samples are token ids already: the tokenizer plays no part in it
    tokenized: bool = False
    #: True when its reader needs each sample's image locations (``ReadRequest.images``)
    image_locations: bool = False

    def companions(self, rel: str) -> list[str]:
        """Other files (relative, like ``rel``) that belong to data file ``rel`` and whose change
        must change the source's fingerprint (a Megatron ``.bin`` beside its ``.idx``)."""
        return []

    def index_file(self, path: Path, ctx: IndexContext) -> FileIndex:
        raise NotImplementedError

    def reader(self, paths: Sequence[Path], open_path: Callable[[int], Path], *, cache_bytes: int,
               source_dir: Path) -> FormatReader:
        raise NotImplementedError

    def sniff(self, path: Path) -> str | None:
        """Why ``path`` is not a file of this format, judged from a few bytes; None if it looks right."""
        return None

    def data_size(self, path: Path) -> int:
        """Bytes indexing this file reads (for progress): the file and its companions."""
        total = 0
        for p in [path] + [path.parent / Path(c).name for c in self.companions(path.name)]:
            try:
                total += os.stat(p).st_size
            except OSError:
                pass
        return total
