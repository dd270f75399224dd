"""Tokenizers a job can choose (``[tokenizer]`` in the job spec), and the one encoding rule.

Kinds
=====

* ``bytes`` (the default): one token per UTF-8 byte (:mod:`fabricd.tokenizer`), no file.
* ``hf``: a Hugging Face ``tokenizers`` ``tokenizer.json`` at ``path`` (read from disk, never
  downloaded).
* ``sentencepiece``: a SentencePiece ``.model`` file at ``model``.

Special tokens (BOS, EOS, PAD, the image token) are looked up in the tokenizer *by name*
(``bos``, ``eos``, ``pad``, ``image`` in ``[tokenizer]``); a name the vocabulary lacks is refused
when the job is submitted, with the tokenizer's special tokens listed. ``bos = ""`` (the default)
adds no BOS.

The encoding rule
=================

Index and loader must agree on every sample's length exactly, so a text is encoded by one rule,
implemented once (:meth:`Tokenizer.encode_texts`, :meth:`Tokenizer.count_texts`):

1. The text is cut into *chunks* of at most :data:`CHUNK_CHARS` characters by :func:`chunk_bounds`:
   a cut goes before the last single space between two words in the chunk's second half (where
   byte-level BPE and SentencePiece start a new piece anyway, so the ids are those of the whole
   text), else after its last newline, else at the limit. A document of millions of characters
   is therefore encoded piece by piece, in bounded memory, and the cut points depend on the text
   alone.
2. Every chunk is encoded on its own, without special tokens; the text's ids are the chunks' ids
   concatenated.

A sample's full sequence is then ``[BOS] + ...parts and image blocks... + [EOS]`` (see
:mod:`fabricd.sources.transform`), each text part encoded by this rule.
"""

from __future__ import annotations

import hashlib
import re
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fabricd import tokenizer as byte_tok
from fabricd.errors import FabricdError

__all__ = [
    "CHUNK_CHARS",
    "TOKENIZER_KINDS",
    "TokenizerSpec",
    "Tokenizer",
    "TokenizerError",
    "chunk_bounds",
    "load_tokenizer",
    "file_digest",
]

#: Longest piece of text encoded in one call (characters). Part of every tokenizer's identity.
CHUNK_CHARS = 65536
#: Most characters handed to the tokenizer in one batch call: bounds the memory of its output.
BATCH_CHARS = 1 << 20
TOKENIZER_KINDS = ("bytes", "hf", "sentencepiece")
_RULE = f"chunks{CHUNK_CHARS}-v2"
#: a single space between two non-space characters: cutting before it splits no pre-token of a
#: byte-level BPE (a word takes the space before it) nor a SentencePiece piece
_WORD_GAP = re.compile(r"(?<=\S) (?=\S)")


class TokenizerError(FabricdError):
    """A tokenizer that cannot be used: missing file, unreadable, or a special token it lacks."""


@dataclass(frozen=True)
class TokenizerSpec:
    """``[tokenizer]`` of a job spec. ``path`` is the hf ``tokenizer.json`` or the sentencepiece
    model (absolute, resolved against the spec file); None for ``bytes``."""

    kind: str = "bytes"
    path: Path | None = None
    bos: str = ""
    eos: str = "</s>"
    pad: str = "<pad>"
    image: str = "<image>"


