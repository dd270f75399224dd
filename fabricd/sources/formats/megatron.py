"""Megatron-LM indexed datasets (``megatron``): ``PREFIX.idx`` + ``PREFIX.bin``, pre-tokenized.

The layout is Megatron's ``MMapIndexedDataset`` (``megatron/core/datasets/indexed_dataset.py``),
what ``tools/preprocess_data.py`` writes. ``PREFIX.bin`` holds the token ids of every sequence,
back to back, in one dtype. ``PREFIX.idx`` (all little-endian) is:

===========  =======================  =====================================================
bytes        type                     what
===========  =======================  =====================================================
9            ``MMIDIDX\\x00\\x00``     magic
8            uint64                   version, 1
1            uint8                    dtype code of ``.bin``: 1 uint8, 2 int8, 3 int16,
                                      4 int32, 5 int64, 8 uint16 (6 float64, 7 float32 are
                                      refused: token ids are integers)
8            uint64                   ``S``: number of sequences
8            uint64                   ``D``: number of document indices (documents + 1)
4·S          int32[S]                 tokens per sequence
8·S          int64[S]                 byte offset of each sequence in ``.bin``
8·D          int64[D]                 document boundaries as sequence indices: ``0``, then
                                      the end of each document; the last is ``S``
===========  =======================  =====================================================

A sample is one *document*: its sequences (contiguous in ``.bin``) concatenated, as stored;
nothing is added (``preprocess_data.py --append-eod`` already put an EOD at each end). A
document of 0 tokens is skipped and counted. Token ids are checked (``0 <= id < 2**31``) when a
sample is read, never at indexing (that would read the whole ``.bin``): a sample with an id
outside that range fails when it is read.

Index rows: ``row`` is the document number, ``extent`` the byte offset of its first sequence in
``.bin`` (a read checks it, so a ``.bin`` rewritten in place fails its samples instead of serving
other ones). Indexing reads only ``.idx`` (memory-mapped, in chunks of documents) and checks it
whole: magic, version, dtype, that its size is exactly what the counts say, the document
boundaries, and that every sequence lies inside ``.bin`` and each document's sequences are
contiguous. A bad file raises ValueError naming what is wrong. Files with Megatron's optional
per-sequence *modes* (multimodal datasets: ``S`` more bytes at the end) are refused. Progress
(``on_bytes``) counts the ``.bin`` too (:meth:`~SourceFormat.data_size`), as checked by its size.

Reading memory-maps ``.idx`` and ``.bin`` once per open file (a bounded number stay open); a
sample is a view of the ``.bin`` map, copied once, by its conversion to int32. ``.bin`` is a file
samples refer to: it must resolve inside the source's directory (like a JSONL image).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from fabricd.sources.formats.base import FileIndex, FormatReader, IndexContext, RawSample, ReadRequest, SourceFormat
from fabricd.sources.roots import escapes_dir

__all__ = ["Megatron", "MEGATRON_MAGIC", "MEGATRON_DTYPES", "bin_path_of"]

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")   # magic, version, dtype code, sequences, document indices
#: dtype code -> the dtype of ``.bin`` (little-endian); the float codes 6 and 7 are not token ids
MEGATRON_DTYPES: dict[int, np.dtype] = {1: np.dtype("u1"), 2: np.dtype("i1"), 3: np.dtype("<i2"),
                                        4: np.dtype("<i4"), 5: np.dtype("<i8"), 8: np.dtype("<u2")}
_FLOAT_CODES = {6: "float64", 7: "float32"}
_CHUNK_DOCS = 1 << 20         # documents validated per step while indexing (bounds memory)
_ID_LIMIT = 2**31


def bin_path_of(idx_path: Path) -> Path:
    """The ``.bin`` beside ``PREFIX.idx``."""
    return idx_path.with_name(_bin_name(idx_path.name))


def _bin_name(name: str) -> str:
    return (name[:-4] if name.lower().endswith(".idx") else name) + ".bin"


class _IdxFile:
    """The arrays of one ``.idx``, memory-mapped, with its header and sizes checked."""

    def __init__(self, path: Path) -> None:
        size = os.stat(path).st_size
        if size < _HEADER.size:
            raise ValueError(f"{path}: not a Megatron index ({size} bytes, shorter than its "
                             f"{_HEADER.size}-byte header)")
        with open(path, "rb") as f:
            magic, version, code, seqs, docs = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MEGATRON_MAGIC:
            raise ValueError(f"{path}: not a Megatron index (magic bytes {magic!r}, expected {MEGATRON_MAGIC!r})")
        if version != _VERSION:
            raise ValueError(f"{path}: Megatron index version {version} is not supported (only {_VERSION})")
        if code in _FLOAT_CODES:
            raise ValueError(f"{path}: Megatron dtype code {code} ({_FLOAT_CODES[code]}) holds no token ids")
        if code not in MEGATRON_DTYPES:
            raise ValueError(f"{path}: unknown Megatron dtype code {code} "
                             f"(known: {', '.join(map(str, sorted(MEGATRON_DTYPES)))})")
        expected = _HEADER.size + 12 * seqs + 8 * docs
        if size == expected + seqs and seqs > 0:
            raise ValueError(f"{path}: a Megatron index with sequence modes (a multimodal dataset) is not supported")
        if size != expected:
            raise ValueError(f"{path}: {size} bytes, but its header ({seqs} sequences, {docs} document "
                             f"indices) makes {expected}: truncated or not a Megatron index")
        if docs < 1:
            raise ValueError(f"{path}: no document indices (a Megatron index holds at least the leading 0)")
        self.path = path
        self.dtype = MEGATRON_DTYPES[code]
        self.itemsize = self.dtype.itemsize
        self.num_sequences = int(seqs)
        self.num_documents = int(docs) - 1
        self.nbytes = size
        self.file = open(path, "rb")
        try:
            mm = np.memmap(self.file, dtype=np.uint8, mode="r")
        except BaseException:
            self.file.close()
            raise
        off = _HEADER.size
        self.lengths = np.frombuffer(mm, dtype="<i4", count=seqs, offset=off)
        self.pointers = np.frombuffer(mm, dtype="<i8", count=seqs, offset=off + 4 * seqs)
        self.doc_idx = np.frombuffer(mm, dtype="<i8", count=docs, offset=off + 12 * seqs)

    def close(self) -> None:
        self.file.close()

    def document(self, d: int) -> tuple[int, int]:
        """``(first sequence, end sequence)`` of document ``d``."""
        return int(self.doc_idx[d]), int(self.doc_idx[d + 1])


def _check_boundaries(idx: _IdxFile) -> None:
    di = idx.doc_idx
    if int(di[0]) != 0 or int(di[-1]) != idx.num_sequences:
        raise ValueError(f"{idx.path}: document indices run from {int(di[0])} to {int(di[-1])}, expected "
                         f"0 to {idx.num_sequences} (the number of sequences)")
    for lo in range(0, di.shape[0], _CHUNK_DOCS):
        part = di[lo:lo + _CHUNK_DOCS + 1]
        bad = np.flatnonzero(np.diff(part) < 0)
        if bad.size:
            d = lo + int(bad[0])
            raise ValueError(f"{idx.path}: document indices decrease at document {d} "
                             f"({int(di[d])} then {int(di[d + 1])})")


def _index_chunk(idx: _IdxFile, bin_size: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, first byte)`` of documents ``a..b-1``, after checking their sequences."""
    di = idx.doc_idx[a:b + 1]
    s0, s1 = int(di[0]), int(di[-1])
    lengths = idx.lengths[s0:s1].astype(np.int64)
    pointers = idx.pointers[s0:s1]
    where = f"{idx.path}: sequence"
    if lengths.size:
        bad = np.flatnonzero(lengths < 0)
        if bad.size:
            s = s0 + int(bad[0])
            raise ValueError(f"{where} {s} has a negative length ({int(lengths[bad[0]])})")
        ends = pointers + lengths * idx.itemsize
        bad = np.flatnonzero((pointers < 0) | (ends > bin_size))
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"{where} {s0 + k} spans bytes [{int(pointers[k])}, {int(ends[k])}) of a "
                             f"{bin_size}-byte .bin: the .bin is truncated or does not belong to this .idx")
    starts = di[:-1] - s0
    stops = di[1:] - s0
    follows = np.ones(lengths.size, bool)      # sequence k continues the document of sequence k-1
    follows[starts[starts < lengths.size]] = False
    if lengths.size > 1:
        gap = np.flatnonzero(follows[1:] & (pointers[1:] != pointers[:-1] + lengths[:-1] * idx.itemsize))
        if gap.size:
            k = int(gap[0]) + 1
            raise ValueError(f"{where} {s0 + k} starts at byte {int(pointers[k])}, not right after the previous "
                             f"sequence of its document: a document's sequences must be contiguous in .bin")
    csum = np.concatenate([[0], np.cumsum(lengths)])
    tokens = csum[stops] - csum[starts]
    first = np.zeros(b - a, np.int64)
    has = stops > starts
    first[has] = pointers[starts[has]]
    return tokens, first


