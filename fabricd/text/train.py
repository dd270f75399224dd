"""Train small tokenizers from texts: a byte-level BPE ``tokenizer.json`` and a SentencePiece model.

For the demo corpus (:mod:`fabricd.corpus`), tests and benchmarks: both train in seconds on a few
MB of text, download nothing, and encode any text without an unknown token (the BPE starts from
the 256 byte symbols; the SentencePiece model falls back to bytes). Both carry the special
tokens :class:`fabricd.text.TokenizerSpec` names by default: ``<pad>``, ``<s>``, ``</s>`` and
``<image>``.

Same texts, same library versions, same file: the BPE trainer breaks ties deterministically and
the SentencePiece trainer runs on one thread over the texts in the order given.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "BPE_FILE", "SPM_FILE", "train_bpe", "train_sentencepiece"]

#: The special tokens both trainers add, in id order (``<pad>`` is 0).
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")
BPE_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
#: Most characters of text a SentencePiece model is trained on (the rest of the texts is not read).
SPM_MAX_CHARS = 16 << 20
#: Longest "sentence" handed to the SentencePiece trainer (characters); longer lines are cut at
#: spaces (SentencePiece would drop them whole).
SPM_MAX_SENTENCE = 2048


def _target(out: Path, name: str, suffix: str) -> Path:
    """``out`` itself when it names a ``suffix`` file, else ``out/name``; its directory made."""
    out = Path(out)
    path = out if out.suffix == suffix else out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` replaced by ``data`` at once (a reader sees the old file or the new one), with the
    mode the umask gives a new file."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def train_bpe(texts: Iterable[str], out: Path, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer without prefix space, ByteLevel
    decoder, all 256 byte symbols in the alphabet) on ``texts`` and write it as a ``tokenizer.json``.

    ``out``: a directory (the file is ``out/tokenizer.json``) or a path ending in ``.json``.
    The vocabulary holds :data:`SPECIAL_TOKENS` (ids 0-3), the byte alphabet and up to
    ``vocab_size`` entries in all (fewer when the texts offer fewer merges). Returns the file's
    path; the file is replaced atomically.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + bytes), got {vocab_size}")
    path = _target(out, BPE_FILE, ".json")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    _write_atomic(path, tok.to_str(pretty=False).encode("utf-8"))
    return path


def _sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines of ``texts`` (long ones cut at spaces), at most ``max_chars`` characters."""
    from fabricd.text import chunk_bounds

    left = max_chars
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for lo, hi in chunk_bounds(line, SPM_MAX_SENTENCE):
                if left <= 0:
                    return
                piece = line[lo:hi]
                left -= len(piece)
                yield piece


def train_sentencepiece(texts: Iterable[str], out: Path, vocab_size: int = 2048, *,
                        max_chars: int = SPM_MAX_CHARS) -> Path:
    """Train a SentencePiece BPE model on (at most ``max_chars`` characters of) ``texts`` and write it.

    ``out``: a directory (the file is ``out/spm.model``) or a path ending in ``.model``. Ids 0-4
    are ``<pad>``, ``<unk>``, ``<s>``, ``</s>`` (control tokens) and ``<image>`` (user-defined:
    also matched inside text); unseen characters fall back to their UTF-8 bytes, so nothing
    encodes as ``<unk>``. Text is taken as is (identity normalization, spaces kept, no dummy
    prefix), so a text encodes the same whether or not it was cut before a space or after a
    newline. ``vocab_size`` is a soft limit when the texts are too few to fill it. Returns the
    file's path; the file is replaced atomically.
    """
    import sentencepiece as spm

    specials = len(SPECIAL_TOKENS) + 1 + 256  # + <unk> + byte pieces
    if vocab_size <= specials:
        raise ValueError(f"vocab_size must be > {specials} (specials, <unk> and bytes), got {vocab_size}")
    sentences = list(_sentences(texts, max_chars))
    if not sentences:
        raise ValueError("train_sentencepiece: the texts hold no non-blank line to train on")
    path = _target(out, SPM_FILE, ".model")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=SPECIAL_TOKENS[0], bos_piece=SPECIAL_TOKENS[1], eos_piece=SPECIAL_TOKENS[2],
        user_defined_symbols=[SPECIAL_TOKENS[3]],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True,
        input_sentence_size=1 << 20, shuffle_input_sentence=False, max_sentence_length=4 * SPM_MAX_SENTENCE,
        num_threads=1, minloglevel=2)
    _write_atomic(path, model.getvalue())
    return path
