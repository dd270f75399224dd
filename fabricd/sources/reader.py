"""Random access to one source's raw samples by sample id.

The reader turns sample ids into :class:`RawSample` through the source's format
(:mod:`fabricd.sources.formats`): it checks ids and the source's fingerprint, groups a request by
data file, and leaves the bytes to the format's reader (which caches, bounded in bytes, where
the format benefits). It never raises for a bad sample or a bad file: such a sample comes back
as a :class:`~fabricd.errors.SampleError` in its slot.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from fabricd.errors import SampleError, SourceError
from fabricd.sources.formats import REGISTRY, RawSample, ReadRequest
from fabricd.sources.index import SourceIndex, source_fingerprint
from fabricd.sources.roots import outside_roots

__all__ = ["RawSample", "SourceReader"]

log = logging.getLogger(__name__)


class SourceReader:
    """Random access to one source's samples by sample id.

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
            current = source_fingerprint(index.root, index.format, index.tokenizer)
        except OSError as e:
            raise SourceError(f"source {index.name!r}: {index.root}: cannot stat source: {e}") from e
        if current != index.fingerprint:
            raise SourceError(
                f"source {index.name!r}: {index.root}: source changed since it was indexed "
                f"(fingerprint {index.fingerprint[:16]} -> {current[:16]}); re-index explicitly"
            )
        self.index = index
        self.roots = tuple(roots) if roots is not None else None
        self._paths = [index.base_dir / f for f in index.files]
        self.cache_bytes = int(cache_bytes)
        self._image_locations = REGISTRY[index.format].image_locations
        self._format = REGISTRY[index.format].reader(self._paths, self._open_path, cache_bytes=self.cache_bytes,
                                                     source_dir=index.base_dir.resolve())

    # ------------------------------------------------------------------ public

    @property
    def cache_nbytes(self) -> int:
        """Bytes held in the format's cache now (never above ``cache_bytes``)."""
        return self._format.cache_nbytes

    @property
    def cache_hits(self) -> int:
        return self._format.cache_hits

    @property
    def cache_misses(self) -> int:
        return self._format.cache_misses

    def read(self, sample_ids: np.ndarray) -> list[RawSample | SampleError]:
        """The samples ``sample_ids``, in the same order; a sample that cannot be read (bad id,
        unreadable file, malformed row, missing image file) is a SampleError in its slot."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        out: list[RawSample | SampleError | None] = [None] * ids.shape[0]
        idx = self.index
        n = idx.num_samples
        valid = (ids >= 0) & (ids < n)
        for pos in np.flatnonzero(~valid):
            out[pos] = self._error(int(ids[pos]), f"sample id out of range [0, {n})")
        positions = np.flatnonzero(valid)
        if positions.size:
            fis = idx.file_idx[ids[positions]]
            for fi in np.unique(fis):
                in_file = positions[fis == fi]
                sids = ids[in_file]
                images = []
                if self._image_locations:  # only a format that reads images by offset needs them
                    st = idx.image_start
                    images = [list(zip(idx.image_loc[st[s]:st[s + 1]].tolist(), idx.image_len[st[s]:st[s + 1]].tolist()))
                              for s in sids]
                request = ReadRequest(rows=idx.row[sids], extents=idx.extent[sids], images=images)
                try:
                    got = self._format.read(int(fi), request)
                except Exception as e:  # noqa: BLE001 - a format bug must not take the loader down
                    log.exception("source %r: reading %s failed", idx.name, self._paths[int(fi)])
                    got = [f"{self._paths[int(fi)]}: {type(e).__name__}: {e}"] * len(in_file)
                for pos, sample in zip(in_file, got):
                    out[pos] = sample if isinstance(sample, RawSample) else self._error(int(ids[pos]), str(sample))
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Close open files and drop the cache. The reader must not be used afterwards."""
        self._format.close()

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _error(self, sample_id: int, reason: str) -> SampleError:
        return SampleError(self.index.name, sample_id, reason)

    def _open_path(self, fi: int) -> Path:
        path = self._paths[fi]
        if self.roots is not None:  # re-checked at open: a file swapped for a symlink since indexing
            problem = outside_roots(path, self.roots)
            if problem:
                raise PermissionError(problem)
        return path
