"""The per-source metadata index: one row of length features per sample.

A sample id is the sample's position in its source's index (``0 .. N-1``). The index holds
what the planner needs (token and image counts, encoded image bytes) and where the reader finds
the sample (file, row or byte offset); nothing else of the data. It is built once, in bounded
memory, persisted as a Parquet file next to the source and reused for as long as the source's
fingerprint (file names, sizes and mtimes) is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fabricd.errors import SourceError
from fabricd.sources.formats import BY_EXTENSION, REGISTRY, FileIndex, IndexContext, SourceFormat
from fabricd.sources.roots import check_in_roots, outside_roots
from fabricd.text import Tokenizer, load_tokenizer

__all__ = [
    "INDEX_VERSION",
    "FORMATS",
    "SourceIndex",
    "source_fingerprint",
    "list_data_files",
    "infer_format",
    "index_path",
    "open_index",
    "require_samples",
    "skip_reasons",
]

log = logging.getLogger(__name__)

#: Bump when the index layout or the meaning of a column changes; old indexes are rebuilt.
INDEX_VERSION = 3
#: Source formats and the file extensions that belong to them.
FORMATS: dict[str, tuple[str, ...]] = {name: f.extensions for name, f in REGISTRY.items()}

_INDEX_DIRNAME = ".fabricd-index"
_FILE_INDEX_MARK = ".fabricd-index"
_META_KEY = b"fabricd.index"


@dataclass(frozen=True, eq=False)
class SourceIndex:
    """The metadata of one source; row ``i`` describes sample id ``i``.

    ``files`` are relative to ``root`` for a directory source, or the file's own name for a
    single-file source (see :attr:`base_dir`). ``row`` and ``extent`` locate a sample in its
    file, as its format defines (the Parquet row, the byte offset of a JSONL line, ...).
    ``text_tokens`` counts the sample's tokens without its images, BOS/EOS included, under the
    job's tokenizer (``tokenizer`` is its identity; ``"tokens"`` for a pre-tokenized format).

    Per image (``image_*``, ``num_images.sum()`` rows, sample 0's images first; the images of
    sample ``i`` are ``image_start[i]:image_start[i + 1]``): encoded size, where it is (format
    defined), height and width read from the header (-1: unreadable), and the sample's layout:
    the text tokens before the image's block in the full sequence (-1: unknown) and its rank in
    sequence order (see :meth:`fabricd.sources.formats.base.IndexContext.count_layout`).

    Per text-only sample of several chunks (``num_chunks > 1``; 0 otherwise), the token count of
    each chunk (``chunk_tokens``, rows ``chunk_start[i]:chunk_start[i + 1]``): a loader encodes
    only the chunks a piece covers.
    """

    name: str
    root: Path
    format: str
    files: tuple[str, ...]
    fingerprint: str
    tokenizer: str
    file_idx: np.ndarray
    row: np.ndarray
    extent: np.ndarray
    text_tokens: np.ndarray
    num_images: np.ndarray
    image_len: np.ndarray
    image_loc: np.ndarray
    image_h: np.ndarray
    image_w: np.ndarray
    image_text_before: np.ndarray
    image_seq: np.ndarray
    num_chunks: np.ndarray
    chunk_tokens: np.ndarray
    files_skipped: tuple[tuple[str, str], ...]
    rows_skipped: int
    #: pre-tokenized formats: the largest token id of the source (-1: not known; the loader checks
    #: every sample's ids against the job's vocabulary anyway)
    max_token_id: int = -1

    @property
    def num_samples(self) -> int:
        """Number of samples (the sample ids are ``range(num_samples)``)."""
        return int(self.file_idx.shape[0])

    @property
    def base_dir(self) -> Path:
        """The directory ``files`` are relative to."""
        return self.root if self.root.is_dir() else self.root.parent

    @functools.cached_property
    def image_start(self) -> np.ndarray:
        """int64[N + 1]: the images of sample ``i`` are rows ``image_start[i]:image_start[i+1]``."""
        out = np.zeros(self.num_samples + 1, np.int64)
        np.cumsum(self.num_images, out=out[1:])
        return out

    @functools.cached_property
    def chunk_start(self) -> np.ndarray:
        """int64[N + 1]: the chunk counts of sample ``i`` are ``chunk_tokens[chunk_start[i]:chunk_start[i+1]]``."""
        out = np.zeros(self.num_samples + 1, np.int64)
        np.cumsum(self.num_chunks, out=out[1:])
        return out

    @functools.cached_property
    def image_bytes(self) -> np.ndarray:
        """int64[N]: encoded bytes of each sample's images."""
        if not self.image_len.size:
            return np.zeros(self.num_samples, np.int64)
        owner = np.repeat(np.arange(self.num_samples), self.num_images)
        return np.bincount(owner, weights=self.image_len, minlength=self.num_samples).astype(np.int64)

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
    if _FILE_INDEX_MARK in rel.name:
        return False
    if any(part.startswith((".", "_")) for part in rel.parts):
        return False  # hidden files, our index dir, Spark/Hadoop markers (_SUCCESS, _metadata)
    return rel.suffix.lower() in exts