class _MegatronFile:
    """An open Megatron dataset: its index arrays and the ``.bin`` mapped once.

    Both files stay open so that their sizes can be checked before the maps are touched: a
    mapped page beyond the end of a file truncated since it was opened would kill the process
    (SIGBUS) instead of failing a sample."""

    def __init__(self, idx_path: Path, source_dir: Path) -> None:
        bin_path = bin_path_of(idx_path)
        outside = escapes_dir(bin_path, source_dir)
        if outside is not None:
            raise PermissionError(f"{bin_path} resolves to {outside}, outside the source directory {source_dir}")
        self.idx = _IdxFile(idx_path)
        try:
            self.bin_file = open(bin_path, "rb")
        except BaseException:
            self.idx.close()
            raise
        # an empty file cannot be mapped; it holds no document anyway
        self.bin: np.ndarray = (np.memmap(self.bin_file, dtype=np.uint8, mode="r")
                                if os.fstat(self.bin_file.fileno()).st_size else np.zeros(0, np.uint8))

    def shrunk(self) -> str | None:
        """Why the maps may not be read now: a file is shorter than when it was mapped."""
        if os.fstat(self.idx.file.fileno()).st_size < self.idx.nbytes:
            return "its .idx shrank since it was opened"
        if os.fstat(self.bin_file.fileno()).st_size < self.bin.shape[0]:
            return "its .bin shrank since it was opened"
        return None

    def sample(self, d: int, extent: int) -> RawSample | str:
        idx = self.idx
        if not 0 <= d < idx.num_documents:
            return f"document {d} is beyond the file's {idx.num_documents} documents"
        s0, s1 = idx.document(d)
        if not 0 <= s0 < s1 <= idx.num_sequences:
            return f"document {d} has no sequences (or bad boundaries {s0}..{s1})"
        lengths = idx.lengths[s0:s1].astype(np.int64)
        pointers = idx.pointers[s0:s1]
        n = int(lengths.sum())
        start = int(pointers[0])
        if start != extent:
            return (f"document {d} starts at byte {start} of .bin, the index says {extent}: "
                    "the file changed since it was indexed")
        if n <= 0 or (lengths < 0).any():
            return f"document {d} is empty or has a negative sequence length"
        item = idx.itemsize
        if not np.array_equal(pointers[1:], pointers[:-1] + lengths[:-1] * item):
            return f"document {d}: its sequences are not contiguous in .bin"
        if start < 0 or start + n * item > self.bin.shape[0]:
            return f"document {d} spans bytes beyond the end of its .bin ({self.bin.shape[0]} bytes)"
        view = np.frombuffer(self.bin, dtype=idx.dtype, count=n, offset=start)
        lo, hi = int(view.min()), int(view.max())
        if lo < 0 or hi >= _ID_LIMIT:
            return f"document {d} holds token ids outside [0, 2**31) (min {lo}, max {hi})"
        return RawSample(input_ids=view.astype(np.int32))

    def close(self) -> None:
        # dropping the arrays unmaps the files (numpy owns the maps)
        self.bin = np.zeros(0, np.uint8)
        self.bin_file.close()
        self.idx.close()


