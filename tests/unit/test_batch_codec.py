"""The batch codec: round trips, zero-copy decoding, checksum sensitivity, malformed input."""

from __future__ import annotations

import struct
import numpy as np
import pyarrow as pa
import pytest

from fabric_client.batch import checksum, decode_batch, decode_verified, encode_batch, recompress
from fabric_client.errors import ProtocolError
from fabric_client.protocol import ErrorCode

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

DTYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64", "bool"
]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 3)]


def _array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith("float"):
        return rng.standard_normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _all_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {f"{d}_{i}": _array(rng, d, s) for d in DTYPES for i, s in enumerate(SHAPES)}


@pytest.mark.parametrize("compression", ["lz4", None])
def test_round_trip_every_dtype_and_shape(compression: str | None) -> None:
    arrays = _all_arrays()
    out = decode_batch(encode_batch(arrays, compression=compression))
    assert list(out) == list(arrays)
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype, name
        assert out[name].shape == arr.shape, name
        assert out[name].flags.c_contiguous, name
        np.testing.assert_array_equal(out[name], arr, err_msg=name)
    assert checksum(out) == checksum(arrays)


@pytest.mark.parametrize("compression", ["lz4", None])
def test_no_arrays_round_trip(compression: str | None) -> None:
    assert decode_batch(encode_batch({}, compression=compression)) == {}


@pytest.mark.parametrize("kind", ["bytes", "memoryview", "pa.Buffer"])
def test_decode_accepts_buffer_kinds(kind: str) -> None:
    arrays = {"x": np.arange(100, dtype=np.int32).reshape(10, 10)}
    buf = encode_batch(arrays, compression="lz4")
    given = {"bytes": buf.to_pybytes(), "memoryview": memoryview(buf.to_pybytes()), "pa.Buffer": buf}[kind]
    np.testing.assert_array_equal(decode_batch(given)["x"], arrays["x"])


def test_uncompressed_decode_is_zero_copy() -> None:
    arrays = {"ids": np.arange(4096, dtype=np.int32), "px": np.ones((2, 8, 8, 3), dtype=np.uint8)}
    raw = bytearray(encode_batch(arrays, compression=None).to_pybytes())
    received = np.frombuffer(raw, dtype=np.uint8)
    out = decode_batch(memoryview(raw))
    for name in arrays:
        assert np.shares_memory(out[name], received), name
    raw[-1] ^= 0  # the decoded arrays keep viewing the caller's buffer
    assert out["ids"].base is not None


def test_lz4_decode_views_the_decompressed_buffer() -> None:
    arrays = {"ids": np.zeros(1 << 16, dtype=np.int32)}
    buf = encode_batch(arrays, compression="lz4")
    assert buf.size < arrays["ids"].nbytes // 4  # really compressed
    out = decode_batch(buf)["ids"]
    assert not out.flags.owndata  # a view of Arrow's decompressed buffer, no numpy copy


def test_non_contiguous_input_is_encoded_by_value() -> None:
    base = np.arange(60, dtype=np.int64).reshape(6, 10)
    view = base[::2, 1::3]
    out = decode_batch(encode_batch({"v": view}))["v"]
    np.testing.assert_array_equal(out, view)
    assert checksum({"v": view}) == checksum({"v": np.ascontiguousarray(view)})


def test_checksum_is_independent_of_compression_and_order() -> None:
    a = {"a": np.arange(10, dtype=np.int32), "b": np.ones((3, 3), dtype=np.uint8)}
    b = {"b": a["b"].copy(), "a": a["a"].copy()}
    assert checksum(a) == checksum(b)
    assert checksum(decode_batch(encode_batch(a, compression="lz4"))) == checksum(
        decode_batch(encode_batch(a, compression=None))
    )


def test_checksum_changes_with_content_name_shape_and_dtype() -> None:
    base = {"ids": np.arange(64, dtype=np.int32), "px": np.zeros((2, 4, 4, 3), dtype=np.uint8)}
    ref = checksum(base)
    flipped = {k: v.copy() for k, v in base.items()}
    flipped["px"].reshape(-1).view(np.uint8)[17] ^= 1
    assert checksum(flipped) != ref
    renamed = {"input_ids": base["ids"], "px": base["px"]}
    assert checksum(renamed) != ref
    reshaped = {"ids": base["ids"].reshape(8, 8), "px": base["px"]}
    assert checksum(reshaped) != ref
    retyped = {"ids": base["ids"].view(np.float32), "px": base["px"]}
    assert checksum(retyped) != ref
    moved = {"ids": base["ids"], "px": base["px"], "extra": np.zeros(0, dtype=np.int32)}
    assert checksum(moved) != ref


