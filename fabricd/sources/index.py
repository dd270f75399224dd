"""The per-source metadata index: one row of length features per sample.

A sample id is the sample's position in its source's index (``0 .. N-1``). The index holds
what the planner needs (token and image counts, encoded image bytes) and where the reader finds
the sample (file, row or byte offset); nothing else of the data. It is built once, in bounded
memory, persisted as a Parquet file next to the source and reused for as long as the source's
fingerprint (file names, sizes and mtimes) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fabricd.errors import SourceError
from fabricd.sources.roots import check_in_roots, escapes_dir, outside_roots
from fabricd.tokenizer import IMAGE_PLACEHOLDER, TOKENIZER_ID, text_token_counts

__all__ = [
    "INDEX_VERSION",
    "FORMATS",
    "SourceIndex",
    "source_fingerprint",
    "list_data_files",
    "infer_format",
    "index_path",
    "image_bytes_array",
    "open_index",
    "require_samples",
    "skip_reasons",
]

log = logging.getLogger(__name__)

#: Bump when the index layout or the meaning of a column changes; old indexes are rebuilt.
INDEX_VERSION = 1
#: Source formats and the file extensions that belong to them.
FORMATS: dict[str, tuple[str, ...]] = {"parquet": (".parquet",), "jsonl": (".jsonl",)}

_INDEX_DIRNAME = ".fabricd-index"
_FILE_INDEX_SUFFIX = ".fabricd-index.parquet"
_META_KEY = b"fabricd.index"
_BATCH_ROWS = 4096          # text-only files
_BATCH_ROWS_IMAGES = 256    # files with images: bounds the encoded bytes held while indexing
_JSONL_CHUNK_LINES = 8192


@dataclass(frozen=True, eq=False)
class SourceIndex:
    """The metadata of one source; row ``i`` describes sample id ``i``.

    ``files`` are relative to ``root`` for a directory source, or the file's own name for a
    single-file source (see :attr:`base_dir`). ``row`` is the row within the Parquet file, or the
    byte offset of the line in the JSONL file. ``text_tokens`` includes the EOS token.
    """

    name: str
    root: Path
    format: str
    files: tuple[str, ...]
    fingerprint: str
    file_idx: np.ndarray
    row: np.ndarray
    text_tokens: np.ndarray
    num_images: np.ndarray
    image_bytes: np.ndarray
    files_skipped: tuple[tuple[str, str], ...]
    rows_skipped: int

    @property
    def num_samples(self) -> int:
        """Number of samples (the sample ids are ``range(num_samples)``)."""
        return int(self.file_idx.shape[0])

    @property
    def base_dir(self) -> Path:
        """The directory ``files`` are relative to."""
        return self.root if self.root.is_dir() else self.root.parent

    def file_path(self, file_idx: int) -> Path:
        """Absolute path of data file ``file_idx``."""
        return self.base_dir / self.files[file_idx]


def skip_reasons(index: SourceIndex, limit: int = 5) -> list[str]:
    """``"<file>: <reason>"`` for the first ``limit`` files indexing skipped (and how many more)."""
    out = [f"{rel}: {reason}" for rel, reason in index.files_skipped[:limit]]
    if len(index.files_skipped) > limit:
        out.append(f"... and {len(index.files_skipped) - limit} more files")
    return out


def require_samples(index: SourceIndex) -> None:
    """Raise SourceError, quoting why each file was skipped, when ``index`` has no usable sample."""
    if index.num_samples > 0:
        return
    why = []
    if index.files_skipped:
        why.append(f"{len(index.files_skipped)} of {len(index.files)} files skipped: "
                   + "; ".join(skip_reasons(index)))
    if index.rows_skipped:
        why.append(f"{index.rows_skipped} rows skipped (null text or malformed line)")
    if not why:
        why.append("its files hold no rows")
    raise SourceError(f"source {index.name!r} ({index.root}) has no usable samples: {'; '.join(why)}")


# --------------------------------------------------------------------------- discovery


def _is_data_file(rel: Path, exts: tuple[str, ...]) -> bool:
    if rel.name.endswith(_FILE_INDEX_SUFFIX):
        return False
    if any(part.startswith((".", "_")) for part in rel.parts):
        return False  # hidden files, our index dir, Spark/Hadoop markers (_SUCCESS, _metadata)
    return rel.suffix.lower() in exts


def list_data_files(root: Path, format: str | None = None) -> list[str]:
    """Data files of a source, sorted by relative path (POSIX separators).

    A directory source holds every file with the format's extension below it, recursively,
    except hidden paths and paths starting with ``_``; ``format=None`` collects every known
    extension. A single-file source is just that file's name.
    """
    exts = FORMATS[format] if format is not None else tuple(e for v in FORMATS.values() for e in v)
    if root.is_file():
        return [root.name]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
        for fn in filenames:
            rel = Path(dirpath, fn).relative_to(root)
            if _is_data_file(rel, exts):
                out.append(rel.as_posix())
    out.sort()
    return out


def infer_format(root: Path) -> str:
    """The format of a source from its files' extensions. Raises SourceError on none or a mix."""
    found = set()
    for rel in list_data_files(root, None):
        suffix = Path(rel).suffix.lower()
        for fmt, exts in FORMATS.items():
            if suffix in exts:
                found.add(fmt)
    if not found:
        raise SourceError(f"{root}: no data files (expected one of {sorted(FORMATS)} by extension)")
    if len(found) > 1:
        raise SourceError(f"{root}: mixed formats {sorted(found)}; split them into separate sources")
    return found.pop()


