"""The fabricd wire protocol: typed, versioned records shared by the daemon, its roles and trainers.

A message is a ZeroMQ multipart message. Its first frame is the *header*: a small JSON object
``{"v": PROTOCOL_VERSION, "t": <type>, ...fields}``; any further frames are the *payload*
(binary: Arrow IPC batches, numpy arrays), passed through without copying. On ROUTER sockets the
routing identity comes before the header and is handled by the caller.

Every record is a frozen dataclass registered under its type name. :func:`decode` validates the
version, the type and every field's type, and raises :class:`ProtocolError` (never anything else)
for bad input, so a receiver can count and drop a malformed message and keep serving.

Conversations (request → reply):

- trainer/ctl → daemon: ``Hello`` → ``Welcome``; ``Locate`` → ``Located``; ``SubmitJob`` →
  ``JobAccepted``; ``StatusRequest`` → ``StatusReply``; ``CancelJob`` → ``Ok``.
- role → daemon: ``RoleHello`` → ``Ok``; ``RoleStats`` (no reply); ``PlanRequest`` → ``PlanReply``
  (+ one frame per plan column); ``PoolsRequest`` → ``PoolsReply``; ``SkipReport`` (no reply).
- trainer → constructor: ``Subscribe`` → ``Batch`` (+ one Arrow IPC frame) as credits allow,
  ``Heartbeat`` while nothing is ready; ``Credit`` grants more.
- constructor → source loader: ``LoadRequest`` (+ sample id and piece frames) → ``LoadReply``
  (+ sample frames).

Any request may instead be answered with ``ErrorReply(code, reason)``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

from .errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_HEADER_BYTES",
    "ErrorCode",
    "Message",
    "encode",
    "decode",
    "message_types",
    "Hello",
    "Welcome",
    "ErrorReply",
    "Ok",
    "Ping",
    "Pong",
    "SubmitJob",
    "JobAccepted",
    "CancelJob",
    "StatusRequest",
    "StatusReply",
    "Locate",
    "Located",
    "RoleHello",
    "RoleStats",
    "PlanRequest",
    "PlanReply",
    "SkipReport",
    "PoolsRequest",
    "PoolsReply",
    "PeerMessage",
    "Subscribe",
    "Credit",
    "Unsubscribe",
    "Batch",
    "Heartbeat",
    "LoadRequest",
    "LoadReply",
]

PROTOCOL_VERSION = 1
#: Largest header frame accepted; headers are small JSON objects, payloads travel in other frames.
MAX_HEADER_BYTES = 1 << 20


class ErrorCode:
    """The ``code`` values of ``ErrorReply`` and ``ProtocolError``."""

    MALFORMED = "malformed"
    VERSION = "version"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_JOB = "unknown_job"
    NOT_READY = "not_ready"
    BAD_REQUEST = "bad_request"
    INVALID_SPEC = "invalid_spec"
    STALE = "stale"
    NOT_LEADER = "not_leader"
    INTERNAL = "internal"


_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound="Message")


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every wire record. Subclasses set ``TYPE`` and declare JSON-typed fields."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            if cls.TYPE in _REGISTRY:
                raise TypeError(f"message type {cls.TYPE!r} registered twice")
            _REGISTRY[cls.TYPE] = cls


def message_types() -> dict[str, type[Message]]:
    """Every registered record type by wire name (for tests and tooling)."""
    return dict(_REGISTRY)


def encode(msg: Message, payload: Sequence[Any] = ()) -> list[Any]:
    """Return the frames of ``msg``: its JSON header, then ``payload`` unchanged (no copy)."""
    header = {"v": PROTOCOL_VERSION, "t": msg.TYPE}
    for f in dataclasses.fields(msg):
        header[f.name] = getattr(msg, f.name)
    return [json.dumps(header, separators=(",", ":")).encode(), *payload]


def decode(frames: Sequence[Any]) -> tuple[Message, list[Any]]:
    """Parse ``frames`` into ``(record, payload frames)``.

    Accepts ``bytes`` or ``zmq.Frame`` objects. Raises :class:`ProtocolError` for anything that
    is not a well-formed record of this protocol version.
    """
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED, "empty message")
    head = frames[0]
    raw = head.bytes if hasattr(head, "bytes") else head
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.MALFORMED, f"header frame of type {type(raw).__name__}")
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED, f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not JSON: {e}") from e
    except RecursionError:  # "[" * 100000: nested deeper than the parser's stack
        raise ProtocolError(ErrorCode.MALFORMED, "header nests too deep") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"header is a {type(header).__name__}, not an object")
    version = header.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION, f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}"
        )
    name = header.pop("t", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {name!r}")
    kwargs = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in header:
            value = header.pop(f.name)
            if not _conforms(value, hints[f.name]):
                raise ProtocolError(
                    ErrorCode.MALFORMED, f"{name}.{f.name} = {_short(value)} is not {_type_name(hints[f.name])}"
                )
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(ErrorCode.MALFORMED, f"{name} lacks field {f.name!r}")
    if header:
        raise ProtocolError(ErrorCode.MALFORMED, f"{name} has unknown fields {sorted(header)}")
    return cls(**kwargs), list(frames[1:])


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _conforms(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_conforms(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (arg,) = typing.get_args(tp)
        return isinstance(value, list) and all(_conforms(v, arg) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    raise TypeError(f"unsupported field type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------
# Generic replies


@dataclasses.dataclass(frozen=True)
class ErrorReply(Message):
    """A refusal: ``code`` is an :class:`ErrorCode` value, ``reason`` says what to fix."""

    TYPE: ClassVar[str] = "error"
    code: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Ok(Message):
    """A request was applied."""

    TYPE: ClassVar[str] = "ok"


@dataclasses.dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    nonce: int = 0


@dataclasses.dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    nonce: int = 0


# --------------------------------------------------------------------------------------------
# Trainers and fabricctl → daemon


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    """First message of a peer; the daemon refuses another protocol version."""

    TYPE: ClassVar[str] = "hello"
    protocol: int
    peer: str  # "trainer", "ctl", "role"


@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    protocol: int
    node: str
    daemon_version: str


@dataclasses.dataclass(frozen=True)
class SubmitJob(Message):
    """Submit (or resubmit) a job spec. ``spec_path`` anchors relative source paths."""

    TYPE: ClassVar[str] = "submit_job"
    spec_toml: str
    spec_path: str


@dataclasses.dataclass(frozen=True)
class JobAccepted(Message):
    TYPE: ClassVar[str] = "job_accepted"
    job: str
    fingerprint: str
    state: str


@dataclasses.dataclass(frozen=True)
class CancelJob(Message):
    TYPE: ClassVar[str] = "cancel_job"
    job: str


@dataclasses.dataclass(frozen=True)
class StatusRequest(Message):
    TYPE: ClassVar[str] = "status"


@dataclasses.dataclass(frozen=True)
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    status: dict


@dataclasses.dataclass(frozen=True)
class Locate(Message):
    """Which constructor serves this trainer rank? Answered ``not_ready`` while the job starts."""

    TYPE: ClassVar[str] = "locate"
    job: str
    dp_rank: int
    dp_size: int
    mp_rank: int = 0
    avoid: list[str] = dataclasses.field(default_factory=list)  # endpoints that just went silent
    host: str = ""  # the trainer's host: the leader places this rank's constructor on a daemon there


@dataclasses.dataclass(frozen=True)
class Located(Message):
    TYPE: ClassVar[str] = "located"
    job: str
    fingerprint: str
    endpoint: str
    dp_size: int
    mp_size: int
    prefetch: int
    standby: bool = False  # the endpoint is the group's standby: its primary is down or starting


# --------------------------------------------------------------------------------------------
# Role processes → daemon


@dataclasses.dataclass(frozen=True)
class RoleHello(Message):
    """A role process announces itself and the endpoint it serves on."""

    TYPE: ClassVar[str] = "role_hello"
    role_id: str
    kind: str
    endpoint: str
    pid: int


@dataclasses.dataclass(frozen=True)
class RoleStats(Message):
    """Periodic heartbeat of a role process with its counters."""

    TYPE: ClassVar[str] = "role_stats"
    role_id: str
    stats: dict


@dataclasses.dataclass(frozen=True)
class PlanRequest(Message):
    """A constructor asks for its ranks' share of one step's plan."""

    TYPE: ClassVar[str] = "plan_request"
    job: str
    step: int
    ranks: list[int]


@dataclasses.dataclass(frozen=True)
class PlanReply(Message):
    """The plan rows of the requested ranks; payload: one frame per name in ``columns``.

    ``skips``: the units the log records as skipped at this step (committed records only); the
    constructor drops exactly these (see ``fabricd.assemble``)."""

    TYPE: ClassVar[str] = "plan_reply"
    job: str
    step: int
    dp_size: int
    rows: int
    columns: list[str]
    dtypes: list[str]
    num_micro: list[int]  # per requested rank, in request order
    # the step's committed skip records, [source index, sample_id, piece] (at most MAX_LIST_ITEMS)
    skips: list[list[int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class SkipReport(Message):
    """A constructor skipped a unit that could not be read or decoded."""

    TYPE: ClassVar[str] = "skip_report"
    job: str
    step: int
    source: str
    sample_id: int
    piece: int
    reason: str


@dataclasses.dataclass(frozen=True)
class PoolsRequest(Message):
    """A constructor asks where the source-loader workers of a job are."""

    TYPE: ClassVar[str] = "pools_request"
    job: str


@dataclasses.dataclass(frozen=True)
class PoolsReply(Message):
    """Source name → endpoints of its live source-loader workers."""

    TYPE: ClassVar[str] = "pools_reply"
    job: str
    pools: dict


@dataclasses.dataclass(frozen=True)
class PeerMessage(Message):
    """Daemon → daemon: one cluster message (lease, log replication, heartbeat) from ``sender``.

    ``kind`` names the typed record in ``fabricd.cluster.wire``; ``body`` is its fields, decoded
    and type-checked there (a bad body is a malformed message like any other).
    """

    TYPE: ClassVar[str] = "peer"
    sender: str
    kind: str
    body: dict


# --------------------------------------------------------------------------------------------
# Trainer ↔ data constructor


@dataclasses.dataclass(frozen=True)
class Subscribe(Message):
    """Start (or restart) delivery to one trainer from a position, with ``credits`` batches."""

    TYPE: ClassVar[str] = "subscribe"
    job: str
    fingerprint: str
    dp_rank: int
    mp_rank: int
    next_step: int
    next_micro: int
    credits: int


@dataclasses.dataclass(frozen=True)
class Unsubscribe(Message):
    """The trainer leaves this constructor (it moved to another replica, or it is done): drop its
    subscription now, rather than keep it (and keep building for it) until a send finds it gone."""

    TYPE: ClassVar[str] = "unsubscribe"
    job: str
    dp_rank: int
    mp_rank: int


@dataclasses.dataclass(frozen=True)
class Credit(Message):
    """The trainer consumed batches: it may now hold ``credits`` more."""

    TYPE: ClassVar[str] = "credit"
    job: str
    dp_rank: int
    mp_rank: int
    credits: int


@dataclasses.dataclass(frozen=True)
class Batch(Message):
    """One micro-batch for one DP rank; payload: one Arrow IPC stream frame."""

    TYPE: ClassVar[str] = "batch"
    job: str
    step: int
    dp_rank: int
    micro_batch: int
    num_micro_batches: int
    checksum: str
    samples: int
    tokens: int
    skipped: int


@dataclasses.dataclass(frozen=True)
class Heartbeat(Message):
    """Constructor → trainer while it has credits but nothing ready: proof of life."""

    TYPE: ClassVar[str] = "heartbeat"
    job: str
    next_step: int


# --------------------------------------------------------------------------------------------
# Data constructor ↔ source loader


@dataclasses.dataclass(frozen=True)
class LoadRequest(Message):
    """Load units of one source; payload: sample ids (int64) and pieces (int32) frames."""

    TYPE: ClassVar[str] = "load_request"
    job: str
    source: str
    req_id: int
    count: int


@dataclasses.dataclass(frozen=True)
class LoadReply(Message):
    """Loaded units, in request order; ``errors`` lists ``[index, reason]`` of skipped ones.

    Payload frames: input_ids (int32, all units concatenated), token_offsets (int64[count+1]),
    image_starts (int32, all units), image_offsets (int64[count+1]), pixels (uint8, all images).
    """

    TYPE: ClassVar[str] = "load_reply"
    job: str
    source: str
    req_id: int
    count: int
    image_size: int
    errors: list[list[Any]]
