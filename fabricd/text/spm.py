"""SentencePiece (a local ``.model`` file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fabricd.text import Tokenizer, TokenizerError, TokenizerSpec, _special, cpu_threads, file_digest

__all__ = ["SentencePieceTokenizer"]


class SentencePieceTokenizer(Tokenizer):
    """A ``sentencepiece.SentencePieceProcessor``; ids never include its own BOS/EOS."""

    kind = "sentencepiece"

    def __init__(self, spec: TokenizerSpec, path: Path, *, parallel: bool) -> None:
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - a dependency of fabricd
            raise TokenizerError("tokenizer kind 'sentencepiece' needs the 'sentencepiece' package") from e
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"tokenizer file {path}: cannot load: {type(e).__name__}: {e}") from e
        self._sp = sp
        self._threads = cpu_threads() if parallel else 1
        n = sp.get_piece_size()

        def lookup(name: str) -> int | None:
            tid = sp.piece_to_id(name)
            return tid if 0 <= tid < n and sp.id_to_piece(tid) == name else None

        # the python API has no is_user_defined: user-defined pieces are the non-byte ones scored 0
        # (a BPE model's first merge may be listed too; this list only names tokens in an error)
        known = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)
                 or (sp.get_score(i) == 0.0 and not sp.is_byte(i) and not sp.is_unused(i))]
        ids = _special(lookup, {"bos": spec.bos, "eos": spec.eos, "pad": spec.pad, "image": spec.image},
                       known, "sentencepiece model", path)
        super().__init__(identity=f"spm:{file_digest(path)}", vocab_size=n, bos_id=ids["bos"], eos_id=ids["eos"],
                         pad_id=ids["pad"], image_id=ids["image"])

    def _encode_chunks(self, chunks: list[str]) -> list[np.ndarray]:
        out = self._sp.encode(chunks, out_type=int, add_bos=False, add_eos=False, num_threads=self._threads)
        return [np.asarray(ids, dtype=np.int32) for ids in out]
