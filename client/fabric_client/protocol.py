"""The fabricd wire protocol: typed, versioned records shared by the daemon, its roles and trainers.

A message is a ZeroMQ multipart message. Its first frame is the *header*: a small JSON object
``{"t": <type>, "v": PROTOCOL_VERSION, ...fields}``; any further frames are the *payload*
(binary: Arrow IPC batches, numpy arrays), passed through without copying. On ROUTER sockets the
routing identity comes before the header and is handled by the caller.

Every record is a frozen :mod:`msgspec` Struct tagged with its type name, and every field has a
type *and* a range: steps, ranks, counts and list lengths are bounded (see
:mod:`fabric_client.limits`), nested records are Structs too, never free-form dicts. :func:`decode`
validates the version, the type and every field in one pass, and raises :class:`ProtocolError`
(never anything else, whatever the bytes: deep nesting, huge integers, NaN, unknown fields) for bad
input, so a receiver can count and drop a malformed message and keep serving. Handlers only ever
see valid records.

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

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Union

import msgspec

from .errors import ProtocolError
from .limits import MAX_DP_SIZE, MAX_LIST_ITEMS, MAX_MP_SIZE, MAX_NAME_CHARS, MAX_STEP

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
    "PlanUpdate",
    "PlanUpdated",
    "PlanShowRequest",
    "PlanShowReply",
    "StatusRequest",
    "StatusReply",
    "Locate",
    "Located",
    "RoleHello",
    "RoleStats",
    "RoleCounters",
    "TrainerPosition",
    "PlanRequest",
    "PlanReply",
    "SkipReport",
    "LossReport",
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
    FORBIDDEN = "forbidden"   # the caller's key may not send this message
    INTERNAL = "internal"


# --------------------------------------------------------------------------------------------
# Field types: a type and its range, checked at decode

#: A job, source, node or host name.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
#: A name that may be empty ("" means none).
OptName = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
#: A role id (``job/kind/...``) or an endpoint (``tcp://host:port``).
Ident = Annotated[str, msgspec.Meta(max_length=4 * MAX_NAME_CHARS)]
#: Free text meant for people: a reason, a version string.
Text = Annotated[str, msgspec.Meta(max_length=8192)]
#: A whole job spec (TOML text), or the path it came from.
SpecText = Annotated[str, msgspec.Meta(max_length=MAX_HEADER_BYTES // 2)]
Step = Annotated[int, msgspec.Meta(ge=0, le=MAX_STEP)]
#: The next step a trainer will consume: past the last step there is, at most.
NextStep = Annotated[int, msgspec.Meta(ge=0, le=MAX_STEP + 1)]
DpRank = Annotated[int, msgspec.Meta(ge=0, lt=MAX_DP_SIZE)]
MpRank = Annotated[int, msgspec.Meta(ge=0, lt=MAX_MP_SIZE)]
DpSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_DP_SIZE)]
MpSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_MP_SIZE)]
#: A non-negative counter or size (below 2^53, so it survives a float round trip).
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 53)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
Micro = Annotated[int, msgspec.Meta(ge=0, le=1 << 20)]
Credits = Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
Pid = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
Nonce = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
Units = Annotated[int, msgspec.Meta(ge=0, le=1 << 24)]  # units in one load request or reply
#: A source's index in its job spec (``source_ids`` in a batch).
SourceIndex = Annotated[int, msgspec.Meta(ge=0, lt=1 << 16)]
#: A sum of training losses: finite and non-negative (NaN fails the bounds).
LossSum = Annotated[float, msgspec.Meta(ge=0.0, le=1e30)]


def Bounded(tp: Any, n: int = MAX_LIST_ITEMS) -> Any:  # noqa: N802 (a type constructor)
    """``list[tp]`` of at most ``n`` items."""
    return Annotated[list[tp], msgspec.Meta(max_length=n)]


# --------------------------------------------------------------------------------------------
# Records


class Message(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True, kw_only=True):
    """Base of every wire record. Subclasses are tagged with their wire name (``TYPE``)."""

    TYPE: ClassVar[str] = ""
    #: the protocol version the sender speaks (keyword-only; always ``PROTOCOL_VERSION`` here)
    v: int = PROTOCOL_VERSION


_REGISTRY: dict[str, type[Message]] = {}
_DECODER: msgspec.json.Decoder | None = None
_ENCODER = msgspec.json.Encoder()


class _Version(msgspec.Struct):
    v: Any = PROTOCOL_VERSION


_VERSION_DECODER = msgspec.json.Decoder(_Version)


def message_types() -> dict[str, type[Message]]:
    """Every registered record type by wire name (for tests, tooling and fuzzing)."""
    return dict(_REGISTRY)


def encode(msg: Message, payload: Sequence[Any] = ()) -> list[Any]:
    """Return the frames of ``msg``: its JSON header, then ``payload`` unchanged (no copy)."""
    return [_ENCODER.encode(msg), *payload]


def decode(frames: Sequence[Any]) -> tuple[Message, list[Any]]:
    """Parse ``frames`` into ``(record, payload frames)``.

    Accepts ``bytes`` or ``zmq.Frame`` objects. Raises :class:`ProtocolError` for anything that
    is not a well-formed record of this protocol version, and nothing else.
    """
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED, "empty message")
    head = frames[0]
    raw = head.buffer if hasattr(head, "buffer") else head
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.MALFORMED, f"header frame of type {type(raw).__name__}")
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED, f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        msg = _DECODER.decode(raw)
    except msgspec.ValidationError as e:
        raise _refusal(raw, str(e)) from None
    except (msgspec.DecodeError, RecursionError, ValueError, TypeError, MemoryError) as e:
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not a JSON object of this protocol: {_short(e)}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION, f"protocol version {msg.v!r}, this side speaks {PROTOCOL_VERSION}")
    return msg, list(frames[1:])


def _refusal(raw: Any, reason: str) -> ProtocolError:
    """The ProtocolError for a header that is JSON but not a valid record: a version mismatch is
    named as such (another version's records may not validate here), a bad tag is an unknown type."""
    try:
        version = _VERSION_DECODER.decode(raw).v
    except (msgspec.MsgspecError, RecursionError, ValueError, TypeError):
        version = PROTOCOL_VERSION
    if version != PROTOCOL_VERSION:
        return ProtocolError(ErrorCode.VERSION, f"protocol version {_short(version)}, this side speaks {PROTOCOL_VERSION}")
    if reason.endswith("at `$.t`") or reason.startswith("Object missing required field `t`"):
        return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type: {_short(reason)}")
    return ProtocolError(ErrorCode.MALFORMED, _short(reason))


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Generic replies


class ErrorReply(Message, tag="error"):
    """A refusal: ``code`` is an :class:`ErrorCode` value, ``reason`` says what to fix."""

    code: OptName
    reason: Text


class Ok(Message, tag="ok"):
    """A request was applied."""



class Ping(Message, tag="ping"):
    """A liveness probe, answered with ``Pong`` carrying the same nonce."""

    nonce: Nonce = 0


class Pong(Message, tag="pong"):
    """The answer to ``Ping``."""

    nonce: Nonce = 0


# --------------------------------------------------------------------------------------------
# Trainers and fabricctl → daemon


class Hello(Message, tag="hello"):
    """First message of a peer; the daemon refuses another protocol version."""

    protocol: Count
    peer: OptName  # "trainer", "ctl", "role"


class Welcome(Message, tag="welcome"):
    protocol: Count
    node: Name
    daemon_version: Text


class SubmitJob(Message, tag="submit_job"):
    """Submit (or resubmit) a job spec. ``spec_path`` anchors relative source paths."""

    spec_toml: SpecText
    spec_path: SpecText


class JobAccepted(Message, tag="job_accepted"):
    job: Name
    fingerprint: OptName
    state: OptName


class CancelJob(Message, tag="cancel_job"):
    job: Name


class PlanUpdate(Message, tag="plan_update"):
    """Change a running job's plan from ``at_step`` on, for every rank (``fabricctl plan update``;
    leader only). ``sets``: ``PATH=VALUE`` strings, ``points``: ``step=S,weights={...}`` strings,
    parsed and validated by the leader against the job spec. Reply ``PlanUpdated``, or
    ``ErrorReply``: ``invalid_spec`` (the change does not apply), ``bad_request`` (``at_step`` is
    planned or delivered already: the reason names the first step still changeable),
    ``unknown_job``, ``not_ready``, ``not_leader``."""

    job: Name
    at_step: Step
    sets: Bounded(Text, 64) = []
    points: Bounded(Text, 64) = []


class PlanUpdated(Message, tag="plan_updated"):
    """The change is recorded (``seq`` in the log, by the leader of ``term``); ``frontier``: the
    first step that was still changeable; ``change``: what it does, in words."""

    job: Name
    at_step: Step
    seq: Count
    term: Count
    frontier: NextStep
    change: Text


class PlanShowRequest(Message, tag="plan_show"):
    """What a job's plan is made of (``fabricctl plan show``): reply ``PlanShowReply``."""

    job: Name


class PlanShowReply(Message, tag="plan_show_reply"):
    """The job's spec, its DP-size history and its logged plan changes (``plan_changed`` record
    data, in log order), and the first step still changeable as this daemon knows it: what an
    offline planner needs to predict the job's steps."""

    job: Name
    spec_toml: SpecText
    spec_origin: SpecText
    dp_history: Bounded(tuple[Step, DpSize], 4096) = []
    changes: Bounded(dict[str, Any], 4096) = []
    frontier: NextStep = 0


class StatusRequest(Message, tag="status"):
    """Ask a daemon for its status (``StatusReply``)."""


class StatusReply(Message, tag="status_reply"):
    status: dict[str, Any]


class Locate(Message, tag="locate"):
    """Which constructor serves this trainer rank? Answered ``not_ready`` while the job starts."""

    job: Name
    dp_rank: DpRank
    dp_size: DpSize
    mp_rank: MpRank = 0
    avoid: Bounded(Ident, 64) = []  # endpoints that just went silent
    host: OptName = ""  # the trainer's host: the leader places this rank's constructor on a daemon there


class Located(Message, tag="located", omit_defaults=True):
    job: Name
    fingerprint: OptName
    endpoint: Ident
    dp_size: DpSize
    mp_size: MpSize
    prefetch: Credits
    standby: bool = False  # the endpoint is the group's standby: its primary is down or starting
    #: the job's source names, by index (what a batch's ``source_ids`` point at)
    sources: Bounded(Name, 1 << 16) = []
    #: the same constructor on a Unix socket in its daemon's private directory (plaintext; only
    #: the daemon's user can enter it), for a trainer on that host running as that user; "" if none
    local_endpoint: Ident = ""


# --------------------------------------------------------------------------------------------
# Role processes → daemon


class RoleHello(Message, tag="role_hello"):
    """A role process announces itself and the endpoint it serves on."""

    role_id: Ident
    kind: Name
    endpoint: Ident
    pid: Pid


class TrainerPosition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one trainer rank's delivery stands on a constructor."""

    dp_rank: DpRank
    mp_rank: MpRank
    next_step: NextStep
    next_micro: Micro = 0
    credits: Credits = 0
    sent: Count = 0
    #: seconds the constructor held this trainer's whole credit window (it had nothing buffered
    #: or in flight: it waited for data), since it subscribed
    data_wait_s: Seconds = 0.0


class RoleCounters(msgspec.Struct, frozen=True, omit_defaults=True):
    """A role process's heartbeat counters. Every role sends the fields it keeps (constructors:
    builds, delivery and busy seconds; source loaders: requests, units, busy seconds); the rest
    stay at their defaults. Counters a newer role adds are ignored by an older daemon, never an
    error."""

    # constructors
    ranks: Bounded(DpRank, MAX_DP_SIZE) = []
    builds: Count = 0
    built_batches: Count = 0
    skipped_units: Count = 0
    load_retries: Count = 0
    hedged: Count = 0
    plans: Count = 0
    evicted_steps: Count = 0
    #: skips: failed loads retried, units reported, ranks held for skip records now, steps rebuilt
    #: because their records changed, and failed units of delivered micro-batches loaded again
    unit_retries: Count = 0
    skip_reports: Count = 0
    waiting_for_skips: Count = 0
    rebuilt_for_skips: Count = 0
    delivered_unit_reloads: Count = 0
    #: trainers subscribed now, and the last position of trainers that left (dp, mp, next_step)
    subscriptions: Bounded(TrainerPosition, MAX_DP_SIZE) = []
    departed: Bounded(tuple[DpRank, MpRank, NextStep], MAX_DP_SIZE) = []
    subscribes: Count = 0
    unsubscribes: Count = 0
    credits_received: Count = 0
    batches_sent: Count = 0
    bytes_sent: Count = 0
    tokens_sent: Count = 0
    heartbeats_sent: Count = 0
    unreachable_dropped: Count = 0
    eagain: Count = 0
    errors_replied: Count = 0
    #: per trainer served since the role started: (dp, mp, batches sent, data-wait seconds it reported)
    delivered: Bounded(tuple[DpRank, MpRank, Count, Seconds], MAX_DP_SIZE) = []
    #: per source: (load requests queued, load requests in flight to its workers)
    load_queues: Annotated[dict[Name, tuple[Count, Count]], msgspec.Meta(max_length=4096)] = {}
    #: source-loader workers connected now, and of them those on this node reached over a private
    #: Unix socket without CurveZMQ (fabricd.local_ipc)
    loader_links: Count = 0
    local_loader_links: Count = 0
    loss_reports: Count = 0
    # source loaders
    source: OptName = ""
    requests: Count = 0
    units: Count = 0
    failed_units: Count = 0
    #: source loaders: seconds spent serving requests; constructors: seconds their loop spent not
    #: waiting on its sockets (building, packing, sending)
    busy_s: Seconds = 0.0
    # every role
    malformed: Count = 0
    forbidden: Count = 0  # messages from a key that may not send them (a trainer of another job)
    sent: Count = 0


class RoleStats(Message, tag="role_stats"):
    """Periodic heartbeat of a role process with its counters."""

    role_id: Ident
    stats: RoleCounters


class PlanRequest(Message, tag="plan_request"):
    """A constructor asks for its ranks' share of one step's plan."""

    job: Name
    step: Step
    ranks: Bounded(DpRank, MAX_DP_SIZE)


class PlanReply(Message, tag="plan_reply"):
    """The plan rows of the requested ranks; payload: one frame per name in ``columns``."""

    job: Name
    step: Step
    dp_size: DpSize
    rows: Count
    columns: Bounded(Name, 32)
    dtypes: Bounded(Name, 32)
    num_micro: Bounded(Micro, MAX_DP_SIZE)  # per requested rank, in request order
    #: the units the log records as skipped at this step, committed records only, as
    #: ``(source index, sample_id, piece)``; the constructor drops exactly these (``fabricd.assemble``)
    skips: Bounded(tuple[Count, Count, Count], MAX_LIST_ITEMS) = []
    #: units reported as skipped at this step whose record is not committed yet (the leader's
    #: queue, the log's uncommitted tail): the constructor delivers none of them until the record
    #: is committed (then it drops them) or gone (then it delivers them)
    pending: Bounded(tuple[Count, Count, Count], MAX_LIST_ITEMS) = []
    #: sources whose units at this step are made under another context than the job spec's (a
    #: logged plan change of their bucket), as ``(source index, max_seq_len, long_samples)``: the
    #: constructor asks their loaders for units of that context
    contexts: Bounded(tuple[Count, Count, OptName], 4096) = []


class SkipReport(Message, tag="skip_report"):
    """A constructor skipped a unit that could not be read or decoded. ``dp_rank`` is the rank
    whose batch holds the unit: the leader refuses the report once a trainer of that rank is
    known to be past ``step`` (the batch was delivered with the unit by another constructor)."""

    job: Name
    step: Step
    source: Name
    sample_id: Count
    piece: Count
    reason: Text
    dp_rank: DpRank = 0


class LossReport(Message, tag="loss_report"):
    """Trainer → its constructor (on the stream) → its daemon → the leader: training losses per
    source, for online mixing (``[mixture] online`` in the job spec). ``losses`` holds (source
    index, loss sum, count) with ``count`` the samples (or tokens) the sum covers; a constructor
    merges its trainers' reports (``reports`` of them) before passing them on. Advisory: a lost
    report makes one policy round less informed and changes nothing delivered, because the
    policy's decisions are plan changes in the log. No reply."""

    job: Name
    step: Step
    losses: Bounded(tuple[SourceIndex, LossSum, Count], 1 << 16)
    dp_rank: DpRank = 0
    reports: Count = 1


class PoolsRequest(Message, tag="pools_request"):
    """A constructor asks where the source-loader workers of a job are."""

    job: Name


class PoolsReply(Message, tag="pools_reply"):
    """Source name → endpoints of its live source-loader workers."""

    job: Name
    pools: Annotated[dict[Name, Bounded(Ident, 4096)], msgspec.Meta(max_length=4096)]


class PeerMessage(Message, tag="peer"):
    """Daemon → daemon: one cluster message (lease, log replication, heartbeat) from ``sender``.

    ``kind`` names the typed record in ``fabricd.cluster.wire``; ``body`` is its fields, decoded
    and type-checked there (a bad body is a malformed message like any other).
    """

    sender: Name
    kind: Name
    body: msgspec.Raw


# --------------------------------------------------------------------------------------------
# Trainer ↔ data constructor


class Subscribe(Message, tag="subscribe"):
    """Start (or restart) delivery to one trainer from a position, with ``credits`` batches."""

    job: Name
    fingerprint: OptName
    dp_rank: DpRank
    mp_rank: MpRank
    next_step: NextStep
    next_micro: Micro
    credits: Credits
    #: the trainer's machine (:func:`fabric_client.machine.machine_id`; "" unknown): under
    #: ``compression = "auto"`` a constructor on the same machine sends uncompressed frames
    machine: OptName = ""


class Unsubscribe(Message, tag="unsubscribe"):
    """The trainer leaves this constructor (it moved to another replica, or it is done): drop its
    subscription now, rather than keep it (and keep building for it) until a send finds it gone."""

    job: Name
    dp_rank: DpRank
    mp_rank: MpRank


class Credit(Message, tag="credit"):
    """The trainer consumed batches: it may now hold ``credits`` more. ``wait_s``: the seconds
    the trainer spent waiting for data (blocked in the loader) since its previous ``Credit``;
    the constructor sums it per trainer for its daemon's metrics (0 from older trainers)."""

    job: Name
    dp_rank: DpRank
    mp_rank: MpRank
    credits: Credits
    wait_s: Seconds = 0.0


class Batch(Message, tag="batch"):
    """One micro-batch for one DP rank; payload: one Arrow IPC stream frame."""

    job: Name
    step: Step
    dp_rank: DpRank
    micro_batch: Micro
    num_micro_batches: Micro
    checksum: OptName
    samples: Count
    tokens: Count
    skipped: Count


class Heartbeat(Message, tag="heartbeat"):
    """Constructor → trainer while it has credits but nothing ready: proof of life."""

    job: Name
    next_step: NextStep


# --------------------------------------------------------------------------------------------
# Data constructor ↔ source loader


class LoadRequest(Message, tag="load_request"):
    """Load units of one source; payload: sample ids (int64) and pieces (int32) frames."""

    job: Name
    source: Name
    req_id: Count
    count: Units
    #: the context to make the units under (a plan change of the source's bucket); 0 and "": the
    #: job spec's
    max_seq_len: Count = 0
    long_samples: OptName = ""


class LoadReply(Message, tag="load_reply"):
    """Loaded units, in request order; ``errors`` lists ``[index, reason]`` of skipped ones.

    Payload frames (units concatenated; ``*_offsets`` are int64[count+1]): input_ids (int32),
    token_offsets, image_starts (int32, per image), image_offsets, pixels (uint8: rows of
    ``pixel_shape``, an image in fixed mode or a patch in native mode), pixel_offsets (rows),
    image_lengths (int32, per image), image_grids (int32, 3 per image), targets (int32; a unit
    has as many as tokens, or none), target_offsets.
    """

    job: Name
    source: Name
    req_id: Count
    count: Units
    pixel_shape: Bounded(Count, 3)
    errors: Bounded(tuple[Units, Text], 1 << 24) = []  # [index, reason]


def _register() -> None:
    global _DECODER
    pending = list(Message.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str):
            continue
        if tag in _REGISTRY:
            raise TypeError(f"message type {tag!r} registered twice")
        cls.TYPE = tag
        _REGISTRY[tag] = cls
    _DECODER = msgspec.json.Decoder(Union[tuple(_REGISTRY.values())])


_register()
