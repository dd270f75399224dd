"""Durable storage of the lease's current term and this node's vote in it.

A voter must never vote twice in one term, even across a crash, and a node must never go back
to an older term: both facts live in a :class:`TermStore` and are saved *before* any message
that depends on them leaves the node. :class:`FileTermStore` is the daemon's store (one small
JSON file, replaced atomically); :class:`MemoryTermStore` is for tests.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from fabricd.errors import FabricdError

__all__ = [
    "TermStore",
    "TermStoreError",
    "FileTermStore",
    "MemoryTermStore",
]

#: Version of the JSON layout written by :class:`FileTermStore`.
TERM_FILE_VERSION = 1
KEY_VERSION = "version"
KEY_TERM = "term"
KEY_VOTED_FOR = "voted_for"


class TermStoreError(FabricdError):
    """The term store cannot be read or written. Names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"term store {self.path}: {reason}")


class TermStore(Protocol):
    """Where a node keeps (current term, the candidate it voted for in that term)."""

    def load(self) -> tuple[int, str | None]:
        """The saved (term, voted_for); (0, None) for a node that never saved anything."""
        ...

    def save(self, term: int, voted_for: str | None) -> None:
        """Persist (term, voted_for). The write is durable before this returns."""
        ...


def _check_values(term: Any, voted_for: Any) -> str | None:
    """Why (term, voted_for) is not a valid record, or None if it is."""
    if isinstance(term, bool) or not isinstance(term, int) or term < 0:
        return f"{KEY_TERM} = {term!r}: must be an integer >= 0"
    if voted_for is not None and (not isinstance(voted_for, str) or not voted_for):
        return f"{KEY_VOTED_FOR} = {voted_for!r}: must be a non-empty string or null"
    return None


class MemoryTermStore:
    """An in-memory :class:`TermStore` for tests: remembers every save, in order."""

    def __init__(self, term: int = 0, voted_for: str | None = None) -> None:
        problem = _check_values(term, voted_for)
        if problem:
            raise ValueError(f"MemoryTermStore: {problem}")
        self._term = term
        self._voted_for = voted_for
        self.saves: list[tuple[int, str | None]] = []

    @property
    def save_count(self) -> int:
        """How many times :meth:`save` was called."""
        return len(self.saves)

    def load(self) -> tuple[int, str | None]:
        return self._term, self._voted_for

    def save(self, term: int, voted_for: str | None) -> None:
        problem = _check_values(term, voted_for)
        if problem:
            raise ValueError(f"MemoryTermStore: {problem}")
        self._term = term
        self._voted_for = voted_for
        self.saves.append((term, voted_for))


class FileTermStore:
    """A :class:`TermStore` in one JSON file.

    ``save`` writes a temporary file next to the target, fsyncs it, renames it over the target
    (``os.replace``, atomic on POSIX) and fsyncs the directory, so after a crash the file holds
    either the old or the new record, never a mix. A missing file reads as (0, None); a file that
    exists but cannot be parsed raises :class:`TermStoreError` naming it — never a silent term 0,
    which would let this node vote twice in a term it already voted in.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> tuple[int, str | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0, None
        except OSError as e:
            raise TermStoreError(self.path, f"cannot read: {e}") from e
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise TermStoreError(self.path, f"corrupt (not JSON): {e}; refusing to start from term 0") from e
        if not isinstance(data, dict):
            raise TermStoreError(self.path, f"corrupt: expected a JSON object, got {type(data).__name__}")
        if data.get(KEY_VERSION) != TERM_FILE_VERSION:
            raise TermStoreError(
                self.path, f"{KEY_VERSION} = {data.get(KEY_VERSION)!r}: expected {TERM_FILE_VERSION}")
        missing = [k for k in (KEY_TERM, KEY_VOTED_FOR) if k not in data]
        if missing:
            raise TermStoreError(self.path, f"corrupt: missing key(s) {', '.join(missing)}")
        problem = _check_values(data[KEY_TERM], data[KEY_VOTED_FOR])
        if problem:
            raise TermStoreError(self.path, f"corrupt: {problem}")
        return data[KEY_TERM], data[KEY_VOTED_FOR]

    def save(self, term: int, voted_for: str | None) -> None:
        problem = _check_values(term, voted_for)
        if problem:
            raise ValueError(f"FileTermStore.save: {problem}")
        payload = json.dumps({KEY_VERSION: TERM_FILE_VERSION, KEY_TERM: term, KEY_VOTED_FOR: voted_for},
                             sort_keys=True).encode("utf-8")
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise TermStoreError(self.path, f"cannot create a temporary file: {e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(e, OSError):
                raise TermStoreError(self.path, f"cannot save term {term}: {e}") from e
            raise
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise TermStoreError(self.path, f"cannot fsync directory {directory}: {e}") from e
