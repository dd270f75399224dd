"""Parquet sources: raw text (``parquet``) and pre-tokenized (``parquet-tokens``).

``parquet``: a ``text`` string column (required) and an optional ``images`` column of encoded
images (``list<binary>``, or ``list<struct<bytes: binary, ...>>`` as Hugging Face ``datasets``
writes them). A row whose text is null is skipped and counted.

``parquet-tokens``: an ``input_ids`` column (``list<int32>``; any integer list type is read),
with optionally ``labels`` (same lengths; -100 = no loss at that position, the Hugging Face
convention) or ``loss_mask`` (same lengths; nonzero = train on that token). Nothing is
tokenized: a sample is its ``input_ids``, as stored. A row with null or empty ids, or labels of
another length, is skipped and counted at indexing.

Both read one sample by reading (and caching, bounded in bytes) its row group: keep row groups
small.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fabricd.sources.formats.base import (
    FileIndex,
    FormatReader,
    IndexContext,
    RawSample,
    ReadRequest,
    SourceFormat,
    image_header_dims,
)

__all__ = ["ParquetText", "ParquetTokens", "image_bytes_array", "parquet_magic_problem"]

_BATCH_ROWS = 4096          # text-only files
_BATCH_ROWS_IMAGES = 256    # files with images: bounds the encoded bytes held while indexing
_BATCH_BYTES = 64 << 20     # ... and at most about this many (uncompressed) bytes per batch
_MAGIC = b"PAR1"


def parquet_magic_problem(path: Path) -> str | None:
    """Why ``path`` is not a Parquet file by its magic bytes, or None."""
    import os

    try:
        with open(path, "rb") as f:
            head = f.read(4)
            size = os.fstat(f.fileno()).st_size
            tail = b""
            if size >= 12:
                f.seek(size - 4)
                tail = f.read(4)
    except OSError as e:
        return f"{path}: cannot read: {e.strerror or e}"
    if head != _MAGIC or tail != _MAGIC:
        return f"{path}: not a Parquet file (no PAR1 magic bytes at its start and end)"
    return None


def image_bytes_array(images: pa.Array) -> pa.Array:
    """The flat array of encoded image bytes of a list-typed ``images`` column.

    Accepts ``list<binary>`` (the schema) and ``list<struct<bytes: binary, ...>>`` (how Hugging
    Face ``datasets`` stores images). Raises ValueError for any other type.
    """
    flat = pc.list_flatten(images)
    if pa.types.is_struct(flat.type):
        if flat.type.get_field_index("bytes") < 0:
            raise ValueError(f"images column of type {images.type} has no 'bytes' field")
        flat = pc.struct_field(flat, "bytes")
    if not (pa.types.is_binary(flat.type) or pa.types.is_large_binary(flat.type)):
        raise ValueError(f"images column must be list<binary>, got {images.type}")
    return flat


def _check_images_type(t: pa.DataType) -> None:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise ValueError(f"images column must be list<binary>, got {t}")
    vt = t.value_type
    if pa.types.is_struct(vt):
        if vt.get_field_index("bytes") < 0:
            raise ValueError(f"images column of type {t} has no 'bytes' field")
        vt = vt.field("bytes").type
    if not (pa.types.is_binary(vt) or pa.types.is_large_binary(vt)):
        raise ValueError(f"images column must be list<binary>, got {t}")


def _check_int_list(name: str, t: pa.DataType, *, bools: bool = False) -> None:
    ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_integer(t.value_type) or (bools and pa.types.is_boolean(t.value_type)))
    if not ok:
        raise ValueError(f"{name} column must be a list of integers{' or booleans' if bools else ''}, got {t}")


def _batch_rows(pf: pq.ParquetFile, most: int) -> int:
    """Rows per indexing batch: at most ``most``, fewer for big rows, so that a batch holds about
    ``_BATCH_BYTES`` (from the row groups' uncompressed sizes: a file of long documents is read a
    few rows at a time)."""
    md = pf.metadata
    rows = md.num_rows
    size = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    if rows <= 0 or size <= 0:
        return most
    return int(max(1, min(most, _BATCH_BYTES * rows // size)))


class _Progress:
    """Reports a file's on-disk size through ``on_bytes`` in proportion to the rows indexed."""

    def __init__(self, path: Path, pf: pq.ParquetFile, on_bytes) -> None:
        import os

        self.size = os.stat(path).st_size
        self.rows = max(1, pf.metadata.num_rows)
        self.on_bytes = on_bytes
        self.done = 0
        self.sent = 0

    def rows_done(self, n: int) -> None:
        self.done += n
        target = self.size * min(self.done, self.rows) // self.rows
        if target > self.sent:
            self.on_bytes(target - self.sent)
            self.sent = target


