#!/usr/bin/env python
"""Generate a realistic, heavy-tailed multimodal corpus of five fabricd sources.

    python scripts/make_dataset.py --out DIR [--samples N] [--seed S] [--corrupt-fraction F]
                                   [--image-format jpeg|png] [--workers W] [--overwrite]
                                   [--no-tokenizers]

Writes DIR/<source>/ for each source:

* ``captions``    Parquet: one image + a 10-60 word caption ("<image> a photo of ..." or no
                  placeholder at all, which puts the image first).
* ``interleaved`` Parquet: documents of 200-3000 bytes with 1-6 images and ``<image>``
                  placeholders between paragraphs (some documents have fewer placeholders
                  than images).
* ``longdocs``    Parquet: text only, Pareto-distributed lengths from ~500 to 32k bytes.
* ``code``        Parquet: code-looking text, lognormal lengths 100-8000 bytes.
* ``ocr``         JSONL + PNG "scanned pages" on disk (paths relative to the JSONL file), with
                  500-4000 bytes of dense text.

Images are real encoded JPEG/PNG bytes (96-512 px per side) with gradients, shapes, noise and
text-like strokes. ``--corrupt-fraction F`` replaces a deterministic F fraction of each source's
images with truncated or garbage bytes and adds a few malformed JSONL lines. The output is a
pure function of the arguments (byte for byte, for a given pyarrow/Pillow version), whatever
the number of workers. Importable: ``make_dataset(out, samples_per_source, seed, ...)``.

Then, unless ``--no-tokenizers``, two small tokenizers are trained on the first few MB of the
corpus text (:mod:`fabricd.text.train`; placeholders removed) so jobs over it can choose one:

* ``tokenizer/tokenizer.json``  byte-level BPE (``[tokenizer] kind = "hf"``), 4096 tokens.
* ``tokenizer/spm.model``       SentencePiece BPE with byte fallback (``kind = "sentencepiece"``),
                                2048 tokens.

Both hold ``<pad>``, ``<s>``, ``</s>`` and ``<image>``; :func:`job_toml` writes the
``[tokenizer]`` table that selects one.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

__all__ = ["SOURCES", "TOKENIZER_DIR", "make_dataset", "train_tokenizers", "tokenizer_paths", "job_toml", "main"]

SOURCES = ("captions", "interleaved", "longdocs", "code", "ocr")
_SAMPLES_PER_FILE = 500
_PLACEHOLDER = "<image>"
#: Where the corpus's tokenizers are written, under the corpus directory.
TOKENIZER_DIR = "tokenizer"
#: Characters of text the tokenizers are trained on, taken evenly from the sources' first files.
TOKENIZER_SAMPLE_CHARS = 4 << 20
_BPE_VOCAB = 4096
_SPM_VOCAB = 2048


# --------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=4)
def _vocabulary(seed: int, size: int = 6000) -> tuple[str, ...]:
    """Pseudo-words from random syllables (plus a few multi-byte UTF-8 words)."""
    rng = np.random.default_rng([seed, 7777])
    onsets = np.array(["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
                       "st", "tr", "pl", "ch", "sh", "th", "br", "gr"], dtype=object)
    vowels = np.array(["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"], dtype=object)
    codas = np.array(["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"], dtype=object)
    out = ["the", "of", "and", "a", "to", "in", "is", "that", "for", "it", "with", "as", "on", "was"]
    seen = set(out)
    while len(out) < size:
        n = 4 * size
        syl = onsets[rng.integers(0, len(onsets), (n, 3))] + vowels[rng.integers(0, len(vowels), (n, 3))] \
            + codas[rng.integers(0, len(codas), (n, 3))]
        n_syl = rng.integers(1, 4, n)
        for k in range(n):
            w = "".join(syl[k, : n_syl[k]])
            if w not in seen:
                seen.add(w)
                out.append(w)
                if len(out) == size:
                    break
    for k, w in enumerate(["café", "naïve", "größe", "東京", "données", "mañana", "zürich", "αβγ"]):
        out[200 + 37 * k] = w
    return tuple(out)


def _cap(text: str, nbytes: int) -> str:
    """``text`` cut to at most ``nbytes`` UTF-8 bytes (at a character boundary)."""
    data = text.encode("utf-8")
    return text if len(data) <= nbytes else data[:nbytes].decode("utf-8", "ignore")


@dataclass
class _Text:
    vocab: np.ndarray

    def words(self, rng: np.random.Generator, n: int) -> str:
        idx = np.minimum(rng.zipf(1.25, n) - 1, len(self.vocab) - 1)
        return " ".join(self.vocab[idx].tolist())

    def prose(self, rng: np.random.Generator, nbytes: int) -> str:
        """About ``nbytes`` of sentences."""
        n = max(3, nbytes // 6)
        words = self.vocab[np.minimum(rng.zipf(1.25, n) - 1, len(self.vocab) - 1)].tolist()
        ends = np.cumsum(rng.integers(6, 22, size=n // 6 + 2))
        for e in ends[ends < n]:
            words[e - 1] = words[e - 1] + "."
        text = " ".join(words)
        text = text[:nbytes].rstrip()
        return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")

    def paragraphs(self, rng: np.random.Generator, nbytes: int, k: int) -> list[str]:
        cuts = np.sort(rng.integers(1, max(2, nbytes), size=max(0, k - 1)))
        sizes = np.diff(np.concatenate([[0], cuts, [nbytes]]))
        return [self.prose(rng, max(20, int(s))) for s in sizes]

    def code(self, rng: np.random.Generator, nbytes: int) -> str:
        ident = lambda: "_".join(self.vocab[np.minimum(rng.zipf(1.4, int(rng.integers(1, 3))) - 1, 999)].tolist())  # noqa: E731
        lines: list[str] = []
        depth = 0
        size = 0
        while size < nbytes:
            r = rng.random()
            pad = "    " * depth
            if r < 0.12 or depth == 0:
                line = f"{pad}def {ident()}({ident()}, {ident()}={int(rng.integers(0, 100))}) {{"
                depth = min(depth + 1, 6)
            elif r < 0.22:
                line = f"{pad}if ({ident()} > {int(rng.integers(0, 1000))} && {ident()}) {{"
                depth = min(depth + 1, 6)
            elif r < 0.30:
                line = f"{pad}for (int i = 0; i < {ident()}.size(); i++) {{"
                depth = min(depth + 1, 6)
            elif r < 0.50 and depth > 0:
                depth -= 1
                line = "    " * depth + "}"
            elif r < 0.60:
                line = f"{pad}// {self.words(rng, int(rng.integers(3, 10)))}"
            elif r < 0.70:
                line = f"{pad}return {ident()}[{int(rng.integers(0, 64))}];"
            else:
                line = f"{pad}{ident()} = {ident()}.{ident()}({ident()}, \"{ident()}\");"
            lines.append(line)
            size += len(line) + 1
        lines.extend("    " * d + "}" for d in range(depth - 1, -1, -1))
        return "\n".join(lines)[: max(nbytes, 1)]


# --------------------------------------------------------------------------- images


def _size(rng: np.random.Generator) -> tuple[int, int]:
    w, h = np.clip(np.exp(rng.normal(np.log(220), 0.45, size=2)), 96, 512).astype(int)
    return int(w), int(h)


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A 'photo': colour gradient, pixel noise, random shapes and a few strokes."""
    corners = rng.integers(0, 231, size=(2, 2, 3)).astype(np.uint8)
    img = Image.fromarray(corners, mode="RGB").resize((w, h), Image.BILINEAR)
    noise = rng.integers(0, 24, size=(h, w, 1), dtype=np.uint8)
    img = Image.fromarray(np.asarray(img) + noise)
    draw = ImageDraw.Draw(img)
    n_shapes = int(rng.integers(3, 12))
    xs = np.sort(rng.integers(0, w, (n_shapes, 2)), axis=1)
    ys = np.sort(rng.integers(0, h, (n_shapes, 2)), axis=1)
    fills = rng.integers(0, 256, (n_shapes, 3))
    kinds = rng.random(n_shapes)
    for k in range(n_shapes):
        box = [int(xs[k, 0]), int(ys[k, 0]), int(xs[k, 1]) + 1, int(ys[k, 1]) + 1]
        fill = tuple(int(v) for v in fills[k])
        (draw.ellipse if kinds[k] < 0.5 else draw.rectangle)(box, fill=fill)
    for _ in range(int(rng.integers(2, 8))):
        pts = [(int(a), int(b)) for a, b in zip(rng.integers(0, w, 4), rng.integers(0, h, 4))]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 5)))
    return img


