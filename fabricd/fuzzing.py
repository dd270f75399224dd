"""Well-formed and malformed wire records, generated from the records' own type declarations.

The protocol's records (:mod:`fabric_client.protocol`) and the cluster's peer messages
(:mod:`fabricd.cluster.wire`) declare every field's type and range; :mod:`msgspec.inspect` reads
those declarations back, so this module can build, for any record type, a *valid* instance (every
field inside its range) and *structured mutations* of it: each field in turn given a wrong type or
a value just outside its range or far outside any (2^62, 2^70, -1, NaN, huge lists, deep
nesting), plus damage to the frame itself (random bytes, truncation, extra frames, oversize
headers). ``scripts/fuzz.py``, the chaos suite's ``malformed_burst`` (:func:`burst`, :func:`send_burst`)
and the protocol tests draw from it, so the inputs follow the protocol as it changes, with nothing to keep in sync by hand.

Every mutation produced by :func:`field_mutations` is invalid by construction (a value its field's
type cannot hold); :func:`frame_damage` may now and then produce a valid record by chance
(random bytes rarely parse; a truncated header never does), so callers count replies, not
assume refusals, for those.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import msgspec.inspect as mi
import zmq
from fabric_client import protocol
from fabric_client.keys import ClientKeys
from fabric_client.sockets import SocketFactory

__all__ = ["valid_value", "valid_record", "field_mutations", "frame_damage", "header", "encode_raw", "burst",
           "send_burst", "BURST_TYPES"]

_DEEP = 100_000  # nesting depth of the deep-nesting mutation


def valid_value(t: mi.Type, rng: random.Random, depth: int = 0) -> Any:
    """A JSON-typed value that ``t`` accepts (lists kept short)."""
    if isinstance(t, mi.IntType):
        lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -(1 << 20))
        hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else 1 << 20)
        return rng.choice([lo, hi, rng.randint(lo, min(hi, lo + 1000))])
    if isinstance(t, mi.FloatType):
        lo = t.ge if t.ge is not None else 0.0
        hi = t.le if t.le is not None else 1e6
        return rng.uniform(lo, min(hi, lo + 1e3))
    if isinstance(t, mi.StrType):
        lo = t.min_length or 0
        hi = min(t.max_length if t.max_length is not None else 16, 16)
        return "".join(rng.choice("abcxyz-_/0123") for _ in range(rng.randint(max(lo, 1), max(hi, lo, 1))))
    if isinstance(t, mi.BoolType):
        return rng.random() < 0.5
    if isinstance(t, mi.BytesType):  # JSON carries bytes as base64 text
        return base64.b64encode(rng.randbytes(rng.randint(0, 16))).decode()
    if isinstance(t, mi.NoneType):
        return None
    if isinstance(t, (mi.ListType, mi.VarTupleType)):
        n = 0 if depth > 3 else rng.randint(t.min_length or 0, min(t.max_length if t.max_length is not None else 3, 3))
        return [valid_value(t.item_type, rng, depth + 1) for _ in range(n)]
    if isinstance(t, mi.TupleType):
        return [valid_value(x, rng, depth + 1) for x in t.item_types]
    if isinstance(t, mi.DictType):
        n = 0 if depth > 3 else rng.randint(0, 2)
        key = t.key_type if isinstance(t.key_type, mi.StrType) else mi.StrType()
        return {valid_value(key, rng, depth + 1): valid_value(t.value_type, rng, depth + 1) for _ in range(n)}
    if isinstance(t, mi.UnionType):
        return valid_value(rng.choice(t.types), rng, depth)
    if isinstance(t, (mi.StructType, mi.DataclassType)):
        return _valid_fields(t, rng, depth + 1)
    if isinstance(t, (mi.AnyType, mi.RawType)):
        return {}
    if isinstance(t, mi.LiteralType):
        return rng.choice(t.values)
    raise TypeError(f"no generator for {t!r}")


def _valid_fields(t: mi.StructType | mi.DataclassType, rng: random.Random, depth: int) -> dict[str, Any]:
    out = {}
    for f in t.fields:
        if f.name == "v" and isinstance(t, mi.StructType) and t.tag_field == "t":
            continue  # the protocol version is added by header()
        if f.required or rng.random() < 0.5:
            out[f.encode_name] = valid_value(f.type, rng, depth)
    if isinstance(t, mi.StructType) and t.tag_field is not None:
        out[t.tag_field] = t.tag
    return out


def valid_record(cls: type, rng: random.Random) -> dict[str, Any]:
    """The JSON fields of a valid instance of ``cls`` (a protocol record or a peer message)."""
    return _valid_fields(mi.type_info(cls), rng, 0)


def _invalid_values(t: mi.Type) -> list[Any]:
    """Values no field of type ``t`` accepts: wrong JSON types, and out-of-range extremes."""
    wrong_type = {
        mi.IntType: ["7", 1.5, None, [], {}, True],
        mi.FloatType: ["1.0", None, [], {}, True],
        mi.StrType: [5, None, [], {}, True],
        mi.BoolType: [1, "true", None, []],
        mi.ListType: [5, "x", {}, None],
        mi.TupleType: [5, "x", {}, None],
        mi.DictType: [[], 5, "x", None],
    }
    if isinstance(t, (mi.StructType, mi.DataclassType)):
        return [[], 5, "x", None]
    values = list(wrong_type.get(type(t), []))
    if isinstance(t, mi.IntType):
        values += [2**70, -(2**70)]
        if t.ge is not None or t.gt is not None:
            values.append((t.ge if t.ge is not None else t.gt + 1) - 1)  # just below the range
        if t.le is not None or t.lt is not None:
            values.append((t.le if t.le is not None else t.lt - 1) + 1)  # just above it
    if isinstance(t, mi.FloatType) and (t.ge is not None or t.le is not None):
        values += [-1e300 if t.ge is not None else 1e300, _NAN]
    if isinstance(t, mi.StrType) and t.max_length is not None and t.max_length < 100_000:
        values.append("x" * (t.max_length + 1))
    if isinstance(t, (mi.ListType, mi.VarTupleType)) and t.max_length is not None and t.max_length < 300_000:
        item = 0 if isinstance(t.item_type, mi.IntType) and t.item_type.ge in (None, 0) else None
        values.append(_Many(item, t.max_length + 1))
    values.append(_Deep())
    return values


class _Deep:
    """Placeholder for ``[[[[...]]]]`` nested ``_DEEP`` times (spliced in as raw text)."""


class _Many:
    """Placeholder for a list of ``n`` copies of ``item`` (spliced in as raw text)."""

    def __init__(self, item: Any, n: int) -> None:
        self.item, self.n = item, n


_NAN = object()  # spliced in as the (non-JSON) token NaN


def header(fields: dict[str, Any]) -> bytes:
    """The header frame for ``fields``, with the placeholders above spliced in as raw JSON text."""
    raws: dict[str, bytes] = {}

    def place(value: Any) -> Any:
        if isinstance(value, _Deep):
            key = f"@@{len(raws)}@@"
            raws[key] = b"[" * _DEEP + b"]" * _DEEP
            return key
        if isinstance(value, _Many):
            key = f"@@{len(raws)}@@"
            raws[key] = b"[" + b",".join([json.dumps(value.item).encode()] * value.n) + b"]"
            return key
        if value is _NAN:
            key = f"@@{len(raws)}@@"
            raws[key] = b"NaN"
            return key
        return value

    text = json.dumps({"v": protocol.PROTOCOL_VERSION, **{k: place(v) for k, v in fields.items()}},
                      separators=(",", ":")).encode()
    for key, raw in raws.items():
        text = text.replace(json.dumps(key).encode(), raw, 1)
    return text


def field_mutations(cls: type, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """``(description, header)`` for every field of ``cls`` in turn given each invalid value; the
    other fields valid. Each header is a record that must be refused (``ProtocolError``)."""
    info = mi.type_info(cls)
    base = _valid_fields(info, rng, 0)
    for f in info.fields:
        if f.name == "v":
            continue
        for bad in _invalid_values(f.type):
            fields = dict(base)
            fields[f.encode_name] = bad
            yield f"{getattr(info, 'tag', None) or cls.__name__}.{f.name}={_describe(bad)}", header(fields)


def _describe(value: Any) -> str:
    if isinstance(value, _Deep):
        return "deep-nesting"
    if isinstance(value, _Many):
        return f"list[{value.n}]"
    if value is _NAN:
        return "NaN"
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} chars)"


def frame_damage(frames: list[bytes], rng: random.Random) -> tuple[str, list[bytes]]:
    """One kind of damage to a whole message: random bytes, a truncated or oversize header,
    an extra or missing frame, a header that is a JSON array, a replayed version mismatch."""
    head = frames[0] if frames else b"{}"
    choice = rng.randrange(8)
    if choice == 0:
        return "random-bytes", [rng.randbytes(rng.randint(0, 512))]
    if choice == 1:
        return "truncated", [head[: rng.randint(0, max(len(head) - 1, 0))], *frames[1:]]
    if choice == 2:
        return "extra-frames", [*frames, *(rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 4)))]
    if choice == 3:
        return "oversize", [b" " * (protocol.MAX_HEADER_BYTES + 1) + b"{}"]
    if choice == 4:
        return "empty", []
    if choice == 5:
        return "json-array", [b"[" + head + b"]"]
    if choice == 6:
        return "other-version", [head.replace(b'"v":1', b'"v":99', 1)]
    return "deep", [b"[" * _DEEP + b"]" * _DEEP]


def encode_raw(fields: dict[str, Any]) -> msgspec.Raw:
    """``fields`` as raw JSON (a ``PeerMessage.body``), placeholders spliced in."""
    text = header(fields)
    # header() adds the protocol version: a peer body has none
    return msgspec.Raw(text.replace(b'"v":%d,' % protocol.PROTOCOL_VERSION, b"", 1))


#: Record types a daemon's control socket and a constructor's trainer socket take.
BURST_TYPES = ("hello", "ping", "submit_job", "cancel_job", "status", "locate", "role_hello", "role_stats",
               "plan_request", "pools_request", "skip_report", "peer", "subscribe", "credit", "unsubscribe")


def burst(rng: random.Random, *, count: int = 68, types: tuple[str, ...] = BURST_TYPES) -> list[list[bytes]]:
    """A burst of ``count`` malformed messages (lists of frames): field mutations of ``types``,
    damaged frames, random bytes. None is a valid record, so none can change what a trainer gets."""
    pool = [h for t in types for _, h in field_mutations(protocol.message_types()[t], rng)]
    out: list[list[bytes]] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.2:
            out.append([rng.randbytes(rng.randint(0, 2048)) for _ in range(rng.randint(1, 3))])
        elif roll < 0.4:
            damage, frames = frame_damage([rng.choice(pool)], rng)
            out.append(frames or [b""])
        else:
            out.append([rng.choice(pool)])
    return out


def send_burst(endpoint: str, messages: list[list[bytes]], *, context: zmq.Context | None = None,
               linger_s: float = 2.0, keys: ClientKeys | None = None) -> int:
    """Send ``messages`` from one DEALER to ``endpoint`` (authenticated with ``keys``: the hostile
    insider, whose messages get past the handshake to the decoders), drain whatever comes back for
    ``linger_s`` (so replies do not pile up at the receiver), and return how many replies came."""
    ctx = context or zmq.Context.instance()
    sock = SocketFactory(ctx, keys=keys).dealer(hwm=10_000)
    replies = 0
    try:
        sock.connect(endpoint)
        for frames in messages:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.01)
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline:
            if sock.poll(50):
                sock.recv_multipart()
                replies += 1
    finally:
        sock.close(linger=0)
    return replies