class _ParquetFile:
    """An open Parquet file and the first row of each of its row groups."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.file = pq.ParquetFile(path)
        md = self.file.metadata
        counts = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        names = self.file.schema_arrow.names
        self.columns = [c for c in columns if c in names]

    def close(self) -> None:
        self.file.close()


class _RowGroupReader(FormatReader):
    """Reads rows through a bounded LRU cache of decoded row groups (shared by both formats)."""

    columns: tuple[str, ...] = ()

    def __init__(self, paths: Sequence[Path], open_path: Callable[[int], Path], *, cache_bytes: int,
                 source_dir: Path) -> None:
        super().__init__(paths, open_path, cache_bytes=cache_bytes, source_dir=source_dir)
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cache_nbytes = 0

    @property
    def cache_nbytes(self) -> int:
        return self._cache_nbytes

    def _open_file(self, path: Path):
        return _ParquetFile(path, self.columns)

    def _row_group(self, fi: int, state: _ParquetFile, rg: int) -> pa.Table:
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

    def read(self, file_idx: int, request: ReadRequest) -> list[RawSample | str]:
        rows = request.rows
        out: list[RawSample | str | None] = [None] * rows.shape[0]
        try:
            state = self._file(file_idx)
        except Exception as e:  # noqa: BLE001
            return [f"{self.paths[file_idx]}: cannot open: {e}"] * rows.shape[0]
        rgs = np.searchsorted(state.starts, rows, side="right") - 1
        for rg in np.unique(rgs):
            slots = np.flatnonzero(rgs == rg)
            if rg < 0 or rg >= len(state.starts) - 1:
                for k in slots:
                    out[k] = f"{self.paths[file_idx]}: row beyond end of file"
                continue
            try:
                table = self._row_group(file_idx, state, int(rg))
                sub = table.take(pa.array(rows[slots] - state.starts[rg], type=pa.int64()))
                for k, sample in zip(slots, self._samples(sub)):
                    out[k] = sample
            except Exception as e:  # noqa: BLE001
                where = f"{self.paths[file_idx]} row group {int(rg)}"
                for k in slots:
                    if out[k] is None:
                        out[k] = f"{where}: {type(e).__name__}: {e}"
        return out  # type: ignore[return-value]

    def _samples(self, sub: pa.Table) -> list[RawSample | str]:
        raise NotImplementedError

    def close(self) -> None:
        super().close()
        self._cache.clear()
        self._cache_nbytes = 0


class _TextReader(_RowGroupReader):
    columns = ("text", "images")

    def _samples(self, sub: pa.Table) -> list[RawSample | str]:
        texts = sub.column("text").to_pylist()
        if "images" in sub.column_names:
            images = sub.column("images").combine_chunks()
            flat = image_bytes_array(images).to_pylist()
            lengths = images.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        else:
            flat = []
            lengths = np.zeros(len(texts), np.int64)
        out: list[RawSample | str] = []
        cursor = 0
        for k, text in enumerate(texts):
            imgs = flat[cursor:cursor + int(lengths[k])]
            cursor += int(lengths[k])
            if text is None:
                out.append("text is null")
            elif any(b is None for b in imgs):
                out.append("an image is null")
            else:
                out.append(RawSample(text=text, images=tuple(imgs)))
        return out


class ParquetText(SourceFormat):
    name = "parquet"
    extensions = (".parquet",)

    def sniff(self, path: Path) -> str | None:
        return parquet_magic_problem(path)

    def index_file(self, path: Path, ctx: IndexContext) -> FileIndex:
        pf = pq.ParquetFile(path)
        try:
            schema = pf.schema_arrow
            if "text" not in schema.names:
                raise ValueError(f"no 'text' column (columns: {schema.names})")
            t = schema.field("text").type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise ValueError(f"text column must be a string column, got {t}")
            has_images = "images" in schema.names
            if has_images:
                _check_images_type(schema.field("images").type)
            columns = ["text", "images"] if has_images else ["text"]
            rows, tokens, nimgs, ilen, ih, iw, before, seq, chunks = [], [], [], [], [], [], [], [], []
            start = 0
            progress = _Progress(path, pf, ctx.on_bytes)
            rows_per_batch = _batch_rows(pf, _BATCH_ROWS_IMAGES if has_images else _BATCH_ROWS)
            for batch in pf.iter_batches(batch_size=rows_per_batch, columns=columns, use_threads=False):
                n = batch.num_rows
                text_col = batch.column(0)
                valid = np.asarray(text_col.is_valid().to_numpy(zero_copy_only=False), bool)
                if has_images:
                    images = batch.column(1)
                    nimg = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False)
                    flat = image_bytes_array(images)
                    owner = pc.list_parent_indices(images).to_numpy(zero_copy_only=False)
                    data = flat.to_pylist()
                    keep_img = valid[owner] if len(owner) else np.zeros(0, bool)
                    dims = [image_header_dims(b) if (b is not None and keep) else (-1, -1)
                            for b, keep in zip(data, keep_img)]
                    ilen.append(np.fromiter((len(b) if b is not None else 0 for b, keep in zip(data, keep_img)
                                             if keep), np.int64))
                    ih.append(np.asarray([d[0] for d, keep in zip(dims, keep_img) if keep], np.int32))
                    iw.append(np.asarray([d[1] for d, keep in zip(dims, keep_img) if keep], np.int32))
                else:
                    nimg = np.zeros(n, np.int32)
                texts = text_col.filter(pa.array(valid)).to_pylist()
                lay = ctx.count_layout(texts, nimg[valid])
                tokens.append(lay.counts)
                before.append(lay.before)
                seq.append(lay.seq)
                chunks.extend(lay.chunks)
                rows.append(np.arange(start, start + n, dtype=np.int64)[valid])
                nimgs.append(np.asarray(nimg, np.int32)[valid])
                start += n
                progress.rows_done(n)
        finally:
            pf.close()
        cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
        row = cat(rows, np.int64)
        return FileIndex(row=row, text_tokens=cat(tokens, np.int64), num_images=cat(nimgs, np.int32),
                         skipped=start - row.shape[0], image_len=cat(ilen, np.int64), image_h=cat(ih, np.int32),
                         image_w=cat(iw, np.int32), image_text_before=cat(before, np.int64),
                         image_seq=cat(seq, np.int32), chunk_tokens=chunks)

    def reader(self, paths, open_path, *, cache_bytes, source_dir) -> FormatReader:
        return _TextReader(paths, open_path, cache_bytes=cache_bytes, source_dir=source_dir)


class _TokensReader(_RowGroupReader):
    columns = ("input_ids", "labels", "loss_mask")

    def _samples(self, sub: pa.Table) -> list[RawSample | str]:
        ids_col = sub.column("input_ids").combine_chunks()
        ids = ids_col.to_pylist()
        extra = next((c for c in ("labels", "loss_mask") if c in sub.column_names), None)
        other = sub.column(extra).to_pylist() if extra else [None] * len(ids)
        out: list[RawSample | str] = []
        for k, seq in enumerate(ids):
            if not seq:
                out.append("input_ids is null or empty")
                continue
            arr = np.asarray(seq, dtype=np.int64)
            if arr.min() < 0 or arr.max() >= 2**31:
                out.append("input_ids holds ids outside [0, 2**31)")
                continue
            arr = arr.astype(np.int32)
            targets = None
            if extra is not None and other[k] is not None:
                o = np.asarray(other[k], dtype=np.int64)
                if o.shape != arr.shape:
                    out.append(f"{extra} has {o.shape[0]} entries for {arr.shape[0]} input_ids")
                    continue
                targets = (o.astype(np.int32) if extra == "labels"
                           else np.where(o != 0, arr, -100).astype(np.int32))
            out.append(RawSample(input_ids=arr, targets=targets))
        return out


class ParquetTokens(SourceFormat):
    name = "parquet-tokens"
    extensions = (".parquet",)
    tokenized = True

    def sniff(self, path: Path) -> str | None:
        return parquet_magic_problem(path)

    def index_file(self, path: Path, ctx: IndexContext) -> FileIndex:
        pf = pq.ParquetFile(path)
        try:
            schema = pf.schema_arrow
            if "input_ids" not in schema.names:
                raise ValueError(f"no 'input_ids' column (columns: {schema.names})")
            _check_int_list("input_ids", schema.field("input_ids").type)
            extra = next((c for c in ("labels", "loss_mask") if c in schema.names), None)
            if extra:
                _check_int_list(extra, schema.field(extra).type, bools=extra == "loss_mask")
            rows, tokens = [], []
            start = 0
            top = -1
            progress = _Progress(path, pf, ctx.on_bytes)
            for batch in pf.iter_batches(batch_size=_batch_rows(pf, _BATCH_ROWS),
                                         columns=["input_ids"] + ([extra] if extra else []), use_threads=False):
                n = batch.num_rows
                length = pc.fill_null(pc.list_value_length(batch.column(0)), 0).to_numpy(zero_copy_only=False)
                keep = length > 0
                if extra:
                    other = pc.list_value_length(batch.column(1)).to_numpy(zero_copy_only=False)
                    other = np.where(np.isnan(other.astype(np.float64)), length, other)  # null labels: train on all
                    keep &= other == length
                rows.append(np.arange(start, start + n, dtype=np.int64)[keep])
                tokens.append(np.asarray(length, np.int64)[keep])
                biggest = pc.max(pc.list_flatten(batch.column(0))).as_py()
                top = max(top, int(biggest) if biggest is not None else -1)
                start += n
                progress.rows_done(n)
        finally:
            pf.close()
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        text_tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
        return FileIndex(row=row, text_tokens=text_tokens, num_images=np.zeros(row.shape[0], np.int32),
                         skipped=start - row.shape[0], max_token_id=top)

    def reader(self, paths, open_path, *, cache_bytes, source_dir) -> FormatReader:
        return _TokensReader(paths, open_path, cache_bytes=cache_bytes, source_dir=source_dir)
