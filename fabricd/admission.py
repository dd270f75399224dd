"""What the leader checks when a job is submitted, before it is recorded (``JobAccepted``).

Parsing a spec (:mod:`fabricd.config`) checks the spec alone. Admission checks what needs the
cluster or the filesystem, cheaply enough to run in the daemon's request loop:

* the roles the job needs fit the cluster: at most ``MAX_ROLES_PER_DAEMON`` per daemon, or one
  per core on a daemon that reported more cores
  (:func:`fabricd.spec_bounds.roles_needed`);
* every source path resolves inside the node's ``data_roots`` (:mod:`fabricd.sources.roots`),
  before anything else about it is looked at; the refusal names the path and the roots;
* every source path exists, holds data files of its format, and the first few of them *are* of
  that format (Parquet: ``PAR1`` at both ends; JSONL: the first non-blank line is a JSON
  object). The work is bounded per job: ``SUBMIT_SCAN_ENTRIES`` directory entries walked and
  ``SUBMIT_CHECKED_FILES`` files opened in all, shared by the sources (each gets at least
  ``_MIN_ENTRIES_PER_SOURCE`` entries and one file). The rest is checked when the source is
  indexed, and a file that fails then is reported with its reason in the job's status and error.
  A data file looked at here that is a symlink leading out of the roots is refused, unopened;
* the tokenizer's file (``[tokenizer] path`` or ``model``) resolves inside the data roots and
  exists. Whether it parses and has the special tokens the spec names is found when indexing
  loads it; a failure then fails the job with that reason.

Each failure is a :class:`~fabricd.errors.ConfigError` naming the spec file, the key and the
value (the source path), which the daemon answers as ``INVALID_SPEC``.

:func:`is_retry` decides whether an identical resubmission of a job should run it again (it
failed) or just report on it (it is indexing or serving).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import JobSpec, NodeConfig
from .errors import ConfigError
from .sources.formats import BY_EXTENSION, REGISTRY
from .sources.roots import outside_roots
from .spec_bounds import MAX_ROLES_PER_DAEMON, role_slots, roles_needed

__all__ = ["SUBMIT_SCAN_ENTRIES", "SUBMIT_CHECKED_FILES", "check_submission", "check_roles", "check_sources",
           "check_data_file", "check_tokenizer", "is_retry"]

#: Directory entries walked at submit per job, at most (the daemon loop must stay responsive).
SUBMIT_SCAN_ENTRIES = 20_000
#: Data files whose format is checked at submit per job, at most (and at most 16 per source).
SUBMIT_CHECKED_FILES = 64
_MAX_FILES_PER_SOURCE = 16
_MIN_ENTRIES_PER_SOURCE = 200


def check_submission(spec: JobSpec, cfg: NodeConfig, cores: Mapping[str, int] | None = None) -> None:
    """Everything admission checks (see the module docstring). Raises ConfigError. ``cores``: the
    logical CPUs each daemon reported (node id → count; see :func:`check_roles`)."""
    check_roles(spec, cfg, cores)
    check_sources(spec, roots=cfg.data_roots)
    check_tokenizer(spec, roots=cfg.data_roots)


def check_tokenizer(spec: JobSpec, roots: Sequence[Path] | None = None) -> None:
    """Refuse a tokenizer file outside ``roots`` or missing. (Loading it, which finds a file
    that does not parse or lacks a special token the spec names, takes too long for the request
    loop: indexing does it, and a failure fails the job with that reason.)"""
    tok = spec.tokenizer
    if tok.kind == "bytes" or tok.path is None:
        return
    key = "tokenizer.path" if tok.kind == "hf" else "tokenizer.model"
    problem = outside_roots(tok.path, roots) if roots is not None else None
    if problem is None and not tok.path.is_file():
        problem = "no such file"
    if problem:
        raise ConfigError(spec.file, key, str(tok.path), f"tokenizer: {problem}")


def check_roles(spec: JobSpec, cfg: NodeConfig, cores: Mapping[str, int] | None = None) -> None:
    """Refuse a job needing more role processes than the cluster's daemons have slots: each
    ``MAX_ROLES_PER_DAEMON``, or one per core where its heartbeat reported more cores
    (:func:`~fabricd.spec_bounds.role_slots`; ``cores``: node id → logical CPUs, 0 or absent when
    not reported)."""
    daemons = len(cfg.cluster.peers)
    topo = spec.topology
    workers = [s.workers or cfg.loader_workers for s in spec.sources]
    need = roles_needed(dp_size=topo.dp_size, ranks_per_constructor=topo.ranks_per_constructor,
                        loader_workers=workers, standby=daemons > 1)
    cores = cores or {}
    allowed = sum(role_slots(cores.get(p.node_id, 0)) for p in cfg.cluster.peers)
    if need > allowed:
        raise ConfigError(spec.file, "topology.dp_size", topo.dp_size,
                          f"the job needs {need} role processes ({need - sum(workers)} data constructors for "
                          f"ranks_per_constructor = {topo.ranks_per_constructor}, {sum(workers)} source-loader "
                          f"workers) but {daemons} daemon(s) run at most MAX_ROLES_PER_DAEMON "
                          f"({MAX_ROLES_PER_DAEMON}) each, or one per core where they have more ({allowed} "
                          f"in all); raise ranks_per_constructor or add daemons")


def check_sources(spec: JobSpec, roots: Sequence[Path] | None = None) -> None:
    """Refuse a source outside ``roots`` (the node's data roots; None: not confined), or whose
    path is missing, has no data files, or whose files are not its format."""
    n = len(spec.sources)
    entries = max(_MIN_ENTRIES_PER_SOURCE, SUBMIT_SCAN_ENTRIES // n)
    files = max(1, min(_MAX_FILES_PER_SOURCE, SUBMIT_CHECKED_FILES // n))
    for i, s in enumerate(spec.sources):
        key = f"sources[{i}].path"
        if "\0" in str(s.path):
            raise ConfigError(spec.file, key, str(s.path), f"source {s.name!r}: a path cannot contain a NUL character")
        problem = outside_roots(s.path, roots) if roots is not None else None
        if problem is None:
            problem = _source_problem(s.path, s.format, entries=entries, files=files, roots=roots)
        if problem:
            raise ConfigError(spec.file, key, str(s.path), f"source {s.name!r}: {problem}")


def _source_problem(root: Path, format: str | None, *, entries: int, files: int,
                    roots: Sequence[Path] | None) -> str | None:
    if not root.exists():
        return "no such file or directory"
    exts = dict(BY_EXTENSION)
    if root.is_file():
        fmt = format or exts.get(root.suffix.lower())
        if fmt is None:
            return f"cannot tell the format of {root.name} (expected one of {sorted(exts)}, or set format)"
        return check_data_file(root, fmt)
    wanted = exts if format is None else {e: format for e in REGISTRY[format].extensions}
    found_files, complete = _some_data_files(root, wanted, max_entries=entries, max_files=files)
    if not found_files:
        return (f"no {format + ' data files' if format else 'data files of a known format (' + ', '.join(sorted(exts)) + ')'} "
                "in this directory"
                if complete else None)  # a huge directory: indexing decides
    found = {fmt for _, fmt in found_files}
    if format is None and len(found) > 1:
        return f"mixed formats {sorted(found)}; split them into separate sources"
    for path, fmt in found_files:
        problem = outside_roots(path, roots) if roots is not None and os.path.islink(path) else None
        if problem:
            return f"data file {problem}"
        problem = check_data_file(path, fmt)
        if problem:
            return problem
    return None


def _some_data_files(root: Path, exts: dict[str, str], *, max_entries: int,
                     max_files: int) -> tuple[list[tuple[Path, str]], bool]:
    """Up to ``max_files`` (path, format) below ``root`` (hidden and ``_`` paths skipped, as
    indexing does), walking at most ``max_entries`` entries, and whether the walk saw it all."""
    out: list[tuple[Path, str]] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for fn in sorted(filenames):
            seen += 1
            if seen > max_entries:
                return out, False
            fmt = exts.get(Path(fn).suffix.lower())
            if fmt is not None and not fn.startswith((".", "_")) and ".fabricd-index" not in fn:
                out.append((Path(dirpath, fn), fmt))
                if len(out) >= max_files:
                    return out, False
        seen += len(dirnames)
    return out, True


def check_data_file(path: Path, format: str) -> str | None:
    """Why ``path`` is not a ``format`` file, judged from a few bytes, or None if it looks right."""
    return REGISTRY[format].sniff(path)


def is_retry(runtime_state: str | None) -> bool:
    """Whether resubmitting an identical, still-recorded job should run it again: only when the
    job failed on this daemon (indexing or planning); an indexing or ready job is left alone."""
    return runtime_state == "failed"