def source_fingerprint(root: Path, format: str) -> str:
    """A hex digest of the source's data files' (relative path, size, mtime_ns), the index
    version and the tokenizer. Reads no data; changes whenever a file is added, removed or
    rewritten. (For JSONL, image files referenced by the lines are not part of it.)"""
    root = Path(root)
    base = root if root.is_dir() else root.parent
    h = hashlib.sha256()
    h.update(f"fabricd-index v{INDEX_VERSION} {TOKENIZER_ID} {format}\n".encode())
    for rel in list_data_files(root, format):
        st = os.stat(base / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- building


@dataclass
class _Columns:
    file_idx: list[np.ndarray]
    row: list[np.ndarray]
    text_tokens: list[np.ndarray]
    num_images: list[np.ndarray]
    image_bytes: list[np.ndarray]

    def add(self, fi: int, row: np.ndarray, tokens: np.ndarray, nimg: np.ndarray, ibytes: np.ndarray) -> None:
        self.file_idx.append(np.full(row.shape[0], fi, dtype=np.int32))
        self.row.append(row.astype(np.int64, copy=False))
        self.text_tokens.append(tokens.astype(np.int32, copy=False))
        self.num_images.append(nimg.astype(np.int32, copy=False))
        self.image_bytes.append(ibytes.astype(np.int64, copy=False))

    def arrays(self) -> dict[str, np.ndarray]:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        return {
            "file_idx": cat(self.file_idx, np.int32),
            "row": cat(self.row, np.int64),
            "text_tokens": cat(self.text_tokens, np.int32),
            "num_images": cat(self.num_images, np.int32),
            "image_bytes": cat(self.image_bytes, np.int64),
        }


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


def _check_text_type(t: pa.DataType) -> None:
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ValueError(f"text column must be a string column, got {t}")


def _index_parquet_file(path: Path) -> tuple[np.ndarray, ...]:
    """(row, text_tokens, num_images, image_bytes, null_rows) of one Parquet file."""
    pf = pq.ParquetFile(path)
    try:
        names = pf.schema_arrow.names
        if "text" not in names:
            raise ValueError(f"no 'text' column (columns: {names})")
        _check_text_type(pf.schema_arrow.field("text").type)
        has_images = "images" in names
        if has_images:
            _check_images_type(pf.schema_arrow.field("images").type)
        columns = ["text", "images"] if has_images else ["text"]
        rows, tokens, nimgs, ibytes = [], [], [], []
        start = 0
        batch_rows = _BATCH_ROWS_IMAGES if has_images else _BATCH_ROWS
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            n = batch.num_rows
            tok = text_token_counts(batch.column(0))
            if has_images:
                images = batch.column(1)
                nimg = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False)
                lengths = pc.fill_null(pc.binary_length(image_bytes_array(images)), 0)
                parents = pc.list_parent_indices(images).to_numpy(zero_copy_only=False)
                ib = np.bincount(parents, weights=lengths.to_numpy(zero_copy_only=False), minlength=n)
            else:
                nimg = np.zeros(n, np.int32)
                ib = np.zeros(n, np.int64)
            keep = tok >= 0
            rows.append(np.arange(start, start + n, dtype=np.int64)[keep])
            tokens.append(tok[keep])
            nimgs.append(nimg[keep])
            ibytes.append(np.rint(ib[keep]).astype(np.int64))
            start += n
    finally:
        pf.close()
    kept = sum(r.shape[0] for r in rows)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    return (cat(rows, np.int64), cat(tokens, np.int32), cat(nimgs, np.int32), cat(ibytes, np.int64),
            np.int64(start - kept))


