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
- :func:`checksum` depends only on the array *content* (names, dtypes, shapes, bytes), never on
  the compression, so sender and receiver compute the same value.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import ProtocolError
from .protocol import ErrorCode

__all__ = ["encode_batch", "decode_batch", "decode_verified", "checksum", "COMPRESSIONS", "CHECKSUM_ALGORITHM"]

#: Accepted values of ``encode_batch(compression=...)``.
COMPRESSIONS = ("lz4", "zstd", None)
#: Name of the digest :func:`checksum` computes (see :func:`checksum`).
CHECKSUM_ALGORITHM = "mlh128+blake2b-v1"

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
    record = pa.RecordBatch.from_arrays(columns, schema=schema)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        writer.write_batch(record)
    return sink.getvalue()


def decode_batch(buf: Any) -> dict[str, np.ndarray]:
    """Decode a buffer written by :func:`encode_batch` into ``{name: array}`` without copying.

    ``buf`` may be ``bytes``, ``memoryview``, a ``zmq.Frame`` or its ``.buffer``, or a
    ``pa.Buffer``. The returned arrays keep the underlying buffer alive. Raises
    ``ProtocolError(malformed)`` for anything else.
    """
    return _decode(buf, False)[0]


def decode_verified(buf: Any) -> tuple[dict[str, np.ndarray], str]:
    """``(decode_batch(buf), checksum(...of the result))``, sharing the per-array work.

    The digest is exactly :func:`checksum` of the returned arrays; for the usual batch (native
    dtypes) it is computed straight from the decoded columns with the name/dtype/shape
    descriptors prepared once per batch layout. Raises like :func:`decode_batch`.
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
    # names and every column's type are known good and only per-batch facts (nulls, lengths) are
    # left to check. Any other schema gets the checks column by column.
    typed = schema.equals(layout.schema)
    if not typed and list(layout.names) != schema.names:
        raise ProtocolError(ErrorCode.MALFORMED, "fabric.arrays metadata does not match the columns")
    out: dict[str, np.ndarray] = {}
    flats: list[np.ndarray] = []
    for i, (name, dtype, wire, count, shape) in enumerate(layout.columns):
        column = record.column(i)
        if not typed and not pa.types.is_large_list(column.type) or column.null_count:
            raise ProtocolError(ErrorCode.MALFORMED, f"column {name!r} is {column.type}, not a large_list")
        values = column.values  # the flat array; its length must be the product of the shape
        try:
            if (not typed and values.type != _arrow_type(wire)) or len(values) != count or values.null_count:
                raise ValueError(f"{values.type}[{len(values)}] for {dtype}{list(shape)}")
            flat = values.to_numpy(zero_copy_only=True)
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise ProtocolError(ErrorCode.MALFORMED, f"column {name!r}: {e}") from e
        flats.append(flat)
        if wire is not dtype:
            flat = flat.view(dtype)
        out[name] = flat.reshape(shape)
    plan = layout.digest_plan if want_digest else None
    if plan is None:
        return out, None
    parts = []
    for i, descriptor in plan:
        parts.append(descriptor)
        flat = flats[i]
        if flat.size:
            parts.append(_multilinear(flat.view(np.uint8)))
    return out, hashlib.blake2b(b"".join(parts), digest_size=16).hexdigest()


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
        # order. Only for native dtypes and distinct names (else checksum() itself is used).
        names = [name for name, _, _ in arrays_meta]
        if len(set(names)) == len(names) and all(dtype.byteorder in "=|" for _, dtype, _ in arrays_meta):
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
    """Hex digest of the content of ``arrays``: (name, dtype, shape, bytes) in sorted-name order.

    Independent of compression and of the mapping's order. Each array's bytes go through a
    128-bit multilinear hash (two 64-bit lanes, fixed odd keys, both lanes in one numpy pass:
    ~15 GB/s per core), and BLAKE2b combines names, dtypes, shapes and the lanes. It detects
    corruption and answers "is this the expected batch" with ~2**-64 odds of a false match per
    comparison; it is not meant to resist an adversary forging batches.
    """
    parts = []
    for name in sorted(arrays):
        arr = arrays[name]
        if type(arr) is not np.ndarray:
            arr = np.asarray(arr)
        dtype = arr.dtype
        if dtype.byteorder == _FOREIGN_ORDER:
            dtype = _native(dtype)
        parts.append(_descriptor(name, dtype.str, arr.shape))
        if arr.size:
            data = arr if arr.flags.c_contiguous and arr.dtype == dtype else np.ascontiguousarray(arr, dtype=dtype)
            parts.append(_multilinear(data.reshape(-1).view(np.uint8)))
    return hashlib.blake2b(b"".join(parts), digest_size=16).hexdigest()


_FOREIGN_ORDER = ">" if sys.byteorder == "little" else "<"
#: (name, dtype string, shape) → the JSON bytes the digest takes for them (names and shapes repeat).
_DESCRIPTORS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
_MAX_DESCRIPTORS = 4096


def _descriptor(name: str, dtype_str: str, shape: tuple[int, ...]) -> bytes:
    if type(name) is not str:  # only plain str keys are cached: 1 == True would share an entry
        return json.dumps([name, dtype_str, list(shape)]).encode()
    key = (name, dtype_str, shape)
    found = _DESCRIPTORS.get(key)
    if found is None:
        found = json.dumps([name, dtype_str, list(shape)]).encode()
        if len(_DESCRIPTORS) >= _MAX_DESCRIPTORS:
            _DESCRIPTORS.clear()
        _DESCRIPTORS[key] = found
    return found


_MASK = (1 << 64) - 1
_BLOCK_WORDS = 1 << 16


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


_KEYS = tuple(_splitmix64(np.arange(_BLOCK_WORDS + 1, dtype=np.uint64) + np.uint64(lane << 32)) | np.uint64(1)
              for lane in (1, 2))
#: Both lanes' keys as one (2, words) matrix: one pass over the data computes both lanes.
_KEYS2 = np.ascontiguousarray(np.stack(_KEYS))
_KEYS2.flags.writeable = False
_CHAIN = tuple(int(keys[-1]) for keys in _KEYS)  # multiplier chaining one block into the next
_TAIL = tuple(int(keys[0]) for keys in _KEYS)  # key of the zero-padded trailing partial word
#: Below this many words numpy's dot has less call overhead; above it einsum's unrolled loop is
#: ~1.8x faster. Both are exact sums mod 2**64, so the choice never changes the value.
_EINSUM_WORDS = 256


def _multilinear(data: np.ndarray) -> bytes:
    """Two 64-bit lanes of Σ word_i·key_i (mod 2**64) per 512 KiB block, chained across blocks."""
    size = len(data)
    words = size >> 3
    (c0, c1), (t0, t1) = _CHAIN, _TAIL
    h0 = h1 = size
    if words:
        w = data[: words * 8].view(np.uint64)
        for start in range(0, words, _BLOCK_WORDS):
            block = w[start:start + _BLOCK_WORDS]
            keys = _KEYS2[:, : len(block)]
            lanes = np.einsum("ij,j->i", keys, block) if len(block) >= _EINSUM_WORDS else np.dot(keys, block)
            d0, d1 = lanes.tolist()
            h0 = (h0 * c0 + d0) & _MASK
            h1 = (h1 * c1 + d1) & _MASK
    # the trailing partial word, zero-padded, read in native byte order
    tail = int.from_bytes(data[words * 8:].tobytes().ljust(8, b"\0"), sys.byteorder) if size & 7 else 0
    h0 = (h0 * c0 + tail * t0) & _MASK
    h1 = (h1 * c1 + tail * t1) & _MASK
    return h0.to_bytes(8, "little") + h1.to_bytes(8, "little")