def chunk_bounds(text: str, limit: int | None = None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the chunks ``text`` is encoded in (see the module docstring);
    ``limit``: :data:`CHUNK_CHARS` unless given."""
    limit = CHUNK_CHARS if limit is None else limit
    n = len(text)
    if n <= limit:
        return [(0, n)]
    out = []
    pos = 0
    while n - pos > limit:
        end = pos + limit
        half = pos + limit // 2
        cut = -1
        for m in _WORD_GAP.finditer(text, half, end + 1):  # endpos: the lookahead sees text[end]
            cut = m.start()               # the space begins the next chunk
        if cut <= pos:
            cut = text.rfind("\n", half, end)
            cut = cut + 1 if cut >= 0 else end  # after a newline, else at the limit
        out.append((pos, cut))
        pos = cut
    out.append((pos, n))
    return out


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A job's tokenizer: special-token ids, identity, and batch encoding by the one rule.

    Subclasses implement :meth:`_encode_chunks` (and may override :meth:`_count_chunks`).
    ``identity`` changes whenever token counts could: the kind, the file's sha256, the chunk
    rule and whether a BOS is added. Index fingerprints include it.
    """

    kind = "?"

    def __init__(self, *, identity: str, vocab_size: int, bos_id: int | None, eos_id: int, pad_id: int,
                 image_id: int) -> None:
        self.identity = f"{identity}|{_RULE}|bos={bos_id is not None}"
        self.vocab_size = int(vocab_size)
        self.bos_id = bos_id
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.image_id = int(image_id)
        #: tokens added around every sample's text: BOS (if any) and EOS
        self.specials = 1 + (bos_id is not None)

    # -- what subclasses provide
    def _encode_chunks(self, chunks: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def encode_chunks(self, chunks: list[str]) -> list[np.ndarray]:
        """int32 ids of each chunk (pieces of one text cut by :func:`chunk_bounds`), one batch call."""
        return [np.asarray(c, np.int32) for c in self._encode_chunks(chunks)] if chunks else []

    def _count_chunks(self, chunks: list[str]) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self._encode_chunks(chunks)), np.int64, count=len(chunks))

    # -- the rule
    def encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        """int32 ids of each text by the chunk rule, no special tokens; one batch call."""
        chunks, owner = _chunked(texts)
        if not chunks:
            return [np.zeros(0, np.int32) for _ in texts]
        encoded = self._encode_chunks(chunks)
        out: list[list[np.ndarray]] = [[] for _ in texts]
        for k, ids in zip(owner, encoded):
            out[k].append(ids)
        return [p[0] if len(p) == 1 else np.concatenate(p).astype(np.int32, copy=False) if p
                else np.zeros(0, np.int32) for p in out]  # an empty text has no chunk

    def count_texts(self, texts: Sequence[str]) -> np.ndarray:
        """int64 token count of each text (what :meth:`encode_texts` would return), encoding at
        most :data:`BATCH_CHARS` characters per call so memory stays bounded."""
        return self.count_chunks(texts)[0]

    def count_chunks(self, texts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(totals, per_chunk)``: :meth:`count_texts`, and for each text the token count of
        each of its chunks (:func:`chunk_bounds`; ``int64``, one entry for a one-chunk text, none
        for an empty one). With them a loader encodes only the chunks a piece of a long document
        covers."""
        chunks, owner = _chunked(texts)
        counts = np.zeros(len(chunks), np.int64)
        lo = 0
        while lo < len(chunks):
            hi, size = lo, 0
            while hi < len(chunks) and (hi == lo or size + len(chunks[hi]) <= BATCH_CHARS):
                size += len(chunks[hi])
                hi += 1
            counts[lo:hi] = self._count_chunks(chunks[lo:hi])
            lo = hi
        own = np.asarray(owner, np.int64)
        totals = np.bincount(own, weights=counts, minlength=len(texts)).astype(np.int64) if len(own) else \
            np.zeros(len(texts), np.int64)
        bounds = np.searchsorted(own, np.arange(len(texts) + 1))  # owners are increasing
        return totals, [counts[bounds[k]:bounds[k + 1]] for k in range(len(texts))]


def _chunked(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    chunks: list[str] = []
    owner: list[int] = []
    for k, t in enumerate(texts):
        if len(t) <= CHUNK_CHARS:
            if t:
                chunks.append(t)
                owner.append(k)
            continue
        for lo, hi in chunk_bounds(t):
            chunks.append(t[lo:hi])
            owner.append(k)
    return chunks, owner


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte (``fabricd.tokenizer``): ``PAD 0, EOS 1, image 2``, no BOS."""

    kind = "bytes"

    def __init__(self) -> None:
        super().__init__(identity=byte_tok.TOKENIZER_ID, vocab_size=byte_tok.VOCAB_SIZE, bos_id=None,
                         eos_id=byte_tok.EOS_ID, pad_id=byte_tok.PAD_ID, image_id=byte_tok.IMAGE_ID)

    def _encode_chunks(self, chunks: list[str]) -> list[np.ndarray]:
        return [byte_tok.encode_text(c) for c in chunks]

    def _count_chunks(self, chunks: list[str]) -> np.ndarray:
        return np.fromiter((len(c.encode("utf-8")) for c in chunks), np.int64, count=len(chunks))


def _special(lookup, names: dict[str, str], known: Sequence[str], what: str, path: Path) -> dict[str, int | None]:
    ids: dict[str, int | None] = {}
    for role, name in names.items():
        if role == "bos" and not name:
            ids[role] = None
            continue
        tid = lookup(name)
        if tid is None:
            shown = ", ".join(repr(k) for k in list(known)[:20]) or "none"
            raise TokenizerError(f"{what} {path}: has no token {name!r} (the job's [tokenizer] {role}); "
                                 f"its special tokens: {shown}")
        ids[role] = int(tid)
    return ids


def load_tokenizer(spec: TokenizerSpec | None, *, parallel: bool = True,
                   roots: Sequence[Path] | None = None) -> Tokenizer:
    """The tokenizer ``spec`` names, ready to encode. ``parallel``: whether a batch may be encoded
    on several threads (indexing: yes; a source-loader process, one of many: no). ``roots``: the
    node's data roots the file must resolve inside (None: not confined, for offline tools).

    Raises TokenizerError for a missing or unreadable file or a special token it lacks.
    """
    spec = spec or TokenizerSpec()
    if spec.kind == "bytes":
        return ByteTokenizer()
    if spec.kind not in TOKENIZER_KINDS:
        raise TokenizerError(f"unknown tokenizer kind {spec.kind!r} (known: {', '.join(TOKENIZER_KINDS)})")
    if spec.path is None:
        raise TokenizerError(f"tokenizer kind {spec.kind!r} needs a file")
    path = Path(spec.path)
    if roots is not None:
        from fabricd.sources.roots import outside_roots

        problem = outside_roots(path, roots)
        if problem:
            raise TokenizerError(f"tokenizer: {problem}")
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path}: no such file")
    if spec.kind == "hf":
        from fabricd.text.hf import HFTokenizer

        return HFTokenizer(spec, path, parallel=parallel)
    from fabricd.text.spm import SentencePieceTokenizer

    return SentencePieceTokenizer(spec, path, parallel=parallel)


def cpu_threads() -> int:
    """Threads a parallel batch encode may use here."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
