"""TrainerSession, the Loader's decisions, driven by a fake clock without sockets.

Every test plays the daemon and the constructor by hand: it feeds the session replies,
messages and the time, and checks the actions it returns (what to send, where, when to give up).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from fabric_client import protocol
from fabric_client.errors import BatchIntegrityError, FabricUnavailable, ProtocolError, RemoteError
from fabric_client.protocol import PROTOCOL_VERSION, ErrorCode
from fabric_client.session import (
    MAX_PREFETCH,
    PROBE_TIMEOUT_S,
    AskDaemon,
    CloseStream,
    Decode,
    Fail,
    HandOut,
    HangUp,
    OpenStream,
    ReturnCredit,
    TrainerSession,
    valid_endpoint,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

JOB = "job-a"
FP = "fp-1"
DAEMONS = ["tcp://d0:7700", "tcp://d1:7700"]
PRIMARY = "tcp://10.0.0.1:9001"
STANDBY = "tcp://10.0.0.2:9002"


def num_micro(step: int) -> int:
    return 1 + step % 3


def header(step: int, micro: int, *, job: str = JOB, rank: int = 0, num: int | None = None) -> protocol.Batch:
    return protocol.Batch(job=job, step=step, dp_rank=rank, micro_batch=micro,
                          num_micro_batches=num_micro(step) if num is None else num,
                          checksum="c" * 64, samples=1, tokens=1, skipped=0)


def located(endpoint: str = PRIMARY, *, standby: bool = False, prefetch: int = 3, job: str = JOB,
            dp_size: int = 2, mp_size: int = 1) -> protocol.Located:
    return protocol.Located(job=job, fingerprint=FP, endpoint=endpoint, dp_size=dp_size, mp_size=mp_size,
                            prefetch=prefetch, standby=standby)


WELCOME = protocol.Welcome(protocol=PROTOCOL_VERSION, node="d", daemon_version="0")


def kinds(actions: list[Any]) -> list[type]:
    return [type(a) for a in actions]


class Trainer:
    """A session plus the fake clock; helpers play the daemon's and the constructor's parts."""

    def __init__(self, **kw: Any) -> None:
        opts = dict(job=JOB, dp_rank=0, dp_size=2, host="gpu-1", deadline_s=20.0, stall_s=2.0,
                    primary_check_s=3.0, ahead=4)
        opts.update(kw)
        self.s = TrainerSession(DAEMONS, **opts)
        self.now = 100.0

    def at(self, t: float) -> float:
        self.now = t
        return t

    def connect(self, where: protocol.Located | None = None) -> OpenStream:
        """want → tick → Hello → Welcome → Locate → Located: returns the OpenStream."""
        s = self.s
        s.want(self.now)
        (hello,) = s.tick(self.now)
        assert isinstance(hello, AskDaemon) and isinstance(hello.request, protocol.Hello) and hello.new_connection
        (loc,) = s.on_daemon_reply(WELCOME, self.now)
        assert isinstance(loc, AskDaemon) and isinstance(loc.request, protocol.Locate) and not loc.new_connection
        out = s.on_daemon_reply(where or located(), self.now)
        assert kinds(out) == [HangUp, OpenStream]
        return out[1]

    def feed(self, step: int, micro: int, **kw: Any) -> list[Any]:
        return self.s.on_stream_message(header(step, micro, **kw), [b"frame"], self.now)

    def take(self) -> list[Any]:
        """The trainer gets the next batch (it must be pending): the actions of the hand-out."""
        s = self.s
        s.want(self.now)
        (out,) = s.tick(self.now)
        assert isinstance(out, HandOut)
        return s.on_handed_out(out.received, 10, self.now)


# ------------------------------------------------------------------------------ locating


def test_locate_then_subscribe_from_the_cursor_with_the_window() -> None:
    t = Trainer()
    assert t.s.seek(5, 1) == []  # no stream yet: nothing to drop
    t.s.want(t.now)
    (hello,) = t.s.tick(t.now)
    assert hello.address == DAEMONS[0] and hello.reply_by == t.now + 2.0  # min(stall_s, deadline)
    (loc,) = t.s.on_daemon_reply(WELCOME, t.now)
    assert loc.request == protocol.Locate(job=JOB, dp_rank=0, dp_size=2, mp_rank=0, avoid=[], host="gpu-1")
    hang_up, opened = t.s.on_daemon_reply(located(prefetch=3), t.now)
    assert isinstance(hang_up, HangUp)
    assert opened == OpenStream(PRIMARY, protocol.Subscribe(job=JOB, fingerprint=FP, dp_rank=0, mp_rank=0,
                                                            next_step=5, next_micro=1, credits=3))
    assert t.s.stats["locates"] == 1 and t.s.stats["endpoint"] == PRIMARY and t.s.outstanding == 3


@pytest.mark.parametrize("given, daemon, window", [(None, 3, 3), (None, 0, 4), (None, -7, 4),
                                                   (None, 10**9, MAX_PREFETCH), (2, 10**9, 2)])
def test_window_comes_from_the_caller_else_the_daemon_within_bounds(given, daemon, window) -> None:
    t = Trainer(prefetch=given)
    opened = t.connect(located(prefetch=daemon))
    assert opened.subscribe.credits == window == t.s.window == t.s.outstanding


def test_silent_daemons_are_asked_in_turn_with_growing_pauses_until_the_deadline() -> None:
    t = Trainer(deadline_s=5.0, stall_s=0.5)
    t.s.want(t.now)
    asked, pauses, fail = [], [], None
    actions = t.s.tick(t.now)
    for _ in range(1000):
        if not actions:  # between rounds: the session says when to go on
            assert t.s.wake_at > t.now
            pauses.append(round(t.s.wake_at - t.now, 6))
            t.at(t.s.wake_at)
            actions = t.s.tick(t.now)
            continue
        action = actions.pop(0)
        if isinstance(action, Fail):
            fail = action.error
            break
        if isinstance(action, AskDaemon):
            asked.append(action.address)
            t.at(action.reply_by)  # nobody answers
            out = t.s.on_daemon_silent(t.now)
            assert isinstance(out[0], HangUp)  # lazy pirate: the socket that may hold a late reply goes
            actions += out
    assert isinstance(fail, FabricUnavailable)
    assert "could not locate the constructor" in str(fail) and "no reply to hello within" in str(fail)
    assert all(a in str(fail) for a in DAEMONS)
    assert asked[:4] == DAEMONS * 2
    assert pauses[:3] == [0.05, 0.1, 0.2]  # backoff doubles between rounds...
    assert len(asked) <= 12  # ...and 5 s of silence cost a bounded number of requests
    assert t.now <= 100.0 + 5.0 + 1e-9


def test_retryable_refusals_move_on_and_others_raise_at_once() -> None:
    t = Trainer()
    t.s.want(t.now)
    t.s.tick(t.now)
    out = t.s.on_daemon_reply(protocol.ErrorReply(code=ErrorCode.NOT_READY, reason="starting"), t.now)
    assert isinstance(out[0], HangUp) and out[1].address == DAEMONS[1]
    out = t.s.on_daemon_reply(protocol.ErrorReply(code=ErrorCode.INVALID_SPEC, reason="bad spec"), t.now)
    assert isinstance(out[-1], Fail) and isinstance(out[-1].error, RemoteError)
    assert out[-1].error.code == ErrorCode.INVALID_SPEC
    # a daemon of another protocol version: raised, not retried
    t.s.want(t.now)
    t.s.tick(t.now)
    out = t.s.on_daemon_garbled(ProtocolError(ErrorCode.VERSION, "version 9"), t.now)
    assert isinstance(out[-1].error, RemoteError) and out[-1].error.code == ErrorCode.VERSION


@pytest.mark.parametrize("reply", [
    protocol.Ok(),
    located(),                                   # a Located in reply to Hello
    protocol.ErrorReply(code=ErrorCode.STALE, reason="x"),
])
def test_a_wrong_reply_to_hello_asks_the_next_daemon(reply) -> None:
    t = Trainer()
    t.s.want(t.now)
    t.s.tick(t.now)
    out = t.s.on_daemon_reply(reply, t.now)
    assert kinds(out) == [HangUp, AskDaemon] and out[1].address == DAEMONS[1]
    assert isinstance(out[1].request, protocol.Hello)


@pytest.mark.parametrize("reply, error", [
    (WELCOME, "unexpected 'welcome'"),
    (located(job="other-job"), "located job other-job"),
    (located(endpoint="garbage"), "unusable endpoint"),
    (located(endpoint="tcp://host-without-port"), "unusable endpoint"),
    (located(endpoint="tcp://h:99999"), "unusable endpoint"),
    (located(endpoint="tcp://h:1 ; rm"), "unusable endpoint"),
    (located(endpoint="tcp://" + "h" * 5000 + ":1"), "unusable endpoint"),
    (located(endpoint=""), "unusable endpoint"),
])
def test_an_unusable_reply_to_locate_is_counted_and_the_next_daemon_asked(reply, error) -> None:
    t = Trainer()
    t.s.want(t.now)
    t.s.tick(t.now)
    t.s.on_daemon_reply(WELCOME, t.now)
    out = t.s.on_daemon_reply(reply, t.now)
    assert kinds(out) == [HangUp, AskDaemon] and out[1].address == DAEMONS[1]
    assert t.s.stats["bad_replies"] == 1 and error in t.s.last_error and not t.s.streaming
    assert len(t.s.last_error) < 400  # a 5000-char endpoint is not copied into every error


def test_a_located_for_another_world_size_is_a_configuration_error() -> None:
    t = Trainer()
    t.s.want(t.now)
    t.s.tick(t.now)
    t.s.on_daemon_reply(WELCOME, t.now)
    out = t.s.on_daemon_reply(located(dp_size=4), t.now)
    assert isinstance(out[-1], Fail) and isinstance(out[-1].error, RemoteError)
    assert "dp_size 4" in str(out[-1].error)


def test_replies_nobody_asked_for_are_ignored() -> None:
    t = Trainer()
    assert t.s.on_daemon_reply(located(), t.now) == []
    assert t.s.on_daemon_silent(t.now) == []
    assert t.s.on_daemon_garbled(ProtocolError(ErrorCode.MALFORMED, "x"), t.now) == []
    assert t.s.on_stream_message(header(0, 0), [b"f"], t.now) == [] and t.s.pending == 0


def test_endpoint_syntax() -> None:
    good = ["tcp://127.0.0.1:5555", "tcp://node-a.example:1", "tcp://[::1]:7000", "ipc:///tmp/x", "inproc://c"]
    bad = ["", "tcp://", "tcp://h", "tcp://h:0", "tcp://h:65536", "udp://h:1", "tcp://a b:1", None, 5]
    assert all(valid_endpoint(e) for e in good)
    assert not any(valid_endpoint(e) for e in bad)


# ------------------------------------------------------------------------------ the stream


def test_batches_come_out_in_order_and_each_returns_its_credit() -> None:
    t = Trainer()
    t.connect()
    assert kinds(t.feed(0, 0)) == [Decode]
    assert kinds(t.feed(1, 0)) == [Decode]
    assert t.s.outstanding == 1 and t.s.pending == 2
    assert kinds(t.take()) == [ReturnCredit]
    assert (t.s.next_step, t.s.next_micro) == (1, 0)
    assert kinds(t.take()) == [ReturnCredit]
    assert (t.s.next_step, t.s.next_micro) == (1, 1)  # step 1 has two micro-batches
    assert t.s.outstanding == 3 and t.s.stats["batches"] == 2 and t.s.stats["wire_bytes"] == 10


def test_duplicates_and_out_of_order_batches_are_dropped_and_their_credits_returned() -> None:
    t = Trainer(prefetch=5)
    t.connect()
    assert kinds(t.feed(0, 0)) == [Decode]
    assert kinds(t.feed(0, 0)) == [ReturnCredit]   # duplicate
    assert kinds(t.feed(2, 0)) == [ReturnCredit]   # skips (1, 0) and (1, 1)
    assert kinds(t.feed(1, 0)) == [Decode]
    assert t.s.stats["stale_dropped"] == 2 and t.s.pending == 2
    assert t.s.outstanding == 5 - 2  # two batches held, the dropped ones' credits back


@pytest.mark.parametrize("kw", [dict(job="other"), dict(rank=1)])
def test_batches_of_another_job_or_rank_are_dropped_and_are_no_progress(kw) -> None:
    t = Trainer(stall_s=2.0)
    t.connect()
    for i in range(10):
        t.at(100.0 + 0.1 * i)
        assert kinds(t.feed(0, 0, **kw)) == [ReturnCredit]
        assert t.s.tick(t.now) == []
    assert t.s.stats["misrouted"] == 10 and t.s.pending == 0
    t.at(102.0)  # stall_s after the request: the flood of foreign batches kept nothing alive
    out = t.s.tick(t.now)
    assert kinds(out) == [CloseStream, AskDaemon] and t.s.stats["relocations"] == 1


@pytest.mark.parametrize("payload, num, micro", [([], 1, 0), ([b"a", b"b"], 1, 0), ([b"a"], 0, 0), ([b"a"], 2, 2)])
def test_malformed_batches_are_dropped_and_counted(payload, num, micro) -> None:
    t = Trainer()
    t.connect()
    t.s._rx_micro = micro  # noqa: SLF001 — put the receive cursor where the bad batch claims to be
    out = t.s.on_stream_message(header(0, micro, num=num), payload, t.now)
    assert kinds(out) == [ReturnCredit] and t.s.stats["malformed"] == 1 and t.s.pending == 0


def test_credits_never_exceed_the_window_whatever_the_constructor_sends() -> None:
    rng = random.Random(7)
    t = Trainer(prefetch=3, ahead=1000)
    t.connect()
    returned = 0
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.5:  # a batch: often the right one, sometimes a repeat, skip or stranger
            step = t.s._rx_step if rng.random() < 0.6 else rng.randrange(0, 50)  # noqa: SLF001
            micro = t.s._rx_micro if step == t.s._rx_step else 0  # noqa: SLF001
            out = t.feed(step, micro, rank=rng.choice([0, 0, 0, 1]))
        elif roll < 0.6:
            out = t.s.on_stream_message(protocol.Heartbeat(job=JOB, next_step=1), [], t.now)
        elif roll < 0.7:
            out = t.s.on_stream_garbled(ProtocolError(ErrorCode.MALFORMED, "junk"), t.now)
        elif t.s.pending:
            out = t.take()
        else:
            out = []
        returned += kinds(out).count(ReturnCredit)
        assert 0 <= t.s.outstanding <= t.s.window == 3
        assert t.s.outstanding + t.s.pending >= 0
    # what the constructor may send is what it was given: 3 at Subscribe, plus each returned credit
    assert t.s.stats["over_window"] > 0  # the flood did exceed the window, and earned no credit
    assert returned <= 2000


def test_heartbeats_of_the_job_keep_a_waiting_loader_in_place() -> None:
    t = Trainer(stall_s=2.0, deadline_s=100.0)
    t.connect()
    for i in range(1, 20):
        t.at(100.0 + i)
        assert t.s.on_stream_message(protocol.Heartbeat(job=JOB, next_step=0), [], t.now) == []
        assert t.s.tick(t.now) == []
    assert t.s.stats["heartbeats"] == 19 and t.s.stats["relocations"] == 0
    t.s.on_stream_message(protocol.Heartbeat(job="other", next_step=0), [], t.now)  # not ours: no progress
    assert t.s.stats["misrouted"] == 1
    t.at(t.now + 2.0)
    assert kinds(t.s.tick(t.now)) == [CloseStream, AskDaemon]


def test_a_stalled_constructor_is_left_and_avoided_until_a_batch_arrives() -> None:
    t = Trainer(stall_s=2.0)
    t.connect()
    t.at(101.999)
    assert t.s.tick(t.now) == [] and t.s.wake_at == 102.0
    t.at(102.0)
    close, hello = t.s.tick(t.now)
    assert isinstance(close, CloseStream) and isinstance(hello.request, protocol.Hello)
    assert t.s.stats["relocations"] == 1 and f"endpoint {PRIMARY} silent for 2.0s" in t.s.last_error
    (loc,) = t.s.on_daemon_reply(WELCOME, t.now)
    assert loc.request.avoid == [PRIMARY]
    t.s.on_daemon_reply(located(STANDBY), t.now)
    t.feed(0, 0)
    t.take()
    assert t.s.avoid == []  # progress again: nothing to avoid


def test_garbage_from_the_constructor_is_counted_and_keeps_nothing_alive() -> None:
    t = Trainer(stall_s=2.0)
    t.connect()
    for i in range(50):
        t.at(100.0 + 0.03 * i)
        assert t.s.on_stream_garbled(ProtocolError(ErrorCode.MALFORMED, "junk"), t.now) == []
        assert t.s.on_stream_message(protocol.Ok(), [], t.now) == []  # a type no constructor sends
    assert t.s.stats["malformed"] == 100
    t.at(102.0)
    assert kinds(t.s.tick(t.now)) == [CloseStream, AskDaemon]


def test_no_batch_by_the_deadline_raises_naming_where_it_looked() -> None:
    t = Trainer(deadline_s=5.0, stall_s=100.0)
    t.connect()
    t.at(104.9)
    assert t.s.tick(t.now) == []
    t.at(105.0)
    out = t.s.tick(t.now)
    assert kinds(out) == [HangUp, CloseStream, Fail]
    err = out[-1].error
    assert isinstance(err, FabricUnavailable)
    assert "no batch for step 0 micro 0 within 5.0s" in str(err) and PRIMARY in str(err) and DAEMONS[0] in str(err)
    assert not t.s.streaming and t.s.tick(t.now + 50) == []  # nobody waits any more: quiet


def test_a_refusing_constructor_is_left_with_a_growing_backoff_reset_by_progress() -> None:
    t = Trainer()
    backoffs = []
    for _ in range(6):
        t.connect()
        out = t.s.on_stream_message(protocol.ErrorReply(code=ErrorCode.STALE, reason="old fingerprint"), [], t.now)
        assert kinds(out) == [CloseStream]
        assert t.s.tick(t.now) == []  # not at once: the daemons may lag behind
        backoffs.append(round(t.s.wake_at - t.now, 6))
        t.at(t.s.wake_at)
    assert backoffs == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert t.s.stats["relocations"] == 6 and "refused: stale: old fingerprint" in t.s.last_error
    t.connect()
    t.feed(0, 0)
    t.take()
    t.s.on_stream_message(protocol.ErrorReply(code=ErrorCode.INTERNAL, reason="boom"), [], t.now)
    t.s.want(t.now)
    assert round(t.s.wake_at - t.now, 6) == 0.05  # a batch got through: the backoff starts over


def test_a_stream_that_cannot_open_is_left_with_a_backoff() -> None:
    t = Trainer()
    t.connect()
    out = t.s.on_stream_failed("Invalid argument", t.now)
    assert kinds(out) == [CloseStream] and t.s.stats["stream_failures"] == 1
    assert t.s.avoid == [PRIMARY] and t.s.tick(t.now) == [] and t.s.wake_at == t.now + 0.05


def test_a_corrupt_batch_is_fetched_again_once_then_raised() -> None:
    t = Trainer()
    t.connect()
    t.feed(0, 0)
    t.feed(1, 0)
    t.s.want(t.now)
    (hand,) = t.s.tick(t.now)
    bad = BatchIntegrityError("step 0 micro 0: checksum x != sent y")
    out = t.s.on_corrupt(hand.received, bad, t.now)
    assert kinds(out) == [CloseStream] and len(out[0].discarded) == 1  # (1, 0) was pending
    assert t.s.stats["corrupt"] == 1 and t.s.stats["relocations"] == 1 and t.s.avoid == [PRIMARY]
    (hello,) = t.s.tick(t.now)
    t.s.on_daemon_reply(WELCOME, t.now)
    _, opened = t.s.on_daemon_reply(located(STANDBY), t.now)
    assert (opened.subscribe.next_step, opened.subscribe.next_micro) == (0, 0)
    t.feed(0, 0)
    (hand,) = t.s.tick(t.now)
    out = t.s.on_corrupt(hand.received, bad, t.now)
    assert isinstance(out[-1], Fail) and out[-1].error is bad and t.s.stats["corrupt"] == 2


# ------------------------------------------------------------------------------ standby


def test_on_a_standby_the_primary_is_checked_every_primary_check_s_and_rejoined() -> None:
    t = Trainer(primary_check_s=3.0, stall_s=100.0, deadline_s=1000.0)
    t.connect(located(STANDBY, standby=True))
    locates = t.s.stats["locates"]
    probes = []
    for i in range(1, 10):
        t.at(100.0 + i)
        t.feed(*((t.s._rx_step, t.s._rx_micro)))  # noqa: SLF001 — the standby keeps serving
        t.s.want(t.now)
        out = t.s.tick(t.now)
        if isinstance(out[0], AskDaemon):
            probes.append(t.now)
            (ask,) = out
            assert ask.reply_by == t.now + PROBE_TIMEOUT_S and ask.address == DAEMONS[0]
            (loc,) = t.s.on_daemon_reply(WELCOME, t.now)
            assert loc.reply_by == ask.reply_by  # both requests share the probe's time
            assert t.s.on_daemon_reply(located(STANDBY, standby=True), t.now) == [HangUp()]
            out = t.s.tick(t.now)
        assert isinstance(out[0], HandOut)
        t.s.on_handed_out(out[0].received, 1, t.now)
    assert probes == [103.0, 106.0, 109.0]
    assert t.s.stats["locates"] == locates and t.s.stats["primary_returns"] == 0  # probes are not locates
    # a probe that meets silence or a refusal changes nothing and is not an error
    t.at(112.0)
    t.s.want(t.now)
    t.s.tick(t.now)
    error_before = t.s.last_error
    assert t.s.on_daemon_silent(t.now) == [HangUp()] and t.s.last_error == error_before and t.s.streaming
    t.at(115.0)
    t.s.tick(t.now)
    assert t.s.on_daemon_reply(protocol.ErrorReply(code=ErrorCode.INTERNAL, reason="x"), t.now) == [HangUp()]
    # the primary is up: leave the standby from the cursor
    t.at(118.0)
    t.s.tick(t.now)
    t.s.on_daemon_reply(WELCOME, t.now)
    out = t.s.on_daemon_reply(located(PRIMARY), t.now)
    assert kinds(out) == [HangUp, CloseStream, OpenStream] and out[2].endpoint == PRIMARY
    assert (out[2].subscribe.next_step, out[2].subscribe.next_micro) == (t.s.next_step, t.s.next_micro)
    assert t.s.stats["primary_returns"] == 1 and t.s.stats["relocations"] == 0 and not t.s.standby
    t.at(1000.0)
    t.s.on_stream_message(protocol.Heartbeat(job=JOB, next_step=0), [], t.now)
    assert t.s.tick(t.now + 50) == []  # on the primary: no more probes


def test_a_probe_never_moves_to_a_located_that_cannot_be_used() -> None:
    t = Trainer(primary_check_s=1.0, stall_s=100.0)
    t.connect(located(STANDBY, standby=True))
    for reply in (located(endpoint="nonsense"), located(job="other"), located(dp_size=8), located(STANDBY)):
        t.at(t.now + 1.0)
        t.s.want(t.now)
        (ask,) = t.s.tick(t.now)
        t.s.on_daemon_reply(WELCOME, t.now)
        assert t.s.on_daemon_reply(reply, t.now) == [HangUp()]
        assert t.s.streaming and t.s.endpoint == STANDBY
    assert t.s.stats["primary_returns"] == 0


# ------------------------------------------------------------------------------ cursor, lifecycle


def test_seek_drops_a_stream_from_the_old_cursor() -> None:
    t = Trainer()
    t.connect()
    t.feed(0, 0)
    assert t.s.seek(0, 0) == []
    (close,) = t.s.seek(3, 0)
    assert isinstance(close, CloseStream) and len(close.discarded) == 1 and not t.s.streaming
    opened = t.connect()
    assert (opened.subscribe.next_step, opened.subscribe.next_micro) == (3, 0)


def test_nothing_happens_while_the_trainer_does_not_ask() -> None:
    t = Trainer()
    assert t.s.tick(t.now) == [] and t.s.wake_at == float("inf")
    t.connect()
    t.feed(0, 0)
    t.take()
    assert t.s.tick(t.now + 10_000) == []  # the trainer is busy: no stall, no deadline


def test_close_forgets_the_stream() -> None:
    t = Trainer()
    t.connect()
    t.feed(0, 0)
    out = t.s.close()
    assert kinds(out) == [CloseStream] and not t.s.streaming and t.s.tick(t.now) == []


def test_an_overdue_reply_the_owner_never_reported_counts_as_silence() -> None:
    t = Trainer(stall_s=1.0)
    t.s.want(t.now)
    (ask,) = t.s.tick(t.now)
    assert t.s.tick(t.now + 0.5) == [] and t.s.wake_at == ask.reply_by
    out = t.s.tick(ask.reply_by)
    assert isinstance(out[0], HangUp) and out[1].address == DAEMONS[1]


def test_hostile_peers_cannot_make_the_session_loop_or_crash() -> None:
    """Random replies and stream messages at random times: every input returns a handful of
    actions, and the session either hands out in order or gives up at the deadline."""
    rng = random.Random(11)
    stream_msgs = [
        protocol.Heartbeat(job=JOB, next_step=3), protocol.Heartbeat(job="x", next_step=0),
        protocol.ErrorReply(code=ErrorCode.STALE, reason="r"), protocol.ErrorReply(code="weird", reason="r" * 10_000),
        protocol.Ok(), WELCOME, located(),
    ]
    daemon_replies = [WELCOME, located(), located(endpoint="junk"), located(job="zz"), protocol.Ok(),
                      protocol.ErrorReply(code=ErrorCode.NOT_READY, reason="n"), located(STANDBY, standby=True)]
    for trial in range(30):
        t = Trainer(deadline_s=3.0, stall_s=0.5, primary_check_s=0.3)
        t.s.want(t.now)
        handed = []
        start = t.now
        for _ in range(5000):
            if rng.random() < 0.3:
                t.at(t.now + rng.random() * 0.2)
            out = t.s.tick(t.now)
            while out and not isinstance(out[-1], Fail):
                assert len(out) <= 4
                nxt: list[Any] = []
                for a in out:
                    if isinstance(a, AskDaemon):
                        roll = rng.random()
                        if roll < 0.2:
                            nxt += t.s.on_daemon_silent(t.now)
                        elif roll < 0.3:
                            nxt += t.s.on_daemon_garbled(ProtocolError(ErrorCode.MALFORMED, "g"), t.now)
                        else:
                            nxt += t.s.on_daemon_reply(rng.choice(daemon_replies), t.now)
                    elif isinstance(a, HandOut):
                        handed.append((a.received.header.step, a.received.header.micro_batch))
                        nxt += t.s.on_handed_out(a.received, 1, t.now)
                        t.s.want(t.now)
                    elif isinstance(a, OpenStream) and rng.random() < 0.1:
                        nxt += t.s.on_stream_failed("refused", t.now)
                out = nxt
            if out and isinstance(out[-1], Fail):
                assert isinstance(out[-1].error, (FabricUnavailable, RemoteError))
                break
            if t.s.streaming:
                roll = rng.random()
                if roll < 0.5:
                    step, micro = t.s._rx_step, t.s._rx_micro  # noqa: SLF001
                    if rng.random() < 0.3:
                        step += rng.choice([-1, 1, 2])
                    assert len(t.feed(step, micro, job=rng.choice([JOB, JOB, "x"]))) <= 1
                elif roll < 0.8:
                    assert len(t.s.on_stream_message(rng.choice(stream_msgs), [], t.now)) <= 1
            if t.now - start > 1000:
                break
            assert 0 <= t.s.outstanding <= t.s.window
        # batches the trainer got are in strict cursor order, without gaps or repeats
        expect, (step, micro) = [], (0, 0)
        for _ in handed:
            expect.append((step, micro))
            step, micro = (step, micro + 1) if micro + 1 < num_micro(step) else (step + 1, 0)
        assert handed == expect, trial


def test_data_wait_runs_from_want_to_hand_out_and_is_reported_once() -> None:
    t = Trainer()
    t.connect()  # wanted at 100.0; nothing arrives until 101.5
    t.at(101.5)
    t.feed(0, 0)
    (out,) = t.s.tick(t.now)
    assert kinds(t.s.on_handed_out(out.received, 10, t.at(101.75))) == [ReturnCredit]
    t.feed(1, 0)
    t.s.want(t.at(102.0))
    (out,) = t.s.tick(t.now)
    t.s.on_handed_out(out.received, 10, t.at(102.25))  # a batch already there: only its decode
    assert t.s.stats["wait_s"] == pytest.approx(2.0)
    assert t.s.take_wait() == pytest.approx(2.0)  # what the next Credit carries
    assert t.s.take_wait() == 0.0  # and only once
    assert t.s.stats["wait_s"] == pytest.approx(2.0)