def _iter_lines(f) -> Iterator[tuple[int, bytes]]:
    offset = 0
    for line in f:
        yield offset, line
        offset += len(line)


def _parse_jsonl_line(line: bytes) -> tuple[str, list[str]] | None:
    """(text, image paths) of one JSONL line, or None when it is malformed."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    text = obj.get("text")
    if not isinstance(text, str):
        return None
    images = obj.get("images")
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return None
    return text, images


def _index_jsonl_file(path: Path, on_bytes, source_dir: Path) -> tuple[np.ndarray, ...]:
    """Index columns of one JSONL file. Image sizes are read only for images inside
    ``source_dir`` (resolved): an image leading out of it fails its sample when it is read."""
    rows: list[int] = []
    tokens: list[int] = []
    nimgs: list[int] = []
    ibytes: list[int] = []
    malformed = 0
    base = path.parent
    pending = 0
    with open(path, "rb") as f:
        for offset, line in _iter_lines(f):
            pending += len(line)
            if pending >= (4 << 20):
                on_bytes(pending)
                pending = 0
            if not line.strip():
                continue
            parsed = _parse_jsonl_line(line)
            if parsed is None:
                malformed += 1
                continue
            text, images = parsed
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
                malformed += 1
                continue
            size = 0
            for p in images:
                if escapes_dir(base / p, source_dir) is not None:
                    continue  # never stat outside the source; the reader fails this sample
                try:
                    size += os.stat(base / p).st_size
                except (OSError, ValueError):  # ValueError: a NUL byte in the path
                    pass  # the reader fails this sample later; it is skipped then
            rows.append(offset)
            tokens.append(len(data) - len(IMAGE_PLACEHOLDER) * data.count(IMAGE_PLACEHOLDER.encode()) + 1)
            nimgs.append(len(images))
            ibytes.append(size)
    on_bytes(pending)
    return (np.asarray(rows, np.int64), np.asarray(tokens, np.int32), np.asarray(nimgs, np.int32),
            np.asarray(ibytes, np.int64), np.int64(malformed))


def _build(name: str, root: Path, format: str, files: list[str], fingerprint: str,
           progress: bool) -> SourceIndex:
    base = root if root.is_dir() else root.parent
    source_dir = base.resolve()
    cols = _Columns([], [], [], [], [])
    skipped: list[tuple[str, str]] = []
    rows_skipped = 0
    total = 0
    for rel in files:
        try:
            total += os.stat(base / rel).st_size
        except OSError:
            pass
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"indexing {name}", leave=False)
    on_bytes = bar.update if bar is not None else (lambda n: None)
    try:
        for fi, rel in enumerate(files):
            path = base / rel
            try:
                if format == "parquet":
                    row, tok, nimg, ib, bad = _index_parquet_file(path)
                    on_bytes(os.stat(path).st_size)
                else:
                    row, tok, nimg, ib, bad = _index_jsonl_file(path, on_bytes, source_dir)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                reason = f"{type(e).__name__}: {e}"
                log.warning("source %r: skipping unreadable file %s: %s", name, path, reason)
                skipped.append((rel, reason))
                continue
            cols.add(fi, row, tok, nimg, ib)
            rows_skipped += int(bad)
    finally:
        if bar is not None:
            bar.close()
    arrays = cols.arrays()
    if rows_skipped:
        log.warning("source %r: skipped %d rows (null text or malformed line)", name, rows_skipped)
    return SourceIndex(name=name, root=root, format=format, files=tuple(files), fingerprint=fingerprint,
                       files_skipped=tuple(skipped), rows_skipped=rows_skipped, **arrays)


# --------------------------------------------------------------------------- persistence

_COLUMNS = ("file_idx", "row", "text_tokens", "num_images", "image_bytes")


def index_path(root: Path, fingerprint: str) -> Path:
    """Where the index of ``root`` with this fingerprint lives next to the source."""
    if root.is_dir():
        return root / _INDEX_DIRNAME / f"index-{fingerprint[:16]}.parquet"
    return root.with_name(root.name + _FILE_INDEX_SUFFIX)


def _fallback_path(index_dir: Path, name: str, root: Path, fingerprint: str) -> Path:
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "source"
    return Path(index_dir) / f"{safe}-{tag}" / f"index-{fingerprint[:16]}.parquet"


def _write(index: SourceIndex, path: Path) -> None:
    meta = {
        "version": INDEX_VERSION,
        "tokenizer": TOKENIZER_ID,
        "fingerprint": index.fingerprint,
        "format": index.format,
        "files": list(index.files),
        "files_skipped": [list(x) for x in index.files_skipped],
        "rows_skipped": index.rows_skipped,
    }
    table = pa.table({c: getattr(index, c) for c in _COLUMNS})
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an index is as readable as its source
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _read_meta(path: Path) -> dict:
    raw = pq.read_schema(path).metadata or {}
    if _META_KEY not in raw:
        raise ValueError("no fabricd index metadata")
    return json.loads(raw[_META_KEY])


def _load(path: Path, name: str, root: Path, format: str, fingerprint: str) -> SourceIndex | None:
    """The index at ``path`` if it exists and matches; None otherwise."""
    if not path.is_file():
        return None
    try:
        meta = _read_meta(path)
        if meta.get("version") != INDEX_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        table = pq.read_table(path)
        arrays = {c: table.column(c).to_numpy() for c in _COLUMNS}
    except Exception as e:  # noqa: BLE001 - a broken index is rebuilt
        log.info("source %r: index %s unreadable (%s); rebuilding", name, path, e)
        return None
    return SourceIndex(
        name=name, root=root, format=format, files=tuple(meta["files"]), fingerprint=fingerprint,
        file_idx=arrays["file_idx"].astype(np.int32, copy=False),
        row=arrays["row"].astype(np.int64, copy=False),
        text_tokens=arrays["text_tokens"].astype(np.int32, copy=False),
        num_images=arrays["num_images"].astype(np.int32, copy=False),
        image_bytes=arrays["image_bytes"].astype(np.int64, copy=False),
        files_skipped=tuple((str(a), str(b)) for a, b in meta["files_skipped"]),
        rows_skipped=int(meta["rows_skipped"]),
    )


def _candidates(path: Path) -> list[Path]:
    """Existing index files that share ``path``'s location (older fingerprints included)."""
    if path.name.startswith("index-"):
        if not path.parent.is_dir():
            return []
        return sorted(p for p in path.parent.glob("index-*.parquet") if p.is_file())
    return [path] if path.is_file() else []


