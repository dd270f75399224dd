"""JSONL sources (``jsonl``): one JSON object per line, ``{"text": "...", "images": ["a.png"]}``.

``images`` is optional and holds paths relative to the JSONL file. Other keys are ignored,
blank lines are ignored, and a malformed line (bad JSON, no string ``text``, ``images`` not a
list of strings, text that is not valid Unicode) is skipped and counted at indexing. An image
path must resolve (symlinks followed) inside the source's directory; one that does not fails its
sample when it is read, online and in ``fabricctl expect`` alike. A sample's row is the byte
offset of its line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

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
from fabricd.sources.roots import escapes_dir, resolved

__all__ = ["Jsonl", "parse_jsonl_line"]

_BATCH_CHARS = 8 << 20   # text counted per tokenizer call while indexing
_PROBE_BYTES = 1 << 20


def parse_jsonl_line(line: bytes) -> tuple[str, list[str]] | None:
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


def _iter_lines(f) -> Iterator[tuple[int, bytes]]:
    offset = 0
    for line in f:
        yield offset, line
        offset += len(line)


class _Reader(FormatReader):
    def _open_file(self, path: Path):
        return open(path, "rb")

    def read(self, file_idx: int, request: ReadRequest) -> list[RawSample | str]:
        path = self.paths[file_idx]
        out: list[RawSample | str] = []
        for offset in request.rows:
            try:
                f = self._file(file_idx)
                f.seek(int(offset))
                line = f.readline()
            except OSError as e:
                out.append(f"{path}: cannot read: {e}")
                continue
            parsed = parse_jsonl_line(line)
            if parsed is None:
                out.append(f"{path} at byte {int(offset)}: malformed line")
                continue
            text, paths = parsed
            images = []
            problem = None
            for p in paths:
                img_path = path.parent / p
                target = resolved(img_path)
                if not target.is_relative_to(self.source_dir):  # absolute elsewhere, "..", a symlink out
                    problem = f"image {p!r} resolves to {target}, outside the source directory {self.source_dir}"
                    break
                try:
                    images.append(target.read_bytes())  # the checked path, not the link again
                except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
                    problem = f"image {img_path}: {getattr(e, 'strerror', None) or e}"
                    break
            out.append(problem if problem else RawSample(text=text, images=tuple(images)))
        return out



class Jsonl(SourceFormat):
    name = "jsonl"
    extensions = (".jsonl",)

    def sniff(self, path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                probe = f.read(_PROBE_BYTES)
        except OSError as e:
            return f"{path}: cannot read: {e.strerror or e}"
        for line in probe.splitlines(keepends=True):
            if not line.strip():
                continue
            if not line.endswith(b"\n") and len(probe) == _PROBE_BYTES:
                return None  # a first line longer than the probe: indexing decides
            try:
                obj = json.loads(line)
            except ValueError as e:
                return f"{path}: not a JSONL file (its first line is not JSON: {e})"
            if not isinstance(obj, dict):
                return f"{path}: not a JSONL file of objects (its first line is a {type(obj).__name__})"
            return None
        return None

    def index_file(self, path: Path, ctx: IndexContext) -> FileIndex:
        rows: list[int] = []
        nimgs: list[int] = []
        ilen: list[int] = []
        ih: list[int] = []
        iw: list[int] = []
        tokens: list[np.ndarray] = []
        before: list[np.ndarray] = []
        seq: list[np.ndarray] = []
        chunks: list[np.ndarray] = []
        texts: list[str] = []
        pending_imgs: list[int] = []
        chars = 0
        malformed = 0
        base = path.parent
        pending = 0

        def flush() -> None:
            nonlocal chars
            if texts:
                lay = ctx.count_layout(texts, pending_imgs)
                tokens.append(lay.counts)
                before.append(lay.before)
                seq.append(lay.seq)
                chunks.extend(lay.chunks)
                texts.clear()
                pending_imgs.clear()
                chars = 0

        with open(path, "rb") as f:
            for offset, line in _iter_lines(f):
                pending += len(line)
                if pending >= (4 << 20):
                    ctx.on_bytes(pending)
                    pending = 0
                if not line.strip():
                    continue
                parsed = parse_jsonl_line(line)
                if parsed is None:
                    malformed += 1
                    continue
                text, images = parsed
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
                    malformed += 1
                    continue
                for p in images:
                    size, h, w = 0, -1, -1
                    if escapes_dir(base / p, ctx.source_dir) is None:  # never look outside the source
                        try:
                            size = os.stat(base / p).st_size
                            h, w = image_header_dims(path=base / p)
                        except (OSError, ValueError):  # ValueError: a NUL byte in the path
                            pass  # the reader fails this sample later; it is skipped then
                    ilen.append(size)
                    ih.append(h)
                    iw.append(w)
                rows.append(offset)
                nimgs.append(len(images))
                texts.append(text)
                pending_imgs.append(len(images))
                chars += len(text)
                if chars >= _BATCH_CHARS:
                    flush()
        flush()
        ctx.on_bytes(pending)
        return FileIndex(row=np.asarray(rows, np.int64),
                         text_tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
                         num_images=np.asarray(nimgs, np.int32), skipped=malformed,
                         image_len=np.asarray(ilen, np.int64), image_h=np.asarray(ih, np.int32),
                         image_w=np.asarray(iw, np.int32),
                         image_text_before=np.concatenate(before) if before else np.zeros(0, np.int64),
                         image_seq=np.concatenate(seq) if seq else np.zeros(0, np.int32), chunk_tokens=chunks)

    def reader(self, paths, open_path, *, cache_bytes, source_dir) -> FormatReader:
        return _Reader(paths, open_path, cache_bytes=cache_bytes, source_dir=source_dir)