def _page(rng: np.random.Generator) -> Image.Image:
    """A grayscale 'scanned page': off-white paper, noise, rows of word-like ink strokes."""
    w = int(rng.integers(256, 513))
    h = int(min(512 * 1.3, w * rng.uniform(1.2, 1.45)))
    blotches = rng.integers(0, 14, size=(max(1, h // 6), max(1, w // 6)), dtype=np.uint8)
    img = Image.fromarray(232 + blotches, mode="L").resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    margin = int(w * 0.08)
    line_h = int(rng.integers(9, 15))
    for top in range(margin, h - margin - line_h, line_h + int(rng.integers(3, 7))):
        x = margin
        right = w - margin - (int(rng.integers(0, w // 3)) if rng.random() < 0.15 else 0)
        while x < right:
            ww = int(rng.integers(6, 40))
            ink = int(rng.integers(10, 80))
            draw.rectangle([x, top + 2, min(x + ww, right), top + line_h - 2], fill=ink)
            x += ww + int(rng.integers(4, 9))
    return img


def _encode(img: Image.Image, fmt: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 95)))
    else:
        img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _corrupt(data: bytes, rng: np.random.Generator) -> bytes:
    """Truncated, or a valid header followed by garbage, or pure garbage."""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return data[: max(16, int(len(data) * rng.uniform(0.2, 0.6)))]
    garbage = rng.integers(0, 256, size=max(64, len(data) // 2), dtype=np.uint8).tobytes()
    return (data[:32] + garbage) if kind == 1 else garbage


# --------------------------------------------------------------------------- work units


@dataclass
class _Unit:
    source: str
    src_id: int
    file_idx: int
    start: int
    count: int
    num_images: np.ndarray          # per sample of this file
    corrupt: np.ndarray             # local image indices (within this file) to corrupt
    malformed: int                  # JSONL only
    out: Path
    seed: int
    image_format: str
    rows_per_group: int
    result: dict = field(default_factory=dict)


def _plan(out: Path, n: int, seed: int, corrupt_fraction: float, image_format: str,
          rows_per_group: int) -> list[_Unit]:
    units = []
    n_files = max(2, math.ceil(n / _SAMPLES_PER_FILE)) if n >= 2 else 1
    bounds = np.linspace(0, n, n_files + 1).astype(int)
    for src_id, name in enumerate(SOURCES):
        rng = np.random.default_rng([seed, src_id, 0])
        if name in ("captions", "ocr"):
            nimg = np.ones(n, np.int64)
        elif name == "interleaved":
            nimg = np.minimum(1 + rng.geometric(0.4, n) - 1, 6).astype(np.int64)
            nimg = np.maximum(nimg, 1)
        else:
            nimg = np.zeros(n, np.int64)
        total = int(nimg.sum())
        k = int(round(corrupt_fraction * total))
        if corrupt_fraction > 0 and total > 0:
            k = max(1, k)
        bad = np.sort(rng.choice(total, size=min(k, total), replace=False)) if k else np.zeros(0, np.int64)
        img_start = np.concatenate([[0], np.cumsum(nimg)])
        n_malformed = max(1, int(round(corrupt_fraction * n))) if (name == "ocr" and corrupt_fraction > 0) else 0
        mal = np.bincount(rng.integers(0, n_files, n_malformed), minlength=n_files) if n_malformed else np.zeros(n_files, int)
        for fi in range(n_files):
            a, b = int(bounds[fi]), int(bounds[fi + 1])
            lo, hi = img_start[a], img_start[b]
            local = bad[(bad >= lo) & (bad < hi)] - lo
            units.append(_Unit(name, src_id, fi, a, b - a, nimg[a:b], local, int(mal[fi]), out, seed,
                               image_format, rows_per_group))
    return units


def _write_parquet(path: Path, texts: list[str], images: list[list[bytes]] | None, rows_per_group: int) -> None:
    cols = {"text": pa.array(texts, type=pa.string())}
    if images is not None:
        cols["images"] = pa.array(images, type=pa.list_(pa.binary()))
    table = pa.table(cols)
    compression = {"text": "zstd", "images": "none"} if images is not None else "zstd"
    pq.write_table(table, path, row_group_size=rows_per_group, compression=compression,
                   use_dictionary=["text"] if images is None else False)


def _run_unit(u: _Unit) -> dict:
    rng = np.random.default_rng([u.seed, u.src_id, 1, u.file_idx])
    text = _Text(np.array(_vocabulary(u.seed), dtype=object))
    src_dir = u.out / u.source
    src_dir.mkdir(parents=True, exist_ok=True)
    bad = set(int(i) for i in u.corrupt)
    img_counter = 0
    fmt = u.image_format

    def image(make) -> bytes:
        nonlocal img_counter
        data = _encode(make(), fmt if u.source != "ocr" else "png", rng)
        if img_counter in bad:
            data = _corrupt(data, rng)
        img_counter += 1
        return data

    texts: list[str] = []
    images: list[list[bytes]] = []
    if u.source == "captions":
        for _ in range(u.count):
            w, h = _size(rng)
            img = image(lambda: _photo(rng, w, h))
            cap = "a photo of " + text.words(rng, int(rng.integers(7, 58)))
            texts.append(f"{_PLACEHOLDER} {cap}" if rng.random() < 0.7 else cap)
            images.append([img])
        _write_parquet(src_dir / f"part-{u.file_idx:05d}.parquet", texts, images, u.rows_per_group)
    elif u.source == "interleaved":
        for k in range(u.count):
            n_img = int(u.num_images[k])
            nbytes = int(np.clip(np.exp(rng.normal(np.log(900), 0.6)), 200, 3000))
            paras = text.paragraphs(rng, nbytes, n_img + 1)
            holders = n_img - (1 if (n_img > 1 and rng.random() < 0.1) else 0)
            body = paras[0]
            for j, p in enumerate(paras[1:]):
                body += ("\n\n" + _PLACEHOLDER + "\n\n" if j < holders else "\n\n") + p
            imgs = []
            for _ in range(n_img):
                w, h = _size(rng)
                imgs.append(image(lambda: _photo(rng, w, h)))
            texts.append(body)
            images.append(imgs)
        _write_parquet(src_dir / f"part-{u.file_idx:05d}.parquet", texts, images, u.rows_per_group)
    elif u.source == "longdocs":
        for _ in range(u.count):
            nbytes = int(min(500 * (1 + rng.pareto(1.3)), 32767))
            texts.append(_cap("\n\n".join(text.paragraphs(rng, nbytes, max(1, nbytes // 1500))), 32767))
        _write_parquet(src_dir / f"part-{u.file_idx:05d}.parquet", texts, None, u.rows_per_group)
    elif u.source == "code":
        for _ in range(u.count):
            nbytes = int(np.clip(np.exp(rng.normal(np.log(900), 0.9)), 100, 8000))
            texts.append(_cap(text.code(rng, nbytes), 8000))
        _write_parquet(src_dir / f"part-{u.file_idx:05d}.parquet", texts, None, u.rows_per_group)
    elif u.source == "ocr":
        img_dir = src_dir / "pages" / f"part-{u.file_idx:05d}"
        img_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for k in range(u.count):
            rel = f"pages/part-{u.file_idx:05d}/{u.start + k:07d}.png"
            (src_dir / rel).write_bytes(image(lambda: _page(rng)))
            body = _cap(text.prose(rng, int(rng.integers(500, 4001))), 4000)
            lines.append(json.dumps({"text": body, "images": [rel], "page": u.start + k}, ensure_ascii=False))
        bad_lines = ['{"text": "unterminated', "[1, 2, 3]", '{"images": []}', '{"text": 42}']
        for j in range(u.malformed):
            lines.insert(int(rng.integers(0, len(lines) + 1)), bad_lines[j % len(bad_lines)])
        with open(src_dir / f"part-{u.file_idx:05d}.jsonl", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return {"samples": u.count, "images": int(np.sum(u.num_images)), "corrupt_images": len(bad),
            "malformed_lines": u.malformed}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source_texts(out: Path, name: str) -> Iterator[str]:
    """The texts of one written source, in file and row order (JSONL lines that fail to parse
    or lack a string text are passed over)."""
    src = out / name
    if name == "ocr":
        for f in sorted(src.glob("part-*.jsonl")):
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                        yield rec["text"]
        return
    for f in sorted(src.glob("part-*.parquet")):
        pf = pq.ParquetFile(f)
        try:
            for batch in pf.iter_batches(batch_size=256, columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
        finally:
            pf.close()


def _tokenizer_sample(out: Path, max_chars: int) -> list[str]:
    """The first texts of each source, ``max_chars / len(SOURCES)`` characters per source at most,
    ``<image>`` placeholders removed."""
    per_source = max(1, max_chars // len(SOURCES))
    texts = []
    for name in SOURCES:
        left = per_source
        for t in _source_texts(out, name):
            t = t.replace(_PLACEHOLDER, "")
            texts.append(t[:left])
            left -= len(texts[-1])
            if left <= 0:
                break
    return texts


def tokenizer_paths(corpus: Path) -> dict[str, Path]:
    """``{kind: file}`` of the tokenizers :func:`train_tokenizers` writes under ``corpus``:
    ``"hf"`` (``tokenizer.json``) and ``"sentencepiece"`` (``spm.model``)."""
    from fabricd.text.train import BPE_FILE, SPM_FILE

    d = Path(corpus).absolute() / TOKENIZER_DIR
    return {"hf": d / BPE_FILE, "sentencepiece": d / SPM_FILE}


def train_tokenizers(corpus: Path, *, sample_chars: int = TOKENIZER_SAMPLE_CHARS) -> dict[str, Path]:
    """Train the corpus's tokenizers (see the module docstring) from the sources written under
    ``corpus`` and return :func:`tokenizer_paths`. A pure function of the corpus files."""
    from fabricd.text.train import train_bpe, train_sentencepiece

    paths = tokenizer_paths(corpus)
    texts = _tokenizer_sample(Path(corpus), sample_chars)
    train_bpe(texts, paths["hf"], vocab_size=_BPE_VOCAB)
    train_sentencepiece(texts, paths["sentencepiece"], vocab_size=_SPM_VOCAB)
    return paths


def make_dataset(out: Path, samples_per_source: int, seed: int, corrupt_fraction: float = 0.0,
                 progress: bool = True, *, image_format: str = "jpeg", workers: int | None = 1,
                 rows_per_group: int = 128, overwrite: bool = False,
                 tokenizers: bool = True) -> dict[str, dict[str, int]]:
    """Write the five sources under ``out`` (and, with ``tokenizers``, train the corpus's two
    tokenizers into ``out/tokenizer/``: :func:`train_tokenizers`) and return per-source counts.

    Returns ``{source: {"samples", "files", "images", "corrupt_images", "malformed_lines",
    "bytes"}}``; the tokenizer files are at :func:`tokenizer_paths`. Deterministic for a seed,
    whatever ``workers`` is (``None``: one per CPU). Refuses to write into an existing non-empty
    source (or, with ``tokenizers``, tokenizer) directory unless ``overwrite``, which deletes
    those directories first.
    """
    out = Path(out)
    if samples_per_source < 1:
        raise ValueError(f"samples_per_source must be >= 1, got {samples_per_source}")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"corrupt_fraction must be in [0, 1], got {corrupt_fraction}")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    for name in SOURCES + ((TOKENIZER_DIR,) if tokenizers else ()):
        d = out / name
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{d} exists and is not empty (use overwrite)")
            shutil.rmtree(d)
    units = _plan(out, samples_per_source, seed, corrupt_fraction, image_format, rows_per_group)
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units) * 1, desc="files", unit="file", file=sys.stderr)
    results: list[dict] = []
    try:
        if workers == 1:
            for u in units:
                results.append(_run_unit(u))
                if bar is not None:
                    bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for r in pool.map(_run_unit, units):
                    results.append(r)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    summary: dict[str, dict[str, int]] = {}
    for u, r in zip(units, results):
        s = summary.setdefault(u.source, {"samples": 0, "files": 0, "images": 0, "corrupt_images": 0,
                                          "malformed_lines": 0, "bytes": 0})
        s["files"] += 1
        for k, v in r.items():
            s[k] += v
    for name in SOURCES:
        summary[name]["bytes"] = _dir_size(out / name)
    if tokenizers:
        train_tokenizers(out)
    return summary


def _tokenizer_table(corpus: Path, tokenizer: str) -> str:
    if tokenizer == "bytes":
        return ""
    if tokenizer not in ("hf", "sentencepiece"):
        raise ValueError(f"tokenizer must be 'bytes', 'hf' or 'sentencepiece', got {tokenizer!r}")
    key = "path" if tokenizer == "hf" else "model"
    return (f'[tokenizer]\nkind = "{tokenizer}"\n{key} = {json.dumps(str(tokenizer_paths(corpus)[tokenizer]))}\n'
            'eos = "</s>"\npad = "<pad>"\nimage = "<image>"\n')


def job_toml(corpus: Path, *, name: str, seed: int, dp_size: int, samples_per_step: int, prefetch: int,
             workers: int | None = None, extra: str = "", tokenizer: str = "bytes") -> str:
    """A job spec (TOML text) over a corpus from :func:`make_dataset`: all five sources, a constant
    mixture, long documents split into a long-context bucket. ``extra`` is appended (more tables).
    ``tokenizer``: ``"bytes"`` (no ``[tokenizer]`` table: the default), or ``"hf"`` /
    ``"sentencepiece"`` for the corpus's trained tokenizer of that kind (:func:`tokenizer_paths`),
    with its special tokens named."""
    sources = "".join(f'[[sources]]\nname = "{s}"\npath = "{Path(corpus).absolute() / s}"\n'
                      + (f"workers = {workers}\n" if workers else "")
                      + ('bucket = "long"\n' if s == "longdocs" else "") + "\n" for s in SOURCES)
    return f"""[job]
name = "{name}"
seed = {seed}
[topology]
dp_size = {dp_size}
ranks_per_constructor = 1
[batch]
samples_per_step = {samples_per_step}
micro_batch_tokens = 8192
prefetch = {prefetch}
[tokens]
image_tokens = 16
image_size = 32
[cost]
per_image = 1024.0
{_tokenizer_table(corpus, tokenizer)}[[buckets]]
name = "short"
max_seq_len = 2048
[[buckets]]
name = "long"
max_seq_len = 8192
long_samples = "split"
{sources}
[mixture]
kind = "constant"
[[mixture.points]]
step = 0
weights = {{ captions = 0.3, interleaved = 0.2, longdocs = 0.1, code = 0.2, ocr = 0.2 }}
{extra}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--samples", type=int, default=1500, help="samples per source (default 1500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt-fraction", type=float, default=0.0,
                   help="fraction of images replaced by corrupt bytes (default 0)")
    p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace existing source directories")
    p.add_argument("--no-tokenizers", dest="tokenizers", action="store_false",
                   help=f"do not train the corpus tokenizers into OUT/{TOKENIZER_DIR}/")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        summary = make_dataset(args.out, args.samples, args.seed, args.corrupt_fraction, progress=True,
                               image_format=args.image_format, workers=args.workers, overwrite=args.overwrite,
                               tokenizers=args.tokenizers)
    except (ValueError, FileExistsError) as e:
        print(f"make_dataset: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    total = 0
    for name, s in summary.items():
        total += s["bytes"]
        print(f"{name:12s} {s['samples']:6d} samples {s['files']:3d} files {s['images']:6d} images "
              f"{s['corrupt_images']:4d} corrupt {s['malformed_lines']:3d} malformed "
              f"{s['bytes'] / 2**20:8.1f} MiB")
    if args.tokenizers:
        for kind, path in tokenizer_paths(args.out).items():
            print(f"tokenizer    {kind:13s} {path}")
    print(f"wrote {args.out} ({total / 2**20:.1f} MiB) in {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