def _why_rebuild(paths: list[Path]) -> str:
    for loc in paths:
        for old in _candidates(loc):
            try:
                meta = _read_meta(old)
            except Exception:  # noqa: BLE001
                return f"index {old} unreadable"
            if meta.get("version") != INDEX_VERSION:
                return f"index version {meta.get('version')} != {INDEX_VERSION}"
            return "source changed since it was indexed"
    return "no index"


def _remove_stale(path: Path, keep: Path) -> None:
    for old in _candidates(path):
        if old != keep:
            try:
                old.unlink()
                log.info("removed stale index %s", old)
            except OSError as e:
                log.warning("could not remove stale index %s: %s", old, e)


def open_index(name: str, path: str | Path, *, format: str | None = None, index_dir: Path | None = None,
               progress: bool = False, rebuild: bool = False,
               roots: Sequence[Path] | None = None) -> SourceIndex:
    """The index of the source at ``path`` (a directory or a single file), built if needed.

    Reuses the persisted index when its fingerprint matches the source; otherwise (or with
    ``rebuild=True``) builds it, writes it atomically next to the source (or under
    ``index_dir`` when that location is not writable) and removes indexes of older
    fingerprints there. Unreadable files and bad rows are skipped and recorded, never fatal.

    ``roots`` are the node's data roots (:mod:`fabricd.sources.roots`): the source and each of its
    data files must resolve inside one of them, else nothing of it is read. ``None`` reads with
    the caller's own rights (offline tools such as ``fabricctl expect``); a daemon always passes
    its roots.

    Raises SourceError for a source outside ``roots``, a missing path, a source without data
    files, an unknown or mixed format, or when the index can be written nowhere.
    """
    root = Path(path).expanduser()
    if roots is not None:
        problem = outside_roots(root, roots)  # before anything is looked at, even its existence
        if problem:
            raise SourceError(f"source {name!r}: {problem}")
    if not root.exists():
        raise SourceError(f"source {name!r}: {root}: no such file or directory")
    root = root.resolve()
    if format is None:
        format = infer_format(root)
    elif format not in FORMATS:
        raise SourceError(f"source {name!r}: {root}: unknown format {format!r} (known: {sorted(FORMATS)})")
    files = list_data_files(root, format)
    if not files:
        raise SourceError(f"source {name!r}: {root}: no {format} data files")
    if roots is not None:
        check_in_roots(name, root, files, roots)
    fp = source_fingerprint(root, format)
    primary = index_path(root, fp)
    fallback = _fallback_path(index_dir, name, root, fp) if index_dir is not None else None
    locations = [primary] + ([fallback] if fallback is not None else [])
    if roots is not None and outside_roots(primary, roots):  # a symlinked .fabricd-index leading out
        log.warning("source %r: index location %s leads outside the data roots; not used", name, primary)
        locations = locations[1:]
        if not locations:
            raise SourceError(f"source {name!r}: index location {outside_roots(primary, roots)}; "
                              "remove that link or pass index_dir")

    if not rebuild:
        for loc in locations:
            found = _load(loc, name, root, format, fp)
            if found is not None:
                log.debug("source %r: reusing index %s", name, loc)
                return found
        reason = _why_rebuild(locations)
    else:
        reason = "rebuild requested"
    log.info("source %r: building index of %s (%s)", name, root, reason)
    index = _build(name, root, format, files, fp, progress)
    if source_fingerprint(root, format) != fp:
        raise SourceError(f"source {name!r}: {root}: source changed while it was being indexed; retry")

    errors = []
    for loc in locations:
        try:
            _write(index, loc)
        except OSError as e:
            errors.append(f"{loc}: {e}")
            continue
        _remove_stale(loc, loc)
        log.info("source %r: indexed %d samples (%d files skipped, %d rows skipped) -> %s",
                 name, index.num_samples, len(index.files_skipped), index.rows_skipped, loc)
        return index
    hint = "" if index_dir is not None else "; pass index_dir to write it elsewhere"
    raise SourceError(f"source {name!r}: cannot write index: {'; '.join(errors)}{hint}")