def test_checksum_does_not_confuse_bytes_moved_between_arrays() -> None:
    one = {"a": np.array([1, 2], dtype=np.uint8), "b": np.array([3], dtype=np.uint8)}
    two = {"a": np.array([1], dtype=np.uint8), "b": np.array([2, 3], dtype=np.uint8)}
    assert checksum(one) != checksum(two)


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(TypeError, match="dtype"):
        encode_batch({"s": np.array(["x"])})
    with pytest.raises(ValueError, match="compression"):
        encode_batch({"a": np.zeros(1)}, compression="gzip-9")


def _malformed_buffers() -> list[bytes]:
    good = encode_batch({"x": np.arange(1000, dtype=np.int32)}, compression="lz4").to_pybytes()
    two_rows = pa.record_batch({"x": pa.array([[1], [2]], type=pa.large_list(pa.int32()))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, two_rows.schema) as w:
        w.write_batch(two_rows)
    no_meta = sink.getvalue().to_pybytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([pa.field("x", pa.large_list(pa.int32()))])):
        pass  # a schema, then end of stream: no record batch at all
    schema_only = sink.getvalue().to_pybytes()
    return [b"", b"garbage", good[: len(good) // 2], good[:-9], bytes(flipped), no_meta, b"\xff" * 64, schema_only]


@pytest.mark.parametrize(
    "buf",
    _malformed_buffers(),
    ids=["empty", "garbage", "half", "tail_cut", "flipped", "foreign", "ff", "schema_only"],
)
def test_malformed_buffer_raises_protocol_error(buf: bytes) -> None:
    try:
        decode_batch(buf)
    except ProtocolError as e:
        assert e.code == ErrorCode.MALFORMED
    else:  # a flipped byte inside the data itself is not detectable by the codec: the checksum catches it
        assert buf == _malformed_buffers()[4]


def test_bad_metadata_raises_protocol_error() -> None:
    x = pa.array([[1, 2, 3]], type=pa.large_list(pa.int32()))
    for meta in [b"not json", b'{"v": 1, "arrays": [["x", "<i4", [4]]]}', b'{"v": 1, "arrays": [["y", "<i4", [3]]]}',
                 b'{"v": 9, "arrays": []}', b'{"v": 1, "arrays": [["x", "<U4", [3]]]}']:
        schema = pa.schema([pa.field("x", x.type)], metadata={b"fabric.arrays": meta})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as w:
            w.write_batch(pa.record_batch([x], schema=schema))
        with pytest.raises(ProtocolError) as info:
            decode_batch(sink.getvalue())
        assert info.value.code == ErrorCode.MALFORMED


@pytest.mark.parametrize("compression", ["lz4", None])
def test_flipped_bytes_anywhere_give_protocol_error_or_detectable_content(compression: str | None) -> None:
    arrays = {"ids": np.arange(300, dtype=np.int32), "px": np.full((2, 4, 4, 3), 7, dtype=np.uint8)}
    good = encode_batch(arrays, compression=compression).to_pybytes()
    rng = np.random.default_rng(11)
    for pos in range(len(good)):  # every byte of the frame
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = decode_batch(bytes(bad))
        except ProtocolError:
            continue
        # decoded anyway: either the flip hit padding/unused bytes, or the checksum catches it
        same = list(out) == list(arrays) and all(np.array_equal(out[k], arrays[k]) for k in arrays)
        assert same == (checksum(out) == checksum(arrays))


def _frame(column: pa.Array, meta: str, nullable: bool = False) -> bytes:
    """A hand-made one-column frame: ``column`` under the name "x" with ``fabric.arrays`` ``meta``."""
    schema = pa.schema([pa.field("x", column.type, nullable=nullable)], metadata={b"fabric.arrays": meta.encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.record_batch([column], schema=schema))
    return sink.getvalue().to_pybytes()


_META3 = '{"v": 1, "arrays": [["x", "<i4", [3]]]}'


@pytest.mark.parametrize("column, meta, why", [
    (pa.array([[1, None, 3]], type=pa.large_list(pa.int32())), _META3, "nulls"),
    (pa.array([None], type=pa.large_list(pa.int32())), '{"v": 1, "arrays": [["x", "<i4", [0]]]}', "nulls"),
    (pa.array([[1, 2, 3]], type=pa.large_list(pa.int64())), _META3, "large_list"),
    (pa.array([[1, 2, 3]], type=pa.list_(pa.int32())), _META3, "large_list"),
    (pa.array([[1, 2, 3]], type=pa.large_list(pa.int32())), '{"v": 1, "arrays": [["x", "<i4", [2]]]}', "offsets"),
])
def test_hand_made_frames_that_lie_are_refused(column: pa.Array, meta: str, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as info:
        decode_verified(_frame(column, meta))
    assert info.value.code == ErrorCode.MALFORMED


def test_a_hand_made_frame_with_nullable_fields_but_no_nulls_decodes() -> None:
    frame = _frame(pa.array([[4, 5, 6]], type=pa.large_list(pa.int32())), '{"v": 1, "arrays": [["x", "<i4", [3]]]}',
                   nullable=True)
    out, digest = decode_verified(frame)
    np.testing.assert_array_equal(out["x"], np.array([4, 5, 6], np.int32))
    assert digest == checksum({"x": np.array([4, 5, 6], np.int32)})


@pytest.mark.parametrize("offsets", [(1, 3), (0, 2), (2, 2)])
def test_list_offsets_that_do_not_cover_the_whole_array_are_refused(offsets: tuple[int, int]) -> None:
    """Arrow's writer always writes offsets (0, n); a frame whose one list value is only part of
    its flat values (still a valid Arrow stream) is not a batch encode_batch wrote."""
    good = _frame(pa.array([[1, 2, 3]], type=pa.large_list(pa.int32())), _META3)
    np.testing.assert_array_equal(decode_batch(good)["x"], [1, 2, 3])
    at = good.rindex(struct.pack("<qq", 0, 3))  # the body (offsets, then values) follows the metadata
    assert good[at + 16:at + 28] == np.array([1, 2, 3], np.int32).tobytes()
    bad = good[:at] + struct.pack("<qq", *offsets) + good[at + 16:]
    with pytest.raises(ProtocolError, match="offsets") as info:
        decode_verified(bad)
    assert info.value.code == ErrorCode.MALFORMED


@pytest.mark.parametrize("compression", ["lz4", None])
def test_decoded_arrays_are_read_only_views_even_when_empty(compression: str | None) -> None:
    arrays = {"e": np.zeros((2, 0, 3), np.float32), "f": np.arange(5, dtype=np.int16), "b": np.zeros(0, bool)}
    out = decode_batch(encode_batch(arrays, compression=compression))
    for name, arr in out.items():
        assert not arr.flags.owndata and not arr.flags.writeable, name
        assert arr.dtype == arrays[name].dtype and arr.shape == arrays[name].shape, name


@pytest.mark.parametrize("compression", ["lz4", None])
def test_a_frame_is_the_plain_arrow_stream_whatever_way_it_was_written_and_recompress_round_trips(
        compression: str | None) -> None:
    """An uncompressed frame is written into a buffer sized beforehand, a compressed one into a
    growing stream: both are byte for byte the Arrow IPC stream of the same record (what an
    Arrow stream reader and writer make of it), and re-encoding between them gives the other's
    bytes (a constructor compresses a built batch only for a trainer on another machine)."""
    arrays = _all_arrays()
    other = "lz4" if compression is None else None
    frame = encode_batch(arrays, compression=compression)
    reader = pa.ipc.open_stream(frame)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, reader.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        for record in reader:
            w.write_batch(record)
    assert frame.equals(sink.getvalue())
    assert recompress(frame, compression=other).equals(encode_batch(arrays, compression=other))
    assert recompress(recompress(frame, compression=other), compression=compression).equals(frame)
    with pytest.raises(ValueError, match="compression"):
        recompress(frame, compression="gzip9")