def list_data_files(root: Path, format: str | None = None) -> list[str]:
    """Data files of a source, sorted by relative path (POSIX separators).

    A directory source holds every file with the format's extension below it, recursively,
    except hidden paths and paths starting with ``_``; ``format=None`` collects every extension
    ``format = "auto"`` knows. A single-file source is just that file's name.
    """
    exts = FORMATS[format] if format is not None else tuple(BY_EXTENSION)
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
    """The format of a source from its files' extensions (and, for Parquet, the first file's
    columns: ``input_ids`` without ``text`` is pre-tokenized). Raises SourceError on no data
    files or a mix."""
    found = set()
    files = list_data_files(root, None)
    for rel in files:
        fmt = BY_EXTENSION.get(Path(rel).suffix.lower())
        if fmt is not None:
            found.add(fmt)
    if not found:
        raise SourceError(f"{root}: no data files (expected one of {sorted(BY_EXTENSION)} by extension)")
    if len(found) > 1:
        raise SourceError(f"{root}: mixed formats {sorted(found)}; split them into separate sources")
    fmt = found.pop()
    if fmt == "parquet":
        base = root if root.is_dir() else root.parent
        try:
            names = pq.read_schema(base / files[0]).names
        except Exception:  # noqa: BLE001 - indexing records why the file is unreadable
            names = []
        if "input_ids" in names and "text" not in names:
            fmt = "parquet-tokens"
    return fmt


def _token_identity(fmt: SourceFormat, tokenizer: Tokenizer) -> str:
    return "tokens" if fmt.tokenized else tokenizer.identity


