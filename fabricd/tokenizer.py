"""The byte-level tokenizer every fabricd source is counted and encoded with.

There is no vocabulary file: a token is a UTF-8 byte shifted by ``BYTE_OFFSET``, plus three
special ids. The planner only ever needs token *counts*, which :func:`text_token_counts` computes
for a whole Arrow column at once from byte lengths, without encoding anything. The promise that
ties the two together: for any text ``t`` without nulls,
``text_token_counts(pa.array([t]))[0] == len(encode_text(t.replace(IMAGE_PLACEHOLDER, ""))) + 1``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "PAD_ID",
    "EOS_ID",
    "IMAGE_ID",
    "BYTE_OFFSET",
    "VOCAB_SIZE",
    "IMAGE_PLACEHOLDER",
    "TOKENIZER_ID",
    "text_token_counts",
    "encode_text",
    "encode_bytes",
]

PAD_ID = 0
EOS_ID = 1
IMAGE_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 259
IMAGE_PLACEHOLDER = "<image>"
#: Identifies the tokenizer in index fingerprints: changing the counting rule must change it.
TOKENIZER_ID = "bytes-v1"

_PLACEHOLDER_BYTES = len(IMAGE_PLACEHOLDER.encode("utf-8"))


def text_token_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Token count of each text: UTF-8 bytes with every ``<image>`` removed, plus one EOS.

    Vectorized over the column (no per-row Python). Returns ``int32[len(texts)]``; a null text
    counts as ``-1`` so the caller can skip it. Accepts string, large_string, binary or
    large_binary columns.
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    n = len(texts)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    nbytes = pc.binary_length(texts)
    holders = pc.count_substring(texts, IMAGE_PLACEHOLDER)
    counts = pc.add(pc.subtract(nbytes, pc.multiply(holders, _PLACEHOLDER_BYTES)), 1)
    counts = pc.fill_null(counts, -1)
    return counts.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def encode_bytes(data: bytes) -> np.ndarray:
    """Token ids (``int32``) of raw UTF-8 bytes: each byte plus ``BYTE_OFFSET``."""
    out = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    out += BYTE_OFFSET
    return out


def encode_text(text: str) -> np.ndarray:
    """Token ids (``int32``) of ``text``: its UTF-8 bytes plus ``BYTE_OFFSET``.

    Adds no EOS and leaves ``<image>`` placeholders as plain bytes; placing images is the
    transform's job.
    """
    return encode_bytes(text.encode("utf-8"))
