"""Packing loaded samples into one micro-batch's arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fabricd.pack import IGNORE_INDEX, IMAGE_ID, PACKED_FIELDS, pack_micro_batch

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

S = 2  # image size
X = IGNORE_INDEX


@dataclass
class Sample:
    input_ids: np.ndarray
    image_starts: np.ndarray
    pixels: np.ndarray


def _sample(ids: list[int], starts: list[int], fill: int = 0) -> Sample:
    px = np.full((len(starts), S, S, 3), fill, dtype=np.uint8)
    px += np.arange(len(starts), dtype=np.uint8)[:, None, None, None]
    return Sample(np.array(ids, dtype=np.int32), np.array(starts, dtype=np.int32), px)


def test_image_id_matches_the_tokenizer() -> None:
    from fabricd import tokenizer

    assert IMAGE_ID == tokenizer.IMAGE_ID


def test_hand_computed_example() -> None:
    a = _sample([10, 11, 12], [])  # text only
    b = _sample([20, 2, 2, 21, 22], [1], fill=100)  # one image block of 2 tokens at offset 1
    c = _sample([30, 2, 31], [1], fill=200)
    out = pack_micro_batch(
        [a, b, c],
        source_ids=np.array([0, 1, 1]),
        sample_ids=np.array([5, 6, 7]),
        pieces=np.array([0, 0, 2]),
        image_size=S,
    )
    assert tuple(out) == PACKED_FIELDS
    np.testing.assert_array_equal(out["input_ids"], [10, 11, 12, 20, 2, 2, 21, 22, 30, 2, 31])
    # labels: next token in the same sequence; -100 at each sequence end and before an image token
    np.testing.assert_array_equal(out["labels"], [11, 12, X, X, X, 21, 22, X, X, 31, X])
    np.testing.assert_array_equal(out["position_ids"], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(out["cu_seqlens"], [0, 3, 8, 11])
    np.testing.assert_array_equal(out["image_token_offsets"], [4, 9])
    assert out["pixel_values"].shape == (2, S, S, 3)
    assert out["pixel_values"][0].min() == 100 and out["pixel_values"][1].min() == 200
    np.testing.assert_array_equal(out["source_ids"], [0, 1, 1])
    np.testing.assert_array_equal(out["sample_ids"], [5, 6, 7])
    np.testing.assert_array_equal(out["pieces"], [0, 0, 2])
    expected = {
        "input_ids": np.int32, "labels": np.int32, "position_ids": np.int32, "cu_seqlens": np.int32,
        "pixel_values": np.uint8, "image_token_offsets": np.int32, "source_ids": np.int32,
        "sample_ids": np.int64, "pieces": np.int32,
    }
    for name, dtype in expected.items():
        assert out[name].dtype == dtype, name
        assert out[name].flags.c_contiguous, name


def test_several_images_per_sample_and_single_token_sequences() -> None:
    a = _sample([7], [])
    b = _sample([2, 40, 2, 41], [0, 2])
    out = pack_micro_batch([a, b], source_ids=np.zeros(2), sample_ids=np.arange(2), pieces=np.zeros(2), image_size=S)
    np.testing.assert_array_equal(out["labels"], [X, 40, X, 41, X])
    np.testing.assert_array_equal(out["position_ids"], [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(out["image_token_offsets"], [1, 3])
    np.testing.assert_array_equal(out["pixel_values"][:, 0, 0, 0], [0, 1])


def test_zero_samples() -> None:
    out = pack_micro_batch([], source_ids=np.array([]), sample_ids=np.array([]), pieces=np.array([]), image_size=4)
    assert tuple(out) == PACKED_FIELDS
    for name in PACKED_FIELDS:
        assert out[name].flags.c_contiguous
    assert out["input_ids"].shape == (0,) and out["input_ids"].dtype == np.int32
    assert out["labels"].shape == (0,) and out["position_ids"].shape == (0,)
    np.testing.assert_array_equal(out["cu_seqlens"], [0])
    assert out["cu_seqlens"].dtype == np.int32
    assert out["pixel_values"].shape == (0, 4, 4, 3) and out["pixel_values"].dtype == np.uint8
    assert out["image_token_offsets"].shape == (0,) and out["image_token_offsets"].dtype == np.int32
    assert out["sample_ids"].dtype == np.int64 and out["sample_ids"].shape == (0,)


def test_inconsistent_inputs_are_refused() -> None:
    good = _sample([1, 2, 3], [1])
    with pytest.raises(ValueError, match="sample_ids"):
        pack_micro_batch([good], source_ids=[0], sample_ids=[0, 1], pieces=[0], image_size=S)
    with pytest.raises(ValueError, match="pixels"):
        pack_micro_batch([good], source_ids=[0], sample_ids=[0], pieces=[0], image_size=S + 1)
    outside = Sample(good.input_ids, np.array([3], dtype=np.int32), good.pixels)
    with pytest.raises(ValueError, match="outside"):
        pack_micro_batch([outside], source_ids=[0], sample_ids=[0], pieces=[0], image_size=S)


def test_matches_a_per_token_reference_on_random_samples() -> None:
    rng = np.random.default_rng(3)
    samples = []
    for _ in range(20):
        n = int(rng.integers(1, 40))
        ids = rng.integers(3, 259, size=n).astype(np.int32)
        starts = sorted(rng.choice(n, size=int(rng.integers(0, min(n, 3) + 1)), replace=False).tolist())
        ids[starts] = IMAGE_ID
        pixels = rng.integers(0, 255, (len(starts), S, S, 3), dtype=np.uint8)
        samples.append(Sample(ids, np.array(starts, dtype=np.int32), pixels))
    k = len(samples)
    out = pack_micro_batch(samples, source_ids=np.zeros(k), sample_ids=np.arange(k), pieces=np.zeros(k), image_size=S)
    labels, positions, offsets, base = [], [], [], 0
    for s in samples:
        ids = s.input_ids.tolist()
        for i in range(len(ids)):
            nxt = ids[i + 1] if i + 1 < len(ids) else None
            labels.append(X if nxt is None or nxt == IMAGE_ID else nxt)
            positions.append(i)
        offsets += [base + st for st in s.image_starts.tolist()]
        base += len(ids)
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["position_ids"], positions)
    np.testing.assert_array_equal(out["image_token_offsets"], offsets)
    np.testing.assert_array_equal(out["input_ids"][out["image_token_offsets"]], IMAGE_ID)
