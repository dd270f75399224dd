"""The batch codec: named numpy arrays ⇄ one Arrow IPC stream, plus the content checksum.

A batch is any number of named numpy arrays of any shape and numeric (or bool) dtype. It is
encoded as an Arrow IPC stream holding one record batch of one row: each column is a
``LargeList`` whose single value is the flattened array; the dtypes and shapes travel in the
schema metadata. The constructor encodes a batch **once** and sends the same buffer to every
trainer that needs it.

Promises:

- :func:`decode_batch` returns arrays that *view* the buffer it was given when the stream is
  uncompressed, and view the decompressed buffers (nothing copied beyond the decompression
  itself) when it is lz4-compressed.
- :func:`decode_batch` raises :class:`~fabric_client.errors.ProtocolError` with code
  ``malformed`` for any buffer that is not a batch written by :func:`encode_batch`; it never
  lets a pyarrow exception escape.
- :func:`checksum` (XXH3-128 over a documented byte stream, :data:`CHECKSUM_ALGORITHM`) depends
  only on the array *content* (names, dtypes, shapes, bytes), never on the compression, so
  sender and receiver compute the same value; :func:`decode_verified` computes exactly that
  value from the decoded buffers, in place.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from .errors import ProtocolError
from .protocol import ErrorCode

__all__ = ["encode_batch", "recompress", "decode_batch", "decode_verified", "checksum", "COMPRESSIONS", "CHECKSUM_ALGORITHM"]

#: Accepted values of ``encode_batch(compression=...)``.
COMPRESSIONS = ("lz4", "zstd", None)
#: Name of the digest :func:`checksum` computes (see :func:`checksum`).
CHECKSUM_ALGORITHM = "xxh3-128+layout-v2"

_META_KEY = b"fabric.arrays"
_META_VERSION = 1
#: numpy dtypes without an Arrow equivalent that still round-trip bit-exactly as raw bytes.
_VIEW_AS = {"b": np.dtype(np.uint8)}  # bool: Arrow packs booleans into bits, which would copy
_KINDS = "biuf"  # bool, signed, unsigned, float
#: Single-threaded reads: the loader decodes several batches at once on its own threads.
_READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype


def encode_batch(arrays: Mapping[str, np.ndarray], *, compression: str | None = "lz4") -> pa.Buffer:
    """Serialize ``arrays`` into one Arrow IPC stream buffer (the frame sent to trainers).

    ``compression`` is ``"lz4"`` (default, lz4 frame per Arrow buffer), ``"zstd"`` or ``None``.
    Arrays must have numeric or bool dtypes; non-contiguous or non-native-endian arrays are
    converted first (a copy). Raises ``ValueError`` / ``TypeError`` for unusable input.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}; expected one of {COMPRESSIONS}")
    fields: list[pa.Field] = []
    columns: list[pa.Array] = []
    meta: list[list[Any]] = []
    for name, array in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array names must be str, got {name!r}")
        arr = np.asarray(array)
        if arr.dtype.kind not in _KINDS:
            raise TypeError(f"array {name!r} has dtype {arr.dtype}; only numeric and bool dtypes travel")
        shape = list(arr.shape)
        if not arr.flags.c_contiguous or arr.dtype != _native(arr.dtype):
            arr = np.ascontiguousarray(arr, dtype=_native(arr.dtype))
        flat = arr.reshape(-1)
        wire = flat.view(_VIEW_AS[arr.dtype.kind]) if arr.dtype.kind in _VIEW_AS else flat
        values = pa.array(wire)  # zero-copy wrap of the numpy buffer
        offsets = pa.array(np.array([0, len(wire)], dtype=np.int64))
        columns.append(pa.LargeListArray.from_arrays(offsets, values))
        fields.append(pa.field(name, pa.large_list(values.type), nullable=False))
        meta.append([name, arr.dtype.str, shape])
    schema = pa.schema(fields, metadata={_META_KEY: json.dumps({"v": _META_VERSION, "arrays": meta}).encode()})
    return _ipc_stream(schema, [pa.RecordBatch.from_arrays(columns, schema=schema)], compression)


