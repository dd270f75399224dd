"""Hugging Face ``tokenizers`` (a local ``tokenizer.json``; never a hub download)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fabricd.text import Tokenizer, TokenizerError, TokenizerSpec, _special, file_digest

__all__ = ["HFTokenizer"]


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, with its truncation and padding turned
    off (a unit's length is the planner's business) and no special tokens added by its
    post-processor (the sample layout adds BOS/EOS itself)."""

    kind = "hf"

    def __init__(self, spec: TokenizerSpec, path: Path, *, parallel: bool) -> None:
        if not parallel:
            # one source-loader process among many: the Rust thread pool stays off. Read by
            # ``tokenizers`` at every batch call.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:  # pragma: no cover - a dependency of fabricd
            raise TokenizerError("tokenizer kind 'hf' needs the 'tokenizers' package") from e
        try:
            tok = _HF.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's
            raise TokenizerError(f"tokenizer file {path}: cannot load: {type(e).__name__}: {e}") from e
        tok.no_truncation()
        tok.no_padding()
        # a document's literal "</s>" or "<pad>" is text, not a control token (placeholders never
        # reach the tokenizer: the layout splits them out first)
        tok.encode_special_tokens = True
        self._tok = tok
        added = [t.content for t in tok.get_added_tokens_decoder().values()] if hasattr(
            tok, "get_added_tokens_decoder") else []
        ids = _special(tok.token_to_id, {"bos": spec.bos, "eos": spec.eos, "pad": spec.pad, "image": spec.image},
                       added, "hf tokenizer", path)
        super().__init__(identity=f"hf:{file_digest(path)}", vocab_size=tok.get_vocab_size(with_added_tokens=True),
                         bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], image_id=ids["image"])

    def _encode_chunks(self, chunks: list[str]) -> list[np.ndarray]:
        enc = self._tok.encode_batch_fast(chunks, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in enc]

    def _count_chunks(self, chunks: list[str]) -> np.ndarray:
        enc = self._tok.encode_batch_fast(chunks, add_special_tokens=False)
        return np.fromiter((len(e) for e in enc), np.int64, count=len(enc))
