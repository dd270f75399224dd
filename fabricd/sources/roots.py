"""Where a daemon may read data from: the node's data roots and each source's own directory.

Two rules confine what a submitted job can make a daemon read:

* **Data roots.** A node config lists the directories datasets may be read from
  (``[node] data_roots``, default :data:`DEFAULT_DATA_ROOTS`). A source path, and every data file
  of a source, must *resolve* (symlinks followed, ``..`` removed) to a path inside one of them.
  A source outside them is refused at submit (:mod:`fabricd.admission`) and again wherever the
  source is opened on a node (:func:`fabricd.sources.index.open_index` with ``roots``), so a spec
  that got past submit still reads nothing outside them. A data file that is a symlink leading
  out of the roots fails its whole source, naming the file, its target and the roots.
* **A source's directory.** A JSONL image path is relative to its JSONL file; it must resolve
  inside the source's directory (the source itself for a directory source, the file's directory
  for a single-file source). An absolute path elsewhere, a ``..`` climbing out, or a symlink
  leading out is a per-sample error (:class:`~fabricd.errors.SampleError`), skipped and counted
  like any unreadable sample. This rule does not depend on the node's roots, so the same sample
  fails the same way online and offline (``fabricctl expect``).

Paths are compared after :meth:`pathlib.Path.resolve` on both sides, so a root that is itself a
symlink (``/data -> /mnt/data``) covers what lies below its target.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fabricd.errors import SourceError

__all__ = ["DEFAULT_DATA_ROOTS", "MAX_DATA_ROOTS", "resolved", "resolve_roots", "outside_roots", "roots_text",
           "escapes_dir", "check_in_roots"]

#: Where datasets are read from when a node config names no ``data_roots``.
DEFAULT_DATA_ROOTS: tuple[Path, ...] = (Path("/var/lib/fabricd/data"),)
#: Most entries of ``[node] data_roots``.
MAX_DATA_ROOTS = 256


def resolved(path: Path | str) -> Path:
    """``path`` made absolute with symlinks and ``..`` resolved (as far as it exists)."""
    try:
        return Path(path).resolve(strict=False)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: keep the lexical form
        return Path(os.path.abspath(path))


def resolve_roots(roots: Sequence[Path | str]) -> tuple[Path, ...]:
    """The roots, each resolved (symlinks followed), in their order."""
    return tuple(resolved(Path(r)) for r in roots)


def roots_text(roots: Sequence[Path | str]) -> str:
    """How an error names the roots: ``[/a, /b]``."""
    return "[" + ", ".join(str(r) for r in roots) + "]"


def outside_roots(path: Path | str, roots: Sequence[Path | str]) -> str | None:
    """Why ``path`` may not be read under ``roots`` (it resolves outside every one of them), or
    None when it resolves inside one. The reason names the path, where it leads and the roots."""
    target = resolved(Path(path))
    if any(target.is_relative_to(r) for r in resolve_roots(roots)):
        return None
    via = f" (it resolves to {target})" if str(target) != str(Path(path)) else ""
    return (f"{path}{via} is outside the node's data_roots {roots_text(roots)}; "
            f"add a directory holding it to [node] data_roots in the node config")


def escapes_dir(path: Path | str, base: Path) -> Path | None:
    """Where ``path`` leads when it resolves outside the directory ``base`` (already resolved),
    or None when it stays inside."""
    target = resolved(Path(path))
    return None if target.is_relative_to(base) else target


def check_in_roots(name: str, root: Path, files: list[str], roots: Sequence[Path]) -> None:
    """Raise SourceError when the source ``root`` or one of its data ``files`` (relative to its
    directory) resolves outside ``roots``; the error names the path, where it leads and the roots.

    The directory walk never descends a symlinked directory, so below a resolved ``root`` only a
    data file that is itself a symlink can lead elsewhere: those are the files resolved here."""
    problem = outside_roots(root, roots)
    if problem:
        raise SourceError(f"source {name!r}: {problem}")
    base = root if root.is_dir() else root.parent
    for rel in files:
        path = base / rel
        if os.path.islink(path):
            problem = outside_roots(path, roots)
            if problem:
                raise SourceError(f"source {name!r}: data file {problem}")
