#!/usr/bin/env python
"""Benchmark: indexing throughput with a Hugging Face tokenizer, against the library's own batch
encoding of the same texts, and the peak memory of indexing one very long document.

    python scripts/bench/index.py [--docs 400] [--mb 40] [--reps 3] [--big-chars 12000000]
                                  [--vocab 8192] [--tokenizer tokenizer.json] [--work DIR] [--quick]

1. Writes a Parquet source of ``--docs`` generated documents (prose in paragraphs, a fifth of
   them code; lognormal sizes, ``--mb`` MB of UTF-8 text in all, no ``<image>`` placeholders)
   and a single-file source holding one document of ``--big-chars`` characters.
2. Trains a byte-level BPE on the first 4 MB of those texts (``fabricd.text.train.train_bpe``),
   or uses ``--tokenizer``; with ``--work DIR`` the data and the tokenizer are kept and reused.
3. Times, ``--reps`` times each, interleaved (A B, B A, ...), and takes the medians of:

   * ``index``: ``open_index(name, path, rebuild=True, tokenizer=tok)``: read the Parquet
     files, count every text's tokens by the chunk rule of :mod:`fabricd.text`, write the index;
   * ``raw``: ``tokenizers.Tokenizer.encode_batch_fast(texts, add_special_tokens=False)`` over
     the same texts, already in memory as Python strings, in batches of at most 4 MiB of text
     (``RAW_BATCH_CHARS``; fabricd's own calls are at most ``fabricd.text.BATCH_CHARS``), plus
     ``len()`` of each encoding: the least a user of the library would do to get counts. Its own thread pool is on (``TOKENIZERS_PARALLELISM=true``)
     for both.

4. Checks the counts: per document, the index's ``text_tokens`` minus the specials it adds (EOS,
   and BOS if any) against the raw counts (``counts_agree``; documents longer than one chunk
   would differ where a chunk cut changed the tokenization; cuts go before a space between two
   words, which changes nothing for a byte-level BPE).
5. In a fresh subprocess that does nothing else, indexes the long document and reports its peak
   RSS (``VmHWM``; ``ru_maxrss`` off Linux), with the peak it had before indexing (imports,
   tokenizer loaded) for reference; in another, the peak RSS of the library encoding the same
   document in one call.

MB are 10^6 bytes (text: UTF-8 bytes). Human lines first; the last stdout line is one JSON object:
``{"hf_mb_per_s", "raw_mb_per_s", "ratio" (hf / raw), "peak_rss_mb_12m_doc", "counts_agree", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the library's thread pool on, as its docs recommend

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from fabricd.text import CHUNK_CHARS, TokenizerSpec, cpu_threads, load_tokenizer  # noqa: E402
from fabricd.text.train import train_bpe  # noqa: E402

MB = 1e6
TRAIN_CHARS = 4 << 20
#: characters per encode_batch_fast call of the raw baseline (a fixed setting of its own)
RAW_BATCH_CHARS = 4 << 20
SOURCE_NAME = "bench"
BIG_NAME = "bench-big"


# --------------------------------------------------------------------------- generated text


def vocabulary(rng: np.random.Generator, size: int = 20000) -> np.ndarray:
    """Pseudo-words from syllables, a few multi-byte ones among them, most frequent first."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr",
              "pl", "ch", "sh", "th", "br", "gr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    words = ["the", "of", "and", "a", "to", "in", "is", "that", "for", "it", "with", "as", "on", "was"]
    seen = set(words)
    while len(words) < size:
        w = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))]
                    + codas[rng.integers(len(codas))] for _ in range(int(rng.integers(1, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    for k, w in enumerate(["café", "naïve", "größe", "東京", "données", "mañana", "zürich", "αβγ", "москва"]):
        words[100 + 41 * k] = w
    return np.array(words, dtype=object)


def prose(rng: np.random.Generator, vocab: np.ndarray, n_chars: int) -> str:
    """About ``n_chars`` of sentences (6-22 words) in paragraphs."""
    n = max(4, n_chars // 6 + 8)
    words = vocab[np.minimum(rng.zipf(1.2, n) - 1, len(vocab) - 1)]
    seps = np.full(n, " ", dtype=object)
    ends = np.cumsum(rng.integers(6, 23, size=n // 6 + 1))
    ends = ends[ends < n]
    seps[ends - 1] = ". "
    seps[ends[rng.random(len(ends)) < 0.2] - 1] = ".\n\n"  # a paragraph: 5 sentences on average
    parts = np.empty(2 * n, dtype=object)
    parts[0::2] = words
    parts[1::2] = seps
    text = "".join(parts.tolist())[:n_chars]
    return text[:1].upper() + text[1:]


def code(rng: np.random.Generator, vocab: np.ndarray, n_chars: int) -> str:
    """About ``n_chars`` of code-looking lines."""
    lines: list[str] = []
    size = depth = 0
    common = vocab[:2000]
    while size < n_chars:
        a, b, c = common[rng.integers(0, len(common), 3)]
        r = rng.random()
        pad = "    " * depth
        if r < 0.15 or depth == 0:
            line = f"{pad}def {a}_{b}({c}, {b}={int(rng.integers(0, 100))}):"
            depth = min(depth + 1, 5)
        elif r < 0.3 and depth > 1:
            depth -= 1
            line = f"{pad}return {a}[{int(rng.integers(0, 64))}]"
        elif r < 0.45:
            line = f"{pad}# {a} {b} {c}"
        else:
            line = f'{pad}{a} = {b}.{c}({a}, "{b}")'
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:n_chars]


def make_texts(docs: int, total_mb: float, seed: int) -> list[str]:
    """``docs`` documents, lognormal sizes (sigma 1) adding up to about ``total_mb`` MB."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    sizes = rng.lognormal(0.0, 1.0, docs)
    sizes = np.maximum(200, sizes / sizes.sum() * total_mb * MB).astype(np.int64)
    return [(code if k % 5 == 4 else prose)(rng, vocab, int(s)) for k, s in enumerate(sizes)]


def write_source(path: Path, texts: list[str], files: int = 4) -> None:
    path.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(texts), files + 1).astype(int)
    for k in range(files):
        pq.write_table(pa.table({"text": pa.array(texts[bounds[k]:bounds[k + 1]], type=pa.string())}),
                       path / f"part-{k:05d}.parquet", row_group_size=64, compression="zstd")


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(source dir, big-document file, tokenizer.json), generated unless already in ``work``."""
    src, big = work / "source", work / "big" / "big.parquet"
    stamp = work / "params.json"
    params = {"docs": args.docs, "mb": args.mb, "big_chars": args.big_chars, "seed": args.seed, "vocab": args.vocab}
    fresh = not (stamp.is_file() and json.loads(stamp.read_text()) == params)
    if fresh:
        t0 = time.perf_counter()
        texts = make_texts(args.docs, args.mb, args.seed)
        write_source(src, texts)
        rng = np.random.default_rng(args.seed + 1)
        doc = prose(rng, vocabulary(rng), args.big_chars)
        big.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": pa.array([doc], type=pa.large_string())}), big, compression="zstd")
        del doc
        print(f"generated {len(texts)} documents ({sum(len(t.encode()) for t in texts) / MB:.1f} MB) "
              f"and one of {args.big_chars} characters in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.tokenizer is not None:
        tok_path = Path(args.tokenizer).resolve()
    else:
        tok_path = work / "tokenizer" / "tokenizer.json"
        if fresh or not tok_path.is_file():
            t0 = time.perf_counter()
            train_bpe(_first_chars(read_texts(src), TRAIN_CHARS), tok_path, vocab_size=args.vocab)
            print(f"trained a {args.vocab}-token byte-level BPE in {time.perf_counter() - t0:.1f} s", flush=True)
    if fresh:
        stamp.write_text(json.dumps(params))
    return src, big, tok_path


def _first_chars(texts: list[str], n: int) -> list[str]:
    out = []
    for t in texts:
        out.append(t[:n])
        n -= len(out[-1])
        if n <= 0:
            break
    return out


def read_texts(src: Path) -> list[str]:
    """The source's texts in sample-id order (files sorted by name, rows in order)."""
    return [t for f in sorted(src.glob("*.parquet")) for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]


# --------------------------------------------------------------------------- measurements


def raw_counts(hf_tok, texts: list[str]) -> np.ndarray:
    """Token count of each text from ``encode_batch_fast`` in batches of at most RAW_BATCH_CHARS."""
    counts = np.zeros(len(texts), np.int64)
    lo = 0
    while lo < len(texts):
        hi, size = lo, 0
        while hi < len(texts) and (hi == lo or size + len(texts[hi]) <= RAW_BATCH_CHARS):
            size += len(texts[hi])
            hi += 1
        enc = hf_tok.encode_batch_fast(texts[lo:hi], add_special_tokens=False)
        counts[lo:hi] = [len(e) for e in enc]
        lo = hi
    return counts


def open_index_with(tok, name: str, path: Path, *, rebuild: bool = True):
    from fabricd.sources.index import open_index

    return open_index(name, path, rebuild=rebuild, tokenizer=tok)


def _status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` memory line (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak RSS in bytes. ``VmHWM`` belongs to the process's own address space, so
    it starts afresh at exec; ``ru_maxrss`` (the fallback) may carry the parent's peak over a
    fork and exec, which is why it is not the first choice."""
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_rss(args: argparse.Namespace) -> int:
    """In this fresh process: peak RSS of indexing (``--child index``) or of the library encoding
    (``--child raw``) the long document; prints one JSON line."""
    if args.child == "index":
        tok = load_tokenizer(TokenizerSpec(kind="hf", path=Path(args.tokenizer), eos=args.eos, pad=args.pad,
                                           image=args.image))
    else:
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(args.tokenizer)
        hf.no_truncation()
        doc = pq.read_table(args.big).column("text")[0].as_py()
    before = peak_rss()
    t0 = time.perf_counter()
    if args.child == "index":
        idx = open_index_with(tok, BIG_NAME, Path(args.big))
        tokens = int(idx.text_tokens.sum()) - tok.specials * idx.num_samples
    else:
        tokens = len(hf.encode_batch_fast([doc], add_special_tokens=False)[0])
    dt = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps({"peak_rss_mb": round(peak / MB, 1), "rss_before_mb": round(before / MB, 1),
                      "seconds": round(dt, 3), "tokens": tokens}))
    return 0


PIECE_TOKENS = 32768


def piece_times(big: Path, spec: TokenizerSpec, args: argparse.Namespace) -> dict:
    """What a source loader pays for one ``PIECE_TOKENS`` piece of the long document (a split
    source), and for encoding the document whole, on one thread as a loader process does."""
    from fabricd.sources import SampleLoader, TransformSpec
    from fabricd.sources.transform import full_sequence

    tok = load_tokenizer(spec, parallel=False)
    idx = open_index_with(tok, BIG_NAME, big, rebuild=False)  # the child built it; reused
    loader = SampleLoader(idx, TransformSpec(max_seq_len=PIECE_TOKENS, long_samples="split"), tokenizer=tok)
    pieces = -(-int(idx.text_tokens[0]) // PIECE_TOKENS)
    times = []
    for p in np.random.default_rng(0).choice(pieces, size=min(5, pieces), replace=False):
        t0 = time.perf_counter()
        (unit,) = loader.load(np.array([0]), np.array([p]))
        times.append(time.perf_counter() - t0)
        assert len(unit.input_ids) == min(PIECE_TOKENS, int(idx.text_tokens[0]) - int(p) * PIECE_TOKENS)
    raw = loader.reader.read(np.array([0]))[0]
    t0 = time.perf_counter()
    full_sequence(raw, tok)
    whole = time.perf_counter() - t0
    loader.close()
    return {"piece_ms": round(1000 * statistics.median(times), 1), "pieces": len(times), "whole_s": round(whole, 3)}


def run_child(kind: str, big: Path, tok_path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--big", str(big), "--tokenizer",
           str(tok_path), "--eos", args.eos, "--pad", args.pad, "--image", args.image]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=400, help="documents in the source (default 400)")
    ap.add_argument("--mb", type=float, default=40.0, help="MB of text in the source (default 40)")
    ap.add_argument("--big-chars", type=int, default=12_000_000, help="characters of the long document")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each (default 3)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="an existing tokenizer.json instead of training one")
    ap.add_argument("--eos", default="</s>", help="special-token names in --tokenizer")
    ap.add_argument("--pad", default="<pad>")
    ap.add_argument("--image", default="<image>")
    ap.add_argument("--work", type=Path, default=None, help="keep (and reuse) data and tokenizer here")
    ap.add_argument("--quick", action="store_true", help="a small run for tests, seconds (sets the sizes and reps)")
    ap.add_argument("--child-timeout", type=float, default=600.0)
    ap.add_argument("--child", choices=("index", "raw"), help=argparse.SUPPRESS)
    ap.add_argument("--big", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_rss(args)
    if args.quick:
        args.docs, args.mb, args.big_chars, args.reps, args.vocab = 40, 2.0, 400_000, 1, 1024
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return bench(args.work.resolve(), args)
    with tempfile.TemporaryDirectory(prefix="fabricd-bench-index-") as d:
        return bench(Path(d), args)


def bench(work: Path, args: argparse.Namespace) -> int:
    src, big, tok_path = prepare(work, args)
    spec = TokenizerSpec(kind="hf", path=tok_path, eos=args.eos, pad=args.pad, image=args.image)
    tok = load_tokenizer(spec, parallel=True)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tok_path))
    hf.no_truncation()
    hf.no_padding()
    texts = read_texts(src)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    threads = os.environ.get("RAYON_NUM_THREADS") or str(cpu_threads())
    print(f"source: {len(texts)} documents, {nbytes / MB:.1f} MB, {sum(len(t) > CHUNK_CHARS for t in texts)} over "
          f"one chunk ({CHUNK_CHARS} chars); tokenizer {tok_path} ({tok.vocab_size} tokens); {threads} threads",
          flush=True)

    index_s: list[float] = []
    raw_s: list[float] = []
    idx = counts = None
    for rep in range(args.reps):
        for which in (("index", "raw") if rep % 2 == 0 else ("raw", "index")):
            t0 = time.perf_counter()
            if which == "index":
                idx = open_index_with(tok, SOURCE_NAME, src)
                index_s.append(time.perf_counter() - t0)
            else:
                counts = raw_counts(hf, texts)
                raw_s.append(time.perf_counter() - t0)
        print(f"rep {rep + 1}: index {index_s[-1]:.2f} s, raw {raw_s[-1]:.2f} s", flush=True)
    t_index, t_raw = statistics.median(index_s), statistics.median(raw_s)

    ours = np.asarray(idx.text_tokens, np.int64) - tok.specials
    agree = idx.num_samples == len(texts) and bool(np.array_equal(ours, counts))
    differing = int(np.count_nonzero(ours != counts)) if idx.num_samples == len(texts) else -1
    print(f"counts: index {int(ours.sum())} tokens, raw {int(counts.sum())}; "
          f"{'agree' if agree else f'{differing} documents differ'}", flush=True)

    rss = run_child("index", big, tok_path, args)
    raw_rss = run_child("raw", big, tok_path, args)
    print(f"{args.big_chars}-character document: indexing peak RSS {rss['peak_rss_mb']} MB "
          f"(before indexing {rss['rss_before_mb']} MB) in {rss['seconds']} s; the library encoding it whole: "
          f"{raw_rss['peak_rss_mb']} MB in {raw_rss['seconds']} s", flush=True)

    piece = piece_times(big, spec, args)
    print(f"a loader (one thread) makes a {PIECE_TOKENS}-token piece of it in {piece['piece_ms']} ms (median of "
          f"{piece['pieces']}); encoding the whole document, as it would without the chunk index, takes "
          f"{piece['whole_s']} s", flush=True)

    result = {
        "hf_mb_per_s": round(nbytes / MB / t_index, 2),
        "raw_mb_per_s": round(nbytes / MB / t_raw, 2),
        "ratio": round(t_raw / t_index, 3),
        "peak_rss_mb_12m_doc": rss["peak_rss_mb"],
        "rss_before_index_mb_12m_doc": rss["rss_before_mb"],
        "index_s_12m_doc": rss["seconds"],
        "raw_peak_rss_mb_12m_doc": raw_rss["peak_rss_mb"],
        "raw_s_12m_doc": raw_rss["seconds"],
        "big_doc_counts_agree": rss["tokens"] == raw_rss["tokens"],
        "piece_ms_12m_doc": piece["piece_ms"],
        "whole_doc_encode_s_12m_doc": piece["whole_s"],
        "counts_agree": agree,
        "docs_differing": differing,
        "index_tokens": int(ours.sum()),
        "raw_tokens": int(counts.sum()),
        "docs": len(texts),
        "text_mb": round(nbytes / MB, 2),
        "big_doc_chars": args.big_chars,
        "reps": args.reps,
        "index_s": [round(t, 3) for t in index_s],
        "raw_s": [round(t, 3) for t in raw_s],
        "vocab_size": tok.vocab_size,
        "threads": int(threads),
        "quick": bool(args.quick),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