class _Reader(FormatReader):
    def _open_file(self, path: Path):
        return _MegatronFile(path, self.source_dir)

    def read(self, file_idx: int, request: ReadRequest) -> list[RawSample | str]:
        n = request.rows.shape[0]
        try:
            f = self._file(file_idx)
        except Exception as e:  # noqa: BLE001 - a missing .bin, a bad header, a path refused
            return [f"{self.paths[file_idx]}: cannot open: {e}"] * n
        try:
            shrunk = f.shrunk()
        except OSError as e:
            shrunk = f"cannot stat: {e}"
        if shrunk:
            self._drop(file_idx)  # mapped again (and checked again) on the next read
            return [f"{self.paths[file_idx]}: {shrunk}"] * n
        out: list[RawSample | str] = []
        for d, extent in zip(request.rows.tolist(), request.extents.tolist()):
            try:
                sample = f.sample(int(d), int(extent))
            except Exception as e:  # noqa: BLE001 - e.g. SIGBUS-free I/O errors surfacing as OSError
                sample = f"{type(e).__name__}: {e}"
            out.append(sample if isinstance(sample, RawSample) else f"{self.paths[file_idx]}: {sample}")
        return out



class Megatron(SourceFormat):
    name = "megatron"
    extensions = (".idx",)
    tokenized = True

    def companions(self, rel: str) -> list[str]:
        return [_bin_name(rel)]

    def sniff(self, path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                magic = f.read(len(MEGATRON_MAGIC))
        except OSError as e:
            return f"{path}: cannot read: {e.strerror or e}"
        if magic != MEGATRON_MAGIC:
            return f"{path}: not a Megatron index (no {MEGATRON_MAGIC!r} magic bytes at its start)"
        if not bin_path_of(path).is_file():
            return f"{path}: its data file {bin_path_of(path).name} is missing beside it"
        return None

    def index_file(self, path: Path, ctx: IndexContext) -> FileIndex:
        bin_path = bin_path_of(path)
        try:
            bin_size = os.stat(bin_path).st_size
        except FileNotFoundError:
            raise ValueError(f"{path}: its data file {bin_path.name} is missing "
                             "(a Megatron dataset is PREFIX.idx beside PREFIX.bin)") from None
        outside = escapes_dir(bin_path, ctx.source_dir)
        if outside is not None:
            raise ValueError(f"{bin_path} resolves to {outside}, outside the source directory {ctx.source_dir}")
        idx = _IdxFile(path)
        try:
            return self._index(idx, bin_size, ctx)
        finally:
            idx.close()

    @staticmethod
    def _index(idx: _IdxFile, bin_size: int, ctx: IndexContext) -> FileIndex:
        _check_boundaries(idx)
        total = idx.nbytes + bin_size
        reported = 0
        rows, tokens, extents = [], [], []
        skipped = 0
        ndocs = idx.num_documents
        for a in range(0, ndocs, _CHUNK_DOCS):
            b = min(ndocs, a + _CHUNK_DOCS)
            tok, first = _index_chunk(idx, bin_size, a, b)
            keep = tok > 0
            skipped += int((~keep).sum())
            rows.append(np.arange(a, b, dtype=np.int64)[keep])
            tokens.append(tok[keep])
            extents.append(first[keep])
            done = total * b // ndocs
            ctx.on_bytes(done - reported)
            reported = done
        if total > reported:
            ctx.on_bytes(total - reported)
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return FileIndex(row=row, text_tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
                         num_images=np.zeros(row.shape[0], np.int32), skipped=skipped,
                         extent=np.concatenate(extents) if extents else np.zeros(0, np.int64))

    def reader(self, paths, open_path, *, cache_bytes, source_dir) -> FormatReader:
        return _Reader(paths, open_path, cache_bytes=cache_bytes, source_dir=source_dir)
