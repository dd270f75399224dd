"""WebDataset tar shards (``webdataset``): ``*.tar``, a sample is the members sharing a key.

Grouping follows WebDataset (``webdataset.tariterators``): only regular members count (not
directories, links, or metadata named like ``__key__``); a member's *key* is its path up to the
first ``.`` of its base name (directories included: ``a/b/x.y.jpg`` has key ``a/b/x`` and
extension ``y.jpg``), its *extension* the rest, lower-cased. Consecutive members with the same
key form one sample. A member whose base name has no ``.`` belongs to none.

Of a sample's members, this format uses:

* **text**: ``txt`` (UTF-8), or else ``json``: an object whose text is its ``"text"`` value, or
  ``"caption"`` when it has no ``"text"``, or ``"txt"`` when it has neither (a key with a null
  value counts as absent; a present one that is not a string makes the sample malformed). When
  both members exist ``txt`` wins and the JSON is ignored (even a malformed one). The text may
  hold ``<image>`` placeholders (the same layout rule as every text format).
* **images**: extension ``jpg``, ``jpeg``, ``png`` or ``webp``, or one of those after a decimal
  index (``0.jpg``, ``1.png``, ...). Their order: the plain ones first, in tar order, then the
  indexed ones by index (ties in tar order).

Other members are ignored. A sample needs a non-empty text or at least one image; one with
neither, with a text that is not valid UTF-8, a malformed JSON member, the same extension twice,
a sparse member, or a member too big to be one sample's (text over ``MAX_TEXT_BYTES``, 64 MiB;
an image over ``MAX_IMAGE_BYTES``, 256 MiB; never read), is skipped and counted at indexing.

Only plain (uncompressed) tars: samples are read by seeking to their members' bytes, through
the offsets recorded at indexing; the tar is never scanned again. Indexing scans the headers
once, in streaming mode (``tarfile``: GNU long names and pax headers included), and reads each
text member once and the first bytes of each image member (its dimensions come from the header;
pixels are never decoded). Index rows: ``row`` is the byte offset of the text member's data and ``extent`` its
size, encoded ``~size`` (negative) for a JSON member; ``row = -1``, ``extent = 0`` for a sample
without text. Per image, ``image_loc`` is its data offset and ``image_len`` its size.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fabricd.sources.formats.base import (
    FileIndex,
    FormatReader,
    IndexContext,
    RawSample,
    ReadRequest,
    SourceFormat,
    image_header_dims,
)

__all__ = ["WebDataset", "split_key", "json_text", "IMAGE_EXTENSIONS", "TEXT_KEYS"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: the keys of a ``json`` member a text is taken from, in order of preference
TEXT_KEYS = ("text", "caption", "txt")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE = re.compile(r"__[^/]*__($|/)")
_INDEXED_IMAGE_RE = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$")
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_BATCH_CHARS = 4 << 20        # text counted per tokenizer call while indexing
_PROGRESS_BYTES = 4 << 20
_BLOCK = tarfile.BLOCKSIZE
#: a text or JSON member larger than this makes its sample a counted skip (never read whole)
MAX_TEXT_BYTES = 64 << 20
#: an image member larger than this makes its sample a counted skip
MAX_IMAGE_BYTES = 256 << 20
#: bytes of an image member read at indexing: enough for the header (dimensions), never the pixels
_HEADER_BYTES = 1 << 20


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name by WebDataset's rule (extension not lower-cased),
    or None when the name has no key (no ``.`` in its base name, or a leading one)."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def _is_meta(name: str) -> bool:
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(_META_RE.match(name))


def json_text(data: bytes) -> str | None:
    """The text of a ``json`` member ("" when it has none), or None when it is malformed."""
    try:
        obj = json.loads(data)
    except ValueError:  # bad JSON or bad UTF-8
        return None
    if not isinstance(obj, dict):
        return None
    for key in TEXT_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800-style escape
            return None
        return value
    return ""


def _decode_text(data: bytes, is_json: bool) -> str | None:
    if is_json:
        return json_text(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _image_order(ext: str) -> tuple[int, int] | None:
    """Sort key of an image extension (plain ones first, then by index), or None: not an image."""
    if ext in IMAGE_EXTENSIONS:
        return (0, 0)
    m = _INDEXED_IMAGE_RE.match(ext)
    return (1, int(m.group(1))) if m else None


def compression_problem(head: bytes, path: Path) -> str | None:
    """Why a file starting with ``head`` cannot be served: it is a compressed tar."""
    for magic, what in _COMPRESSED:
        if head.startswith(magic):
            return (f"{path}: a {what}-compressed file; WebDataset sources must be plain .tar shards "
                    "(samples are read by seeking into them)")
    return None


@dataclass
class _Group:
    """The members of one sample seen so far while scanning."""

    key: str
    exts: set[str] = field(default_factory=set)
    text: tuple[int, int, bytes] | None = None      # .txt: (offset, size, data)
    json: tuple[int, int, bytes] | None = None      # .json: (offset, size, data)
    images: list[tuple[tuple[int, int], int, int, int, int]] = field(default_factory=list)  # (order, loc, len, h, w)
    bad: bool = False


class _ShardIndexer:
    """Accumulates the index rows of one shard, counting tokens in bounded batches."""

    def __init__(self, ctx: IndexContext) -> None:
        self.ctx = ctx
        self.rows: list[int] = []
        self.extents: list[int] = []
        self.nimgs: list[int] = []
        self.iloc: list[int] = []
        self.ilen: list[int] = []
        self.ih: list[int] = []
        self.iw: list[int] = []
        self.tokens: list[np.ndarray] = []
        self.before: list[np.ndarray] = []
        self.seq: list[np.ndarray] = []
        self.chunks: list[np.ndarray] = []
        self.skipped = 0
        self._texts: list[str] = []
        self._pending: list[int] = []
        self._chars = 0

    def add(self, g: _Group) -> None:
        if g.bad:
            self.skipped += 1
            return
        row, extent, text = -1, 0, ""
        if g.text is not None or g.json is not None:
            is_json = g.text is None
            off, size, data = g.json if is_json else g.text  # type: ignore[misc]
            decoded = _decode_text(data, is_json)
            if decoded is None:
                self.skipped += 1
                return
            if decoded or not is_json:  # a JSON member without text is no text at all
                row, extent, text = off, (~size if is_json else size), decoded
        if not text and not g.images:
            self.skipped += 1
            return
        images = sorted(g.images, key=lambda im: im[0])  # stable: tar order among equals
        self.rows.append(row)
        self.extents.append(extent)
        self.nimgs.append(len(images))
        for _, loc, ln, h, w in images:
            self.iloc.append(loc)
            self.ilen.append(ln)
            self.ih.append(h)
            self.iw.append(w)
        self._texts.append(text)
        self._pending.append(len(images))
        self._chars += len(text)
        if self._chars >= _BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if self._texts:
            lay = self.ctx.count_layout(self._texts, self._pending)
            self.tokens.append(lay.counts)
            self.before.append(lay.before)
            self.seq.append(lay.seq)
            self.chunks.extend(lay.chunks)
            self._texts = []
            self._pending = []
            self._chars = 0

    def result(self) -> FileIndex:
        self.flush()
        return FileIndex(row=np.asarray(self.rows, np.int64),
                         text_tokens=np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int64),
                         num_images=np.asarray(self.nimgs, np.int32), skipped=self.skipped,
                         extent=np.asarray(self.extents, np.int64), image_loc=np.asarray(self.iloc, np.int64),
                         image_len=np.asarray(self.ilen, np.int64), image_h=np.asarray(self.ih, np.int32),
                         image_w=np.asarray(self.iw, np.int32),
                         image_text_before=np.concatenate(self.before) if self.before else np.zeros(0, np.int64),
                         image_seq=np.concatenate(self.seq) if self.seq else np.zeros(0, np.int32),
                         chunk_tokens=self.chunks)


def _scan(path: Path, ctx: IndexContext) -> FileIndex:
    out = _ShardIndexer(ctx)
    size = os.stat(path).st_size
    reported = 0
    group: _Group | None = None
    with open(path, "rb") as raw:
        problem = compression_problem(raw.read(8), path)
        if problem:
            raise ValueError(problem)
        raw.seek(0)
        name = "?"
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tf:
                for info in tf:
                    tf.members = []  # streaming: keep no TarInfo behind
                    name = info.name
                    done = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
                    if done - reported >= _PROGRESS_BYTES:
                        ctx.on_bytes(done - reported)
                        reported = done
                    if not info.isreg() or _is_meta(name):
                        continue
                    split = split_key(name)
                    if split is None:
                        continue
                    key, ext = split[0], split[1].lower()
                    if group is None or key != group.key:
                        if group is not None:
                            out.add(group)
                        group = _Group(key)
                    if ext in group.exts:
                        group.bad = True  # the same extension twice: WebDataset refuses it too
                        continue
                    group.exts.add(ext)
                    order = _image_order(ext)
                    if ext not in ("txt", "json") and order is None:
                        continue
                    if info.issparse():
                        group.bad = True  # its bytes are not one contiguous run of the tar
                        continue
                    if info.offset_data + info.size > size:
                        raise tarfile.ReadError(f"member data runs past the end of the file ({size} bytes)")
                    if info.size > (MAX_IMAGE_BYTES if order is not None else MAX_TEXT_BYTES):
                        group.bad = True  # too big to be one sample's: skipped and counted, not read
                        continue
                    member = tf.extractfile(info)
                    want = min(info.size, _HEADER_BYTES) if order is not None else info.size
                    data = member.read(want) if member is not None else b""
                    if len(data) != want:
                        raise tarfile.ReadError("unexpected end of data")
                    if order is not None:
                        h, w = image_header_dims(data)  # the header only: pixels are not decoded
                        group.images.append((order, info.offset_data, info.size, h, w))
                    elif ext == "txt":
                        group.text = (info.offset_data, info.size, data)
                    else:
                        group.json = (info.offset_data, info.size, data)
        except tarfile.TarError as e:
            raise ValueError(f"{path}: not a readable tar (corrupt or truncated near member {name!r}): {e}") from e
    if group is not None:
        out.add(group)
    if size > reported:
        ctx.on_bytes(size - reported)
    return out.result()


class _Reader(FormatReader):
    def _open_file(self, path: Path):
        return open(path, "rb")

    @staticmethod
    def _bytes(f: BinaryIO, offset: int, size: int) -> bytes:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"{size} bytes at byte {offset} asked, {len(data)} there: the file shrank since it "
                           "was indexed")
        return data

    def _sample(self, f: BinaryIO, row: int, extent: int, images: list[tuple[int, int]]) -> RawSample | str:
        text = ""
        if row >= 0:
            is_json = extent < 0
            size = ~extent if is_json else extent
            decoded = _decode_text(self._bytes(f, row, size), is_json)
            if decoded is None:
                return f"text member at byte {row}: {'malformed JSON' if is_json else 'not valid UTF-8'}"
            text = decoded
        return RawSample(text=text, images=tuple(self._bytes(f, int(loc), int(ln)) for loc, ln in images))

    def read(self, file_idx: int, request: ReadRequest) -> list[RawSample | str]:
        path = self.paths[file_idx]
        out: list[RawSample | str] = []
        for k, (row, extent) in enumerate(zip(request.rows.tolist(), request.extents.tolist())):
            images = request.images[k] if k < len(request.images) else []
            try:
                sample = self._sample(self._file(file_idx), int(row), int(extent), images)
            except Exception as e:  # noqa: BLE001 - I/O errors, a file shrunk or replaced: never raise
                self._drop(file_idx)  # reopen next time (a transient error, or the file replaced)
                sample = f"cannot read: {getattr(e, 'strerror', None) or e}"
            out.append(sample if isinstance(sample, RawSample) else f"{path}: {sample}")
        return out



class WebDataset(SourceFormat):
    name = "webdataset"
    extensions = (".tar",)
    image_locations = True

    def sniff(self, path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                head = f.read(_BLOCK)
        except OSError as e:
            return f"{path}: cannot read: {e.strerror or e}"
        problem = compression_problem(head, path)
        if problem:
            return problem
        if len(head) < _BLOCK:
            return f"{path}: not a tar file ({len(head)} bytes, shorter than one 512-byte header)"
        if head[257:262] == b"ustar" or head == bytes(_BLOCK):  # POSIX/GNU magic, or an empty archive
            return None
        try:
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")  # a v7 header: its checksum decides
        except tarfile.HeaderError:
            return f"{path}: not a tar file (no ustar magic at byte 257 and no valid header checksum)"
        return None

    def index_file(self, path: Path, ctx: IndexContext) -> FileIndex:
        return _scan(path, ctx)

    def reader(self, paths, open_path, *, cache_bytes, source_dir) -> FormatReader:
        return _Reader(paths, open_path, cache_bytes=cache_bytes, source_dir=source_dir)
