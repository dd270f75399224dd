"""Unit tests of the byte-level tokenizer: counts agree with encoding, vectorized and null-aware."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from fabricd.tokenizer import (
    BYTE_OFFSET,
    EOS_ID,
    IMAGE_ID,
    IMAGE_PLACEHOLDER,
    PAD_ID,
    VOCAB_SIZE,
    encode_text,
    text_token_counts,
)

pytestmark = pytest.mark.unit

TEXTS = ["", "hello", "<image>", "a<image>b<image>", "café 東京 ü", "<im<image>age>", "x" * 10_000, "<image"]


def test_constants() -> None:
    assert (PAD_ID, EOS_ID, IMAGE_ID, BYTE_OFFSET, VOCAB_SIZE) == (0, 1, 2, 3, 259)
    assert IMAGE_PLACEHOLDER == "<image>"


def test_encode_text_is_bytes_plus_offset() -> None:
    ids = encode_text("Aé")
    assert ids.dtype == np.int32
    assert ids.tolist() == [ord("A") + 3, 0xC3 + 3, 0xA9 + 3]
    assert encode_text("").shape == (0,)
    assert encode_text("<image>").tolist() == [b + 3 for b in b"<image>"]  # placeholders untouched
    assert int(encode_text("\xff\x00").max()) < VOCAB_SIZE


@pytest.mark.parametrize("typ", [pa.string(), pa.large_string()])
def test_counts_agree_with_encoding(typ: pa.DataType) -> None:
    counts = text_token_counts(pa.array(TEXTS, type=typ))
    assert counts.dtype == np.int32
    expected = [len(encode_text(t.replace(IMAGE_PLACEHOLDER, ""))) + 1 for t in TEXTS]
    assert counts.tolist() == expected


def test_null_counts_minus_one_and_chunked() -> None:
    arr = pa.chunked_array([pa.array(["ab", None]), pa.array(["<image>c"])])
    assert text_token_counts(arr).tolist() == [3, -1, 2]
    assert text_token_counts(pa.array([], type=pa.string())).shape == (0,)


def test_counts_are_vectorized_fast() -> None:
    rng = np.random.default_rng(0)
    texts = ["w" * int(n) + IMAGE_PLACEHOLDER * int(n % 3) for n in rng.integers(0, 200, 200_000)]
    counts = text_token_counts(pa.array(texts))
    assert counts[:3].tolist() == [len(t.replace(IMAGE_PLACEHOLDER, "")) + 1 for t in texts[:3]]
