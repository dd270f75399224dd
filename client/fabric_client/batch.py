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
    layout = _layout(schema)
    if record.num_rows != layout.rows or record.num_columns != len(layout.columns):
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"batch frame has {record.num_rows} rows x {record.num_columns} columns; "
            f"expected 1 x {len(layout.columns)}",
        )
    # The usual case: the schema is exactly the one encode_batch writes for this metadata, so the
    # names and every column's type are known good. Any other schema gets them checked column by
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
    for i, (name, dtype, wire, count, shape) in enumerate(layout.columns):
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
    plan = layout.digest_plan if want_digest else None
    if plan is None:
        return out, None
    digest = xxhash.xxh3_128(_STREAM_HEAD)  # the stream checksum() hashes, from the prepared descriptors
    for i, descriptor in plan:
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
    for (name, dtype, wire, _, shape), typ in zip(layout.columns, schema.types):
        if not pa.types.is_large_list(typ) or typ.value_type != _arrow_type(wire):
            raise ProtocolError(ErrorCode.MALFORMED, f"column {name!r} is {typ}, not the large_list of "
                                                     f"{_arrow_type(wire)} that {dtype}{list(shape)} needs")


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
    """What one ``fabric.arrays`` metadata value says about a record batch, parsed once."""

    __slots__ = ("schema", "names", "columns", "rows", "digest_plan")

    def __init__(self, arrays_meta: list[tuple[str, np.dtype, tuple[int, ...]]]) -> None:
        columns, fields = [], []
        for name, dtype, shape in arrays_meta:
            wire = _VIEW_AS.get(dtype.kind, dtype)
            columns.append((name, dtype, wire, math.prod(shape), shape))
            fields.append(pa.field(name, pa.large_list(_arrow_type(wire)), nullable=False))
        self.schema = pa.schema(fields)  # exactly what encode_batch writes (metadata aside)
        self.names = tuple(name for name, _, _ in arrays_meta)
        self.columns = tuple(columns)
        self.rows = 1 if columns else 0  # {} encodes 0 rows
        # checksum() of the decoded arrays, prepared: (column index, descriptor) in sorted-name
        # order. Only for distinct names and dtypes whose bytes are already the canonical ones
        # (little-endian on this machine); otherwise checksum() itself is used.
        names = [name for name, _, _ in arrays_meta]
        if len(set(names)) == len(names) and all(
            _canonical(dtype) == dtype and dtype.byteorder in "=|" for _, dtype, _ in arrays_meta
        ):
            order = sorted(range(len(names)), key=names.__getitem__)
            self.digest_plan: tuple[tuple[int, bytes], ...] | None = tuple(
                (i, _descriptor(arrays_meta[i][0], arrays_meta[i][1].str, arrays_meta[i][2])) for i in order
            )
        else:
            self.digest_plan = None


#: ``fabric.arrays`` metadata bytes → parsed layout. A stream of batches repeats a few layouts,
#: so each batch costs a dict lookup instead of a JSON parse and a schema rebuild.
_LAYOUTS: dict[bytes, _Layout] = {}
_MAX_LAYOUTS = 256


def _layout(schema: pa.Schema) -> _Layout:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ProtocolError(ErrorCode.MALFORMED, "batch frame lacks the fabric.arrays schema metadata")
    layout = _LAYOUTS.get(raw)
    if layout is None:
        layout = _Layout(_parse_meta(raw))
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[raw] = layout
    return layout


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
#: (name, dtype string, shape) -> the length-prefixed descriptor bytes (names and shapes repeat).
_DESCRIPTORS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
_MAX_DESCRIPTORS = 4096


def _descriptor(name: str, dtype_str: str, shape: tuple[int, ...]) -> bytes:
    if type(name) is not str:  # only plain str keys are cached: 1 == True would share an entry
        return _encode_descriptor(name, dtype_str, shape)
    key = (name, dtype_str, shape)
    found = _DESCRIPTORS.get(key)
    if found is None:
        found = _encode_descriptor(name, dtype_str, shape)
        if len(_DESCRIPTORS) >= _MAX_DESCRIPTORS:
            _DESCRIPTORS.clear()
        _DESCRIPTORS[key] = found
    return found


def _encode_descriptor(name: Any, dtype_str: str, shape: tuple[int, ...]) -> bytes:
    body = json.dumps([name, dtype_str, [int(d) for d in shape]]).encode()
    return len(body).to_bytes(4, "little") + body
