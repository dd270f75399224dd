"""The batch checksum (the determinism contract's fingerprint): its exact content, its coverage of
names, dtypes, shapes and bytes, and its equality between the sending side (``checksum`` of the
arrays, as the constructor and ``fabricd expect`` compute it) and the receiving side
(``decode_verified`` of the encoded frame, as the loader computes it)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import xxhash

from fabric_client.batch import CHECKSUM_ALGORITHM, checksum, decode_batch, decode_verified, encode_batch
from fabricd.assemble import assemble_micro_batch
from fabricd.pack import IMAGE_ID
from fabricd.sources.transform import SampleData

from .test_batch_codec import DTYPES, SHAPES, _array

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]



def _all_arrays(seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{d}/{i}": _array(rng, d, s) for d in DTYPES for i, s in enumerate(SHAPES)}


def _reference(arrays: dict[str, np.ndarray]) -> str:
    """The documented stream, built the plain way (copies, ``tobytes``), hashed in one call."""
    stream = bytearray(CHECKSUM_ALGORITHM.encode() + b"\n")
    for name in sorted(arrays):
        arr = np.asarray(arrays[name])
        little = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        body = json.dumps([name, little.str, list(arr.shape)]).encode("utf-8")
        stream += len(body).to_bytes(4, "little") + body
        stream += arr.astype(little).tobytes(order="C")
    return xxhash.xxh3_128_hexdigest(bytes(stream))


def test_the_algorithm_is_xxh3_128_under_a_new_name() -> None:
    assert CHECKSUM_ALGORITHM == "xxh3-128+layout-v2"
    digest = checksum({"a": np.arange(3, dtype=np.int32)})
    assert len(digest) == 32 and int(digest, 16) >= 0


def test_checksum_is_the_documented_stream() -> None:
    arrays = _all_arrays()
    assert checksum(arrays) == _reference(arrays)
    assert checksum({}) == xxhash.xxh3_128_hexdigest(CHECKSUM_ALGORITHM.encode() + b"\n")
    odd = {"naïve \"name\" [x]": np.arange(5, dtype=np.uint16), "": np.zeros((1, 1), np.float32)}
    assert checksum(odd) == _reference(odd)


@pytest.mark.parametrize("compression", ["lz4", "zstd", None])
def test_sender_and_receiver_compute_the_same_digest(compression: str | None) -> None:
    arrays = _all_arrays()
    want = checksum(arrays)
    out, got = decode_verified(encode_batch(arrays, compression=compression))
    assert got == want == checksum(out) == _reference(arrays)
    assert decode_verified(encode_batch({}, compression=compression))[1] == checksum({})


@pytest.mark.parametrize("compression", ["lz4", None])
def test_a_packed_micro_batch_verifies_on_arrival(compression: str | None) -> None:
    """The fabric's own assembly (constructor and ``fabricd expect``) against the loader's digest."""
    rng = np.random.default_rng(5)
    units: list[SampleData | str] = []
    for n, images in ((17, 0), (40, 1), (5, 0)):
        ids = rng.integers(3, 259, size=n).astype(np.int32)
        ids[3:3 + 4 * images] = IMAGE_ID  # an image block of 4 tokens
        units.append(SampleData(input_ids=ids, image_starts=np.full(images, 3, np.int32),
                                pixels=rng.integers(0, 256, size=(images, 8, 8, 3), dtype=np.uint8)))
    units.append("unreadable")  # a skipped unit: not in the arrays
    mb = assemble_micro_batch(units, source_ids=np.zeros(4, np.int32), sample_ids=np.arange(4, dtype=np.int64),
                              pieces=np.zeros(4, np.int32), image_size=8)
    assert mb.arrays["pixel_values"].shape == (1, 8, 8, 3) and mb.samples == 3
    assert mb.checksum == _reference(mb.arrays)
    _, got = decode_verified(encode_batch(mb.arrays, compression=compression))
    assert got == mb.checksum


def test_every_part_of_the_content_changes_the_digest() -> None:
    base = {"ids": np.arange(64, dtype=np.int32), "px": np.zeros((2, 4, 4, 3), dtype=np.uint8)}
    ref = checksum(base)
    seen = {ref}

    def differs(arrays: dict[str, np.ndarray]) -> None:
        digest = checksum(arrays)
        assert digest not in seen, sorted((k, v.dtype.str, v.shape) for k, v in arrays.items())
        seen.add(digest)

    for pos in (0, 17, 95):  # one bit of the bytes, anywhere
        flipped = base["px"].copy()
        flipped.reshape(-1)[pos] ^= 1
        differs({"ids": base["ids"], "px": flipped})
    differs({"input_ids": base["ids"], "px": base["px"]})                 # a name
    differs({"ids": base["ids"].reshape(8, 8), "px": base["px"]})         # a shape, same bytes
    differs({"ids": base["ids"].reshape(1, 64), "px": base["px"]})        # a dimension of 1
    differs({"ids": base["ids"].view(np.float32), "px": base["px"]})      # a dtype, same bytes
    differs({"ids": base["ids"].view(np.uint32), "px": base["px"]})       # signedness, same bytes
    differs({"ids": base["ids"].view(np.int16), "px": base["px"]})        # item size, same bytes
    differs({"ids": base["ids"], "px": base["px"], "extra": np.zeros(0, np.int32)})  # an empty array
    differs({"ids": base["ids"], "px": base["px"], "extra": np.zeros(0, np.int64)})  # its dtype
    differs({"ids": base["ids"]})                                         # an array less
    # names and bytes cannot slide into one another
    differs({"a": np.array([1, 2], np.uint8), "b": np.array([3], np.uint8)})
    differs({"a": np.array([1], np.uint8), "b": np.array([2, 3], np.uint8)})
    differs({"a": np.array([1, 2, 3], np.uint8), "b": np.zeros(0, np.uint8)})
    differs({"ab": np.array([1], np.uint8), "c": np.array([2], np.uint8)})
    differs({"a": np.array([1], np.uint8), "bc": np.array([2], np.uint8)})


def test_the_digest_depends_on_values_not_on_layout_or_order() -> None:
    a = {"a": np.arange(10, dtype=np.int32), "b": np.ones((3, 3), dtype=np.uint8)}
    assert checksum(a) == checksum({"b": a["b"].copy(), "a": a["a"].copy()})
    wide = np.arange(60, dtype=np.int64).reshape(6, 10)
    view = wide[::2, 1::3]  # strided: hashed by value
    assert checksum({"v": view}) == checksum({"v": np.ascontiguousarray(view)})
    swapped = a["a"].astype(">i4")  # the same values in the other byte order
    assert checksum({"a": swapped, "b": a["b"]}) == checksum(a)
    assert checksum({"a": list(range(10)), "b": a["b"]}) == checksum({"a": np.arange(10), "b": a["b"]})


def test_a_stream_of_one_layout_in_many_shapes_decodes_and_verifies_every_batch() -> None:
    """Packed batches keep their names and dtypes but not their shapes: the receiver prepares a
    layout once per names and dtypes and each batch's shapes apart, so a batch must never be
    read with another's shapes or digested with another's descriptors."""
    rng = np.random.default_rng(7)
    names = ["input_ids", "naïve \"q\" [x]", "pixel_values", "cu_seqlens", "flag"]
    for i in range(40):
        n, imgs = int(rng.integers(0, 50)), int(rng.integers(0, 3))
        arrays = {names[0]: rng.integers(0, 1 << 30, n).astype(np.int32),
                  names[1]: rng.random((n % 7, 3)).astype(np.float64),
                  names[2]: rng.integers(0, 255, (imgs, 2, 2, 3)).astype(np.uint8),
                  names[3]: np.arange(i % 5 + 1, dtype=np.int64),
                  names[4]: rng.random(i % 3) < 0.5}
        frame = encode_batch(arrays, compression=None if i % 2 else "lz4")
        got, digest = decode_verified(frame)
        assert digest == checksum(arrays) == _reference(arrays)
        assert list(got) == names
        for name in names:
            assert got[name].shape == arrays[name].shape and got[name].dtype == arrays[name].dtype
            np.testing.assert_array_equal(got[name], arrays[name])


def test_a_big_contiguous_array_is_hashed_in_place() -> None:
    big = np.random.default_rng(1).integers(0, 255, size=32 << 20, dtype=np.uint8).reshape(1024, -1)
    words = big.reshape(-1).view(np.int64)
    checksum({"px": big, "w": words})  # warm the descriptor cache
    tracemalloc.start()
    try:
        digest = checksum({"px": big, "w": words})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"checksum allocated {peak} bytes for {big.nbytes * 2} bytes of arrays"
    assert digest == _reference({"px": big, "w": words})


@pytest.mark.parametrize("compression", ["lz4", None])
def test_a_corrupted_frame_fails_verification_or_decoding(compression: str | None) -> None:
    arrays = {"ids": np.arange(300, dtype=np.int32), "px": np.full((2, 4, 4, 3), 7, dtype=np.uint8)}
    want = checksum(arrays)
    good = encode_batch(arrays, compression=compression).to_pybytes()
    rng = np.random.default_rng(2)
    caught = 0
    for pos in rng.choice(len(good), size=200, replace=False):
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out, got = decode_verified(bytes(bad))
        except Exception as e:  # noqa: BLE001 — only the codec's own error may come out
            assert type(e).__name__ == "ProtocolError", repr(e)
            caught += 1
            continue
        same = list(out) == list(arrays) and all(np.array_equal(out[k], arrays[k]) for k in arrays)
        assert (got == want) == same
        caught += not same
        assert got == checksum(decode_batch(bytes(bad)))
    assert caught > 50