def source_fingerprint(root: Path, format: str, tokenizer: str | None = None) -> str:
    """A hex digest of the source's data files' (and their companions') relative path, size and
    mtime, the index version, the format and the tokenizer identity (``tokenizer``; None: the
    byte tokenizer's; ignored by pre-tokenized formats). Reads no data; changes whenever a file
    is added, removed or rewritten. (For JSONL, image files referenced by the lines are not part
    of it.)"""
    root = Path(root)
    fmt = REGISTRY[format]
    ident = _token_identity(fmt, load_tokenizer(None)) if tokenizer is None else tokenizer
    if fmt.tokenized:
        ident = "tokens"
    base = root if root.is_dir() else root.parent
    h = hashlib.sha256()
    h.update(f"fabricd-index v{INDEX_VERSION} {ident} {format}\n".encode())
    for rel in list_data_files(root, format):
        for name in [rel] + fmt.companions(rel):
            st = os.stat(base / name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- building


def _build(name: str, root: Path, fmt: SourceFormat, files: list[str], fingerprint: str, tokenizer: Tokenizer,
           progress: bool) -> SourceIndex:
    base = root if root.is_dir() else root.parent
    total = sum(fmt.data_size(base / rel) for rel in files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"indexing {name}", leave=False)
    on_bytes = bar.update if bar is not None else (lambda n: None)
    ctx = IndexContext(tokenizer, base.resolve(), on_bytes)
    parts: list[tuple[int, FileIndex]] = []
    skipped: list[tuple[str, str]] = []
    rows_skipped = 0
    try:
        for fi, rel in enumerate(files):
            path = base / rel
            try:
                got = fmt.index_file(path, ctx)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                reason = f"{type(e).__name__}: {e}"
                log.warning("source %r: skipping unreadable file %s: %s", name, path, reason)
                skipped.append((rel, reason))
                continue
            parts.append((fi, got))
            rows_skipped += int(got.skipped)
    finally:
        if bar is not None:
            bar.close()
    if rows_skipped:
        log.warning("source %r: skipped %d rows (null text or malformed line)", name, rows_skipped)
    arrays = _concat(parts)
    known = [p.max_token_id for _, p in parts]
    top = max(known) if known and min(known) >= 0 else -1  # one file not known: the source not known
    return SourceIndex(name=name, root=root, format=fmt.name, files=tuple(files), fingerprint=fingerprint,
                       tokenizer=_token_identity(fmt, tokenizer), files_skipped=tuple(skipped),
                       rows_skipped=rows_skipped, max_token_id=top, **arrays)


def _concat(parts: list[tuple[int, FileIndex]]) -> dict[str, np.ndarray]:
    def cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    text_tokens = cat([p.text_tokens for _, p in parts], np.int64)
    per_sample = [c for _, p in parts for c in (p.chunk_tokens if p.chunk_tokens is not None
                                                 else [np.zeros(0, np.int64)] * p.row.shape[0])]
    if text_tokens.size and int(text_tokens.max()) >= 2**31:
        raise SourceError(f"a sample of {int(text_tokens.max())} tokens does not fit the index (int32)")
    return {
        "file_idx": cat([np.full(p.row.shape[0], fi, np.int32) for fi, p in parts], np.int32),
        "row": cat([p.row for _, p in parts], np.int64),
        "extent": cat([p.extent for _, p in parts], np.int64),
        "text_tokens": text_tokens.astype(np.int32),
        "num_images": cat([p.num_images for _, p in parts], np.int32),
        "image_len": cat([p.image_len for _, p in parts], np.int64),
        "image_loc": cat([p.image_loc for _, p in parts], np.int64),
        "image_h": cat([p.image_h for _, p in parts], np.int32),
        "image_w": cat([p.image_w for _, p in parts], np.int32),
        "image_text_before": cat([p.image_text_before for _, p in parts], np.int64),
        "image_seq": cat([p.image_seq for _, p in parts], np.int32),
        "num_chunks": np.fromiter((len(c) for c in per_sample), np.int32, count=len(per_sample)),
        "chunk_tokens": cat(per_sample, np.int32),
    }


# --------------------------------------------------------------------------- persistence

_SAMPLE_COLUMNS = ("file_idx", "row", "extent", "text_tokens", "num_images", "num_chunks")
_IMAGE_COLUMNS = ("image_len", "image_loc", "image_h", "image_w", "image_text_before", "image_seq")


def _tag(tokenizer: str) -> str:
    """A short name for a tokenizer identity in index file names ("" for the byte tokenizer's
    and pre-tokenized formats', which keeps their files where version 1 put them)."""
    if tokenizer == "tokens" or tokenizer.startswith("bytes-"):
        return ""
    return "-" + hashlib.sha256(tokenizer.encode()).hexdigest()[:10]


def index_path(root: Path, fingerprint: str, tokenizer: str = "") -> Path:
    """Where the index of ``root`` with this fingerprint lives next to the source. Indexes of
    one source under different tokenizers live side by side."""
    if root.is_dir():
        return root / _INDEX_DIRNAME / f"index-{fingerprint[:16]}.parquet"
    return root.with_name(f"{root.name}{_FILE_INDEX_MARK}{_tag(tokenizer)}.parquet")


def _fallback_path(index_dir: Path, name: str, root: Path, fingerprint: str) -> Path:
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "source"
    return Path(index_dir) / f"{safe}-{tag}" / f"index-{fingerprint[:16]}.parquet"


def _write(index: SourceIndex, path: Path) -> None:
    meta = {
        "version": INDEX_VERSION,
        "tokenizer": index.tokenizer,
        "fingerprint": index.fingerprint,
        "format": index.format,
        "files": list(index.files),
        "files_skipped": [list(x) for x in index.files_skipped],
        "rows_skipped": index.rows_skipped,
        "max_token_id": index.max_token_id,
    }
    offsets = pa.array(index.image_start, type=pa.int64())
    columns = {c: getattr(index, c) for c in _SAMPLE_COLUMNS}
    for c in _IMAGE_COLUMNS:  # one list per sample: the per-image rows of that sample
        columns[c] = pa.LargeListArray.from_arrays(offsets, pa.array(getattr(index, c)))
    columns["chunk_tokens"] = pa.LargeListArray.from_arrays(pa.array(index.chunk_start, type=pa.int64()),
                                                            pa.array(index.chunk_tokens))
    table = pa.table(columns)
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
        arrays = {c: table.column(c).to_numpy() for c in _SAMPLE_COLUMNS}
        for c in _IMAGE_COLUMNS + ("chunk_tokens",):
            arrays[c] = table.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    except Exception as e:  # noqa: BLE001 - a broken index is rebuilt
        log.info("source %r: index %s unreadable (%s); rebuilding", name, path, e)
        return None
    types = {"file_idx": np.int32, "row": np.int64, "extent": np.int64, "text_tokens": np.int32,
             "num_images": np.int32, "image_len": np.int64, "image_loc": np.int64, "image_h": np.int32,
             "image_w": np.int32, "image_text_before": np.int64, "image_seq": np.int32,
             "num_chunks": np.int32, "chunk_tokens": np.int32}
    return SourceIndex(
        name=name, root=root, format=format, files=tuple(meta["files"]), fingerprint=fingerprint,
        tokenizer=str(meta["tokenizer"]), **{c: arrays[c].astype(t, copy=False) for c, t in types.items()},
        files_skipped=tuple((str(a), str(b)) for a, b in meta["files_skipped"]),
        rows_skipped=int(meta["rows_skipped"]), max_token_id=int(meta.get("max_token_id", -1)),
    )


def _candidates(path: Path, tokenizer: str | None = None) -> list[Path]:
    """Existing index files that share ``path``'s location (older fingerprints included); with
    ``tokenizer``, only those built with it (or unreadable): other tokenizers' indexes of the same
    source are other jobs' and stay."""
    if path.name.startswith("index-"):
        if not path.parent.is_dir():
            return []
        found = sorted(p for p in path.parent.glob("index-*.parquet") if p.is_file())
    else:
        found = [path] if path.is_file() else []
    if tokenizer is None:
        return found
    out = []
    for p in found:
        try:
            meta = _read_meta(p)
            if meta.get("version") == INDEX_VERSION and meta.get("tokenizer") != tokenizer:
                continue  # another tokenizer's, current: another job's index
        except Exception:  # noqa: BLE001 - unreadable: ours to replace
            pass
        out.append(p)  # ours, an older version's, or unreadable
    return out


def _why_rebuild(paths: list[Path], tokenizer: str) -> str:
    for loc in paths:
        for old in _candidates(loc, tokenizer):
            try:
                meta = _read_meta(old)
            except Exception:  # noqa: BLE001
                return f"index {old} unreadable"
            if meta.get("version") != INDEX_VERSION:
                return f"index version {meta.get('version')} != {INDEX_VERSION}"
            return "source changed since it was indexed"
    return "no index"


def _remove_stale(path: Path, keep: Path, tokenizer: str) -> None:
    for old in _candidates(path, tokenizer):
        if old != keep:
            try:
                old.unlink()
                log.info("removed stale index %s", old)
            except OSError as e:
                log.warning("could not remove stale index %s: %s", old, e)


def open_index(name: str, path: str | Path, *, format: str | None = None, index_dir: Path | None = None,
               progress: bool = False, rebuild: bool = False, roots: Sequence[Path] | None = None,
               tokenizer: Tokenizer | None = None) -> SourceIndex:
    """The index of the source at ``path`` (a directory or a single file), built if needed.

    Reuses the persisted index when its fingerprint matches the source; otherwise (or with
    ``rebuild=True``) builds it, writes it atomically next to the source (or under
    ``index_dir`` when that location is not writable) and removes indexes of older
    fingerprints there built with the same tokenizer. Unreadable files and bad rows are skipped
    and recorded, never fatal.

    ``tokenizer``: the job's (:func:`fabricd.text.load_tokenizer`); None is the byte tokenizer.
    Token counts, and so the index and its fingerprint, depend on it, except for pre-tokenized
    formats.

    ``roots`` are the node's data roots (:mod:`fabricd.sources.roots`): the source and each of its
    data files must resolve inside one of them, else nothing of it is read. ``None`` reads with
    the caller's own rights (offline tools such as ``fabricctl expect``); a daemon always passes
    its roots.

    Raises SourceError for a source outside ``roots``, a missing path, a source without data
    files, an unknown or mixed format, or when the index can be written nowhere.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
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
    fmt = REGISTRY[format]
    files = list_data_files(root, format)
    if not files:
        raise SourceError(f"source {name!r}: {root}: no {format} data files")
    if roots is not None:
        check_in_roots(name, root, files + [c for f in files for c in fmt.companions(f)], roots)
    ident = _token_identity(fmt, tokenizer)
    fp = source_fingerprint(root, format, ident)
    primary = index_path(root, fp, ident)
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
        reason = _why_rebuild(locations, ident)
    else:
        reason = "rebuild requested"
    log.info("source %r: building index of %s (%s)", name, root, reason)
    index = _build(name, root, fmt, files, fp, tokenizer, progress)
    if source_fingerprint(root, format, ident) != fp:
        raise SourceError(f"source {name!r}: {root}: source changed while it was being indexed; retry")

    errors = []
    for loc in locations:
        try:
            _write(index, loc)
        except OSError as e:
            errors.append(f"{loc}: {e}")
            continue
        _remove_stale(loc, loc, ident)
        log.info("source %r: indexed %d samples (%d files skipped, %d rows skipped) -> %s",
                 name, index.num_samples, len(index.files_skipped), index.rows_skipped, loc)
        return index
    hint = "" if index_dir is not None else "; pass index_dir to write it elsewhere"
    raise SourceError(f"source {name!r}: cannot write index: {'; '.join(errors)}{hint}")
