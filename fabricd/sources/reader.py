"""Random access to one source's raw samples by sample id.

The reader turns sample ids into :class:`RawSample` (text and encoded image bytes), reading
each needed Parquet row group once per request and keeping recently used row groups in an LRU
cache bounded in bytes. It never raises for a bad sample or a bad file: such a sample comes back
as a :class:`~fabricd.errors.SampleError` in its slot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fabricd.errors import SampleError, SourceError
from fabricd.sources.index import SourceIndex, _parse_jsonl_line, image_bytes_array, source_fingerprint
from fabricd.sources.roots import outside_roots, resolved

__all__ = ["RawSample", "SourceReader"]

log = logging.getLogger(__name__)

_MAX_OPEN_FILES = 64


@dataclass(frozen=True)
class RawSample:
    """One sample as stored: its text (placeholders included) and encoded images, in schema order."""

    text: str
    images: tuple[bytes, ...]


class _ParquetFileState:
    """An open Parquet file and the first row of each of its row groups."""

    def __init__(self, path: Path) -> None:
        self.file = pq.ParquetFile(path)
        md = self.file.metadata
        counts = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        names = self.file.schema_arrow.names
        self.columns = ["text", "images"] if "images" in names else ["text"]

    def close(self) -> None:
        self.file.close()


class SourceReader:
    """Random access to one source's samples by sample id, with a bounded row-group cache.

    Construction checks that the source still has the fingerprint it was indexed with and raises
    SourceError otherwise: a source changed under a running job is never silently mixed.
    With ``roots`` (the node's data roots), a data file is checked to resolve inside them each
    time it is opened; a JSONL image must resolve inside the source's directory, whatever the
    roots (:mod:`fabricd.sources.roots`). Either failure is a SampleError of the sample.
    Not thread-safe; use one reader per thread or process.
    """

    def __init__(self, index: SourceIndex, *, cache_bytes: int = 256 << 20,
                 roots: Sequence[Path] | None = None) -> None:
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        try:
            current = source_fingerprint(index.root, index.format)
        except OSError as e:
            raise SourceError(f"source {index.name!r}: {index.root}: cannot stat source: {e}") from e
        if current != index.fingerprint:
            raise SourceError(
                f"source {index.name!r}: {index.root}: source changed since it was indexed "
                f"(fingerprint {index.fingerprint[:16]} -> {current[:16]}); re-index explicitly"
            )
        self.index = index
        self.roots = tuple(roots) if roots is not None else None
        base = index.base_dir
        self._source_dir = base.resolve()  # JSONL images must resolve inside it
        self._paths = [base / f for f in index.files]
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cache_nbytes = 0
        self._files: OrderedDict[int, _ParquetFileState | BinaryIO] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ public

    @property
    def cache_nbytes(self) -> int:
        """Bytes of decoded row groups held in the cache now (never above ``cache_bytes``)."""
        return self._cache_nbytes

    def read(self, sample_ids: np.ndarray) -> list[RawSample | SampleError]:
        """The samples ``sample_ids``, in the same order; a sample that cannot be read (bad id,
        unreadable file, malformed row, missing image file) is a SampleError in its slot."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        out: list[RawSample | SampleError | None] = [None] * ids.shape[0]
        n = self.index.num_samples
        valid = (ids >= 0) & (ids < n)
        for pos in np.flatnonzero(~valid):
            out[pos] = self._error(int(ids[pos]), f"sample id out of range [0, {n})")
        positions = np.flatnonzero(valid)
        if positions.size:
            if self.index.format == "parquet":
                self._read_parquet(ids, positions, out)
            else:
                self._read_jsonl(ids, positions, out)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Close open files and drop the cache. The reader must not be used afterwards."""
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        self._files.clear()
        self._cache.clear()
        self._cache_nbytes = 0

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _error(self, sample_id: int, reason: str) -> SampleError:
        return SampleError(self.index.name, sample_id, reason)

    def _open(self, fi: int, opener):
        f = self._files.get(fi)
        if f is not None:
            self._files.move_to_end(fi)
            return f
        path = self._paths[fi]
        if self.roots is not None:  # re-checked at open: a file swapped for a symlink since indexing
            problem = outside_roots(path, self.roots)
            if problem:
                raise PermissionError(problem)
        f = opener(path)
        self._files[fi] = f
        while len(self._files) > _MAX_OPEN_FILES:
            _, old = self._files.popitem(last=False)
            old.close()
        return f

    def _row_group(self, fi: int, state: _ParquetFileState, rg: int) -> pa.Table:
        key = (fi, rg)
        table = self._cache.get(key)
        if table is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return table
        self.cache_misses += 1
        table = state.file.read_row_group(rg, columns=state.columns, use_threads=False)
        size = table.nbytes
        if size <= self.cache_bytes:
            while self._cache and self._cache_nbytes + size > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cache_nbytes -= old.nbytes
            self._cache[key] = table
            self._cache_nbytes += size
        return table

    def _read_parquet(self, ids: np.ndarray, positions: np.ndarray, out: list) -> None:
        idx = self.index
        fis = idx.file_idx[ids[positions]]
        rows = idx.row[ids[positions]]
        for fi in np.unique(fis):
            fi = int(fi)
            in_file = positions[fis == fi]
            file_rows = rows[fis == fi]
            try:
                state = self._open(fi, _ParquetFileState)
            except Exception as e:  # noqa: BLE001
                for pos in in_file:
                    out[pos] = self._error(int(ids[pos]), f"{self._paths[fi]}: cannot open: {e}")
                continue
            rgs = np.searchsorted(state.starts, file_rows, side="right") - 1
            for rg in np.unique(rgs):
                sel = rgs == rg
                group_pos = in_file[sel]
                local = file_rows[sel] - state.starts[rg]
                if rg < 0 or rg >= len(state.starts) - 1:
                    for pos in group_pos:
                        out[pos] = self._error(int(ids[pos]), f"{self._paths[fi]}: row beyond end of file")
                    continue
                try:
                    table = self._row_group(fi, state, int(rg))
                    self._take(table, local, ids, group_pos, out)
                except Exception as e:  # noqa: BLE001
                    where = f"{self._paths[fi]} row group {int(rg)}"
                    for pos in group_pos:
                        if out[pos] is None:
                            out[pos] = self._error(int(ids[pos]), f"{where}: {type(e).__name__}: {e}")

    def _take(self, table: pa.Table, local: np.ndarray, ids: np.ndarray, positions: np.ndarray,
              out: list) -> None:
        sub = table.take(pa.array(local, type=pa.int64()))
        texts = sub.column("text").to_pylist()
        if "images" in sub.column_names:
            images = sub.column("images").combine_chunks()
            flat = image_bytes_array(images).to_pylist()
            lengths = images.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        else:
            flat = []
            lengths = np.zeros(len(texts), np.int64)
        cursor = 0
        for k, pos in enumerate(positions):
            text = texts[k]
            imgs = flat[cursor:cursor + int(lengths[k])]
            cursor += int(lengths[k])
            if text is None:
                out[pos] = self._error(int(ids[pos]), "text is null")
            elif any(b is None for b in imgs):
                out[pos] = self._error(int(ids[pos]), "an image is null")
            else:
                out[pos] = RawSample(text=text, images=tuple(imgs))

    def _read_jsonl(self, ids: np.ndarray, positions: np.ndarray, out: list) -> None:
        idx = self.index
        order = positions[np.lexsort((idx.row[ids[positions]], idx.file_idx[ids[positions]]))]
        for pos in order:
            sid = int(ids[pos])
            fi = int(idx.file_idx[sid])
            path = self._paths[fi]
            try:
                f = self._open(fi, lambda p: open(p, "rb"))
                f.seek(int(idx.row[sid]))
                line = f.readline()
            except OSError as e:
                out[pos] = self._error(sid, f"{path}: cannot read: {e}")
                continue
            parsed = _parse_jsonl_line(line)
            if parsed is None:
                out[pos] = self._error(sid, f"{path} at byte {int(idx.row[sid])}: malformed line")
                continue
            text, paths = parsed
            images = []
            for p in paths:
                img_path = path.parent / p
                target = resolved(img_path)
                if not target.is_relative_to(self._source_dir):  # absolute elsewhere, "..", a symlink out
                    out[pos] = self._error(sid, f"image {p!r} resolves to {target}, outside the source "
                                                f"directory {self._source_dir}")
                    break
                try:
                    images.append(target.read_bytes())  # the checked path, not the link again
                except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
                    out[pos] = self._error(sid, f"image {img_path}: {getattr(e, 'strerror', None) or e}")
                    break
            else:
                out[pos] = RawSample(text=text, images=tuple(images))