def _ipc_stream(schema: pa.Schema, records: Sequence[pa.RecordBatch], compression: str | None) -> pa.Buffer:
    """The Arrow IPC stream of ``records``. Uncompressed, it is sized by a first pass that copies
    nothing, then written once into a buffer of that size: a growing stream would reallocate
    (copy, and fault in fresh pages) as it doubles. Compressed, its size is known only once
    written."""
    options = pa.ipc.IpcWriteOptions(compression=compression)

    def write(sink: Any) -> None:
        with pa.ipc.new_stream(sink, schema, options=options) as writer:
            for record in records:
                writer.write_batch(record)

    if compression is None:
        mock = pa.MockOutputStream()
        write(mock)
        out = pa.allocate_buffer(mock.size())
        write(pa.FixedSizeBufferWriter(out))
        return out
    sink = pa.BufferOutputStream()
    write(sink)
    return sink.getvalue()


def recompress(buf: Any, *, compression: str | None) -> pa.Buffer:
    """A frame of :func:`encode_batch` written again under ``compression``: the same schema and
    content, byte for byte the frame ``encode_batch`` gives for those arrays under that
    compression (a constructor encodes a batch once, uncompressed, and compresses it only for a
    trainer on another machine). Raises ``ValueError`` for a bad ``compression``."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}; expected one of {COMPRESSIONS}")
    reader = pa.ipc.open_stream(pa.py_buffer(buf) if not isinstance(buf, pa.Buffer) else buf)
    return _ipc_stream(reader.schema, list(reader), compression)


def decode_batch(buf: Any) -> dict[str, np.ndarray]:
    """Decode a buffer written by :func:`encode_batch` into ``{name: array}`` without copying.

    ``buf`` may be ``bytes``, ``memoryview``, a ``zmq.Frame`` or its ``.buffer``, or a
    ``pa.Buffer``. The returned arrays keep the underlying buffer alive. Raises
    ``ProtocolError(malformed)`` for anything else.
    """
    return _decode(buf, False)[0]


def decode_verified(buf: Any) -> tuple[dict[str, np.ndarray], str]:
    """``(decode_batch(buf), checksum(...of the result))``, sharing the per-array work.

    The digest is exactly :func:`checksum` of the returned arrays; for the usual batch
    (little-endian dtypes, distinct names) it is computed straight from the decoded buffers,
    without a copy, with the name/dtype/shape descriptors prepared once per batch layout.
    Raises like :func:`decode_batch`.
    """
    arrays, digest = _decode(buf, True)
    return arrays, digest if digest is not None else checksum(arrays)


def _decode(buf: Any, want_digest: bool) -> tuple[dict[str, np.ndarray], str | None]:
    try:
        if hasattr(buf, "buffer") and not isinstance(buf, (pa.Buffer, memoryview)):
            buf = buf.buffer  # zmq.Frame
        pbuf = buf if isinstance(buf, pa.Buffer) else pa.py_buffer(buf)
    except (TypeError, ValueError, BufferError) as e:
        raise ProtocolError(ErrorCode.MALFORMED, f"batch frame of type {type(buf).__name__} is not a buffer") from e
    try:
        reader = pa.ipc.open_stream(pbuf, options=_READ_OPTIONS)
        record = reader.read_next_batch()
        extra = _read_more(reader)
        record.validate(full=True)
    except StopIteration as e:
        raise ProtocolError(ErrorCode.MALFORMED, "batch frame holds a schema but no record batch") from e
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError) as e:
        raise ProtocolError(ErrorCode.MALFORMED, f"batch frame is not an Arrow IPC stream: {e}") from e
    if extra:
        raise ProtocolError(ErrorCode.MALFORMED, "batch frame holds more than one record batch")
    try:
        return _record_arrays(record, want_digest)
    except ProtocolError:
        raise
    except (pa.ArrowException, ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
        # e.g. a corrupt field name that is not UTF-8: still just a malformed frame
        raise ProtocolError(ErrorCode.MALFORMED, f"batch frame has a corrupt schema: {e!r}") from e


def _record_arrays(record: pa.RecordBatch, want_digest: bool = False) -> tuple[dict[str, np.ndarray], str | None]:
    """The arrays of ``record`` and, when asked and the layout allows, their checksum."""
    schema = record.schema
    shaped = _shaped(schema)
    layout = shaped.layout
    if record.num_rows != layout.rows or record.num_columns != len(layout.columns):
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"batch frame has {record.num_rows} rows x {record.num_columns} columns; "
            f"expected 1 x {len(layout.columns)}",
        )
    # The usual case: the schema is exactly the one encode_batch writes for these names and
    # dtypes, so every column's type is known good. Any other schema gets them checked column by
    # column. Either way, every column is then a large_list of one fixed-width primitive.
    if not schema.equals(layout.schema):
        _check_schema(schema, layout)
    # All the columns' buffers in one call: per column [validity, offsets, values validity, values]
    # (the record batch was fully validated: every buffer is as long as its lengths need).
    buffers = record.to_struct_array().buffers()
    if len(buffers) != 1 + 4 * len(layout.columns):
        raise ProtocolError(ErrorCode.MALFORMED, f"batch frame has {len(buffers)} buffers for "
                                                 f"{len(layout.columns)} columns")
    out: dict[str, np.ndarray] = {}
    flats: list[np.ndarray] = []
    for i, ((name, dtype, wire, _), shape, count) in enumerate(zip(layout.columns, shaped.shapes, shaped.counts)):
        at = 1 + 4 * i
        if (buffers[at] is not None or buffers[at + 2] is not None) and _has_nulls(record, i):
            raise ProtocolError(ErrorCode.MALFORMED, f"column {name!r} holds nulls")
        offsets = buffers[at + 1]
        # the single list value must be the whole array: values [0, count) of the flat child
        if offsets is None or offsets.size < _OFFSETS.size or _OFFSETS.unpack_from(offsets) != (0, count):
            got = _OFFSETS.unpack_from(offsets) if offsets is not None and offsets.size >= _OFFSETS.size else None
            raise ProtocolError(ErrorCode.MALFORMED, f"column {name!r}: list offsets {got} for {dtype}{list(shape)}")
        if count:
            try:
                flat = np.frombuffer(buffers[at + 3], dtype=wire, count=count)  # a view: no copy
                flat.flags.writeable = False  # as for a received frame, also over a decompressed buffer
            except (TypeError, ValueError) as e:  # a values buffer too short (or absent)
                raise ProtocolError(ErrorCode.MALFORMED, f"column {name!r}: {e}") from e
        else:  # no values buffer to view: a read-only empty view all the same
            flat = np.frombuffer(b"", dtype=wire)
        flats.append(flat)
        if wire is not dtype:
            flat = flat.view(dtype)
        out[name] = flat.reshape(shape)
    if not want_digest or layout.digest_order is None:
        return out, None
    digest = xxhash.xxh3_128(_STREAM_HEAD)  # the stream checksum() hashes, from the prepared descriptors
    for i, descriptor in zip(layout.digest_order, shaped.descriptors):
        digest.update(descriptor)
        flat = flats[i]
        if flat.size:
            digest.update(flat.view(np.uint8))
    return out, digest.hexdigest()


#: A one-row large_list's offsets: two int64 (little-endian, as Arrow IPC writes them).
_OFFSETS = struct.Struct("<qq")


def _check_schema(schema: pa.Schema, layout: _Layout) -> None:
    """Names and column types of a schema that is not byte-for-byte the one encode_batch writes."""
    if list(layout.names) != schema.names:
        raise ProtocolError(ErrorCode.MALFORMED, "fabric.arrays metadata does not match the columns")
    for (name, dtype, wire, _), typ in zip(layout.columns, schema.types):
        if not pa.types.is_large_list(typ) or typ.value_type != _arrow_type(wire):
            raise ProtocolError(ErrorCode.MALFORMED, f"column {name!r} is {typ}, not the large_list of "
                                                     f"{_arrow_type(wire)} that {dtype} needs")


def _has_nulls(record: pa.RecordBatch, i: int) -> bool:
    """Whether column ``i`` (a list column with a validity bitmap at either level) holds a null."""
    column = record.column(i)
    return bool(column.null_count or column.values.null_count)


def _read_more(reader: pa.ipc.RecordBatchStreamReader) -> bool:
    try:
        reader.read_next_batch()
    except StopIteration:
        return False
    return True


class _Layout:
    """What a batch's names and dtypes say, whatever its shapes: the schema encode_batch writes
    for them and the order checksum() hashes the columns in. Built once per distinct list of
    names and dtypes (a stream has few), not per batch: packed batches differ in their shapes."""

    __slots__ = ("schema", "names", "columns", "rows", "digest_order")

    def __init__(self, names_dtypes: tuple[tuple[str, np.dtype], ...]) -> None:
        columns, fields = [], []
        for name, dtype in names_dtypes:
            wire = _VIEW_AS.get(dtype.kind, dtype)
            columns.append((name, dtype, wire, _descriptor_head(name, dtype.str)))
            fields.append(pa.field(name, pa.large_list(_arrow_type(wire)), nullable=False))
        self.schema = pa.schema(fields)  # exactly what encode_batch writes (metadata aside)
        self.names = tuple(name for name, _ in names_dtypes)
        self.columns = tuple(columns)
        self.rows = 1 if columns else 0  # {} encodes 0 rows
        # checksum() of the decoded arrays, prepared: the column indices in sorted-name order.
        # Only for distinct names and dtypes whose bytes are already the canonical ones
        # (little-endian on this machine); otherwise checksum() itself is used.
        if len(set(self.names)) == len(self.names) and all(
            _canonical(dtype) == dtype and dtype.byteorder in "=|" for _, dtype in names_dtypes
        ):
            self.digest_order: tuple[int, ...] | None = tuple(sorted(range(len(self.names)),
                                                                     key=self.names.__getitem__))
        else:
            self.digest_order = None


class _Shaped:
    """One ``fabric.arrays`` metadata value parsed: its layout, each column's shape and number
    of values, and (when the layout allows a prepared digest) the checksum descriptors in the
    order ``layout.digest_order`` hashes them."""

    __slots__ = ("layout", "shapes", "counts", "descriptors")

    def __init__(self, layout: _Layout, shapes: list[tuple[int, ...]]) -> None:
        self.layout = layout
        self.shapes = shapes
        self.counts = [math.prod(shape) for shape in shapes]
        order = layout.digest_order
        self.descriptors = () if order is None else \
            tuple(_descriptor_from(layout.columns[i][3], shapes[i]) for i in order)


#: Names and dtypes → their layout (a stream repeats a few).
_LAYOUTS: dict[tuple[tuple[str, np.dtype], ...], _Layout] = {}
_MAX_LAYOUTS = 256
#: ``fabric.arrays`` metadata bytes → parsed (a batch whose shapes repeat an earlier one's skips
#: the JSON parse).
_SHAPED: dict[bytes, _Shaped] = {}
_MAX_SHAPED = 256


def _shaped(schema: pa.Schema) -> _Shaped:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ProtocolError(ErrorCode.MALFORMED, "batch frame lacks the fabric.arrays schema metadata")
    shaped = _SHAPED.get(raw)
    if shaped is None:
        meta = _parse_meta(raw)
        key = tuple((name, dtype) for name, dtype, _ in meta)
        layout = _LAYOUTS.get(key)
        if layout is None:
            layout = _Layout(key)
            if len(_LAYOUTS) >= _MAX_LAYOUTS:
                _LAYOUTS.clear()
            _LAYOUTS[key] = layout
        shaped = _Shaped(layout, [shape for _, _, shape in meta])
        if len(_SHAPED) >= _MAX_SHAPED:
            _SHAPED.clear()
        _SHAPED[raw] = shaped
    return shaped


def _parse_meta(raw: bytes) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    try:
        meta = json.loads(raw)
        if meta.get("v") != _META_VERSION:
            raise ValueError(f"metadata version {meta.get('v')!r}")
        result = []
        for name, dtype_str, shape in meta["arrays"]:
            dtype = np.dtype(dtype_str)
            if not isinstance(name, str) or dtype.kind not in _KINDS:
                raise ValueError(f"entry {name!r} {dtype_str!r}")
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"negative shape {dims}")
            result.append((name, dtype, dims))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ProtocolError(ErrorCode.MALFORMED, f"bad fabric.arrays metadata: {e}") from e
    return result


_ARROW_TYPES: dict[np.dtype, pa.DataType] = {}


def _arrow_type(dtype: np.dtype) -> pa.DataType:
    found = _ARROW_TYPES.get(dtype)
    if found is None:
        found = _ARROW_TYPES[dtype] = pa.from_numpy_dtype(dtype)
    return found


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """Hex digest (XXH3-128) of the content of ``arrays``: names, dtypes, shapes and bytes.

    The one fingerprint of the determinism contract: the constructor and ``fabricd expect``
    compute it from the arrays they build, the loader from the arrays it decoded
    (:func:`decode_verified` feeds the very same stream), so equal content gives equal digests
    whatever the compression, the mapping's order or the machine. The hashed stream, in bytes::

        CHECKSUM_ALGORITHM, b"\\n"
        for each array, in sorted-name order:
            u32le(len(d)), d      # d = JSON [name, dtype (little-endian form), [shape...]], UTF-8
            the array's values    # C order, little-endian, itemsize * prod(shape) bytes

    Every field is length-delimited, so no two different batches give the same stream; a change
    of any name, dtype, shape or byte changes the digest (with ~2**-128 odds of a collision
    against accidental corruption; XXH3 is not meant to resist an adversary forging batches).
    Contiguous arrays are hashed in place, without a copy.
    """
    digest = xxhash.xxh3_128(_STREAM_HEAD)
    for name in sorted(arrays):
        arr = arrays[name]
        if type(arr) is not np.ndarray:
            arr = np.asarray(arr)
        dtype = arr.dtype
        wire = _canonical(dtype)
        digest.update(_descriptor(name, wire.str, arr.shape))
        if arr.size:
            if not arr.flags.c_contiguous or dtype != wire:
                arr = np.ascontiguousarray(arr, dtype=wire)  # only a strided or byte-swapped array copies
            digest.update(arr.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _canonical(dtype: np.dtype) -> np.dtype:
    """The dtype whose bytes the checksum takes: the same kind and size, little-endian."""
    return dtype.newbyteorder("<") if dtype.byteorder not in ("<", "|") and dtype.itemsize > 1 else dtype


_STREAM_HEAD = CHECKSUM_ALGORITHM.encode() + b"\n"
#: (name, dtype string) -> the descriptor's JSON up to its shape (names and dtypes repeat; shapes
#: of packed batches do not, so the shape is appended per array).
_HEADS: dict[tuple[str, str], str] = {}
_MAX_HEADS = 4096


def _descriptor(name: str, dtype_str: str, shape: tuple[int, ...]) -> bytes:
    return _descriptor_from(_descriptor_head(name, dtype_str), shape)


def _descriptor_head(name: Any, dtype_str: str) -> str:
    """``json.dumps([name, dtype_str, [...]])`` up to the shape's first value: '["n", "<i4", ['."""
    if type(name) is not str:  # only plain str keys are cached: 1 == True would share an entry
        return json.dumps([name, dtype_str])[:-1] + ", ["
    key = (name, dtype_str)
    found = _HEADS.get(key)
    if found is None:
        found = json.dumps([name, dtype_str])[:-1] + ", ["
        if len(_HEADS) >= _MAX_HEADS:
            _HEADS.clear()
        _HEADS[key] = found
    return found


def _descriptor_from(head: str, shape: tuple[int, ...]) -> bytes:
    """The length-prefixed descriptor: exactly ``json.dumps([name, dtype_str, [int(d) ...]])``,
    UTF-8 (its head prepared once), after its length as u32le."""
    body = (head + ", ".join([str(int(d)) for d in shape]) + "]]").encode()
    return len(body).to_bytes(4, "little") + body
