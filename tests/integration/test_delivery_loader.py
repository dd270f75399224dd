"""Trainer data plane end to end: TrainerDelivery on a real ROUTER ⇄ fabric_client.Loader.

The daemon is replaced by :class:`LocatorStub` (answers Hello/Locate only; the real daemon is
the lead's), and the constructor by :class:`ConstructorStub`, a thread running the owner's loop
around TrainerDelivery with a deterministic batch generator: ``make_arrays(step, rank, micro)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zmq

from fabric_client import BatchIntegrityError, FabricUnavailable, Loader, RemoteError
from fabric_client import protocol
from fabric_client.batch import checksum, decode_batch, encode_batch
from fabric_client.errors import ProtocolError
from fabric_client.machine import machine_id
from fabric_client.protocol import ErrorCode
from fabricd.roles.delivery import EncodedBatch, TrainerDelivery

pytestmark = pytest.mark.integration

JOB = "test-job"
FP = "fp-1"


def num_micro(step: int) -> int:
    return 1 + step % 3  # 1, 2, 3, 1, 2, 3 ...


def make_arrays(step: int, rank: int, micro: int) -> dict[str, np.ndarray]:
    """A pure function of (step, rank, micro): what the constructor must deliver."""
    rng = np.random.default_rng([step, rank, micro])
    n = int(rng.integers(1, 300))
    return {
        "input_ids": rng.integers(3, 259, size=n, dtype=np.int32),
        "pixel_values": rng.integers(0, 256, size=(int(rng.integers(0, 3)), 4, 4, 3), dtype=np.uint8),
        "tag": np.array([step, rank, micro], dtype=np.int64),
    }


def expected_sequence(rank: int, start: tuple[int, int], count: int) -> list[tuple[int, int, str]]:
    out, (step, micro) = [], start
    while len(out) < count:
        out.append((step, micro, checksum(make_arrays(step, rank, micro))))
        step, micro = (step, micro + 1) if micro + 1 < num_micro(step) else (step + 1, 0)
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class _Thread:
    """A socket-owning loop in a thread; hands its exception to the test at stop()."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._guard, daemon=True)

    def start(self) -> Any:
        self._thread.start()
        return self

    def _guard(self) -> None:
        try:
            self.run()
        except BaseException as e:  # noqa: BLE001 — surfaced by stop()
            self._error = e

    def run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._thread.is_alive():
            raise AssertionError(f"{type(self).__name__} did not stop")
        if self._error is not None:
            raise self._error


class ConstructorStub(_Thread):
    """The owner's loop around TrainerDelivery: decode → handle, pump, count malformed."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        ranks: tuple[int, ...] = (0,),
        mp_size: int = 1,
        heartbeat_s: float = 1.0,
        ready: Callable[[int, int, int], bool] = lambda s, r, m: True,
        compression: str | None = "lz4",
        remote_compression: str | None = None,
    ) -> None:
        super().__init__()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.delivery = TrainerDelivery(
            self.sock, job=JOB, fingerprint=FP, ranks=ranks, mp_size=mp_size, heartbeat_s=heartbeat_s,
            remote_compression=remote_compression,
        )
        self.ready = ready
        self.compression = compression
        self.cache: dict[tuple[int, int, int], EncodedBatch] = {}
        self.encodes = 0
        self.malformed = 0
        self.lock = threading.Lock()
        # outstanding[(dp, mp)] = sent - credited since the last Subscribe; max_outstanding tracks its peak
        self.credited: dict[tuple[int, int], int] = {}
        self.max_outstanding = 0
        self.initial_credits: dict[tuple[int, int], int] = {}

    def lookup(self, rank: int, step: int, micro: int) -> EncodedBatch | None:
        if not self.ready(step, rank, micro):
            return None
        key = (rank, step, micro)
        if key not in self.cache:
            arrays = make_arrays(step, rank, micro)
            header = protocol.Batch(JOB, step, rank, micro, num_micro(step), checksum(arrays),
                                    1, int(arrays["input_ids"].size), 0)
            self.cache[key] = EncodedBatch(header, encode_batch(arrays, compression=self.compression))
            self.encodes += 1
        return self.cache[key]

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.sock.poll(5, zmq.POLLIN):
                    while True:
                        try:
                            identity, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            msg, _ = protocol.decode(frames)
                        except ProtocolError:
                            self.malformed += 1
                            continue
                        with self.lock:
                            if isinstance(msg, protocol.Subscribe):
                                self.credited[(msg.dp_rank, msg.mp_rank)] = 0
                                self.initial_credits[(msg.dp_rank, msg.mp_rank)] = msg.credits
                            elif isinstance(msg, protocol.Credit):
                                key = (msg.dp_rank, msg.mp_rank)
                                self.credited[key] = self.credited.get(key, 0) + msg.credits
                            self.delivery.handle(identity, msg)
                with self.lock:
                    self.delivery.pump(self.lookup)
                    for sub in self.delivery.stats()["subscriptions"]:
                        key = (sub["dp_rank"], sub["mp_rank"])
                        self.max_outstanding = max(self.max_outstanding, sub["sent"] - self.credited.get(key, 0))
        finally:
            self.sock.close(linger=0)


class LocatorStub(_Thread):
    """A STUB of the daemon's trainer-facing half (the real daemon is written by the lead):
    answers Hello with Welcome and Locate with Located(endpoint) — or scripted errors."""

    def __init__(self, ctx: zmq.Context, endpoint: str | None, *, mp_size: int = 1, prefetch: int = 3) -> None:
        super().__init__()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.endpoint = endpoint
        self.mp_size = mp_size
        self.prefetch = prefetch
        self.not_ready = 0  # answer this many Locates with not_ready first
        self.hello_error: str | None = None
        self.locates = 0
        self.fingerprints: list[str] = []  # answer these (stale) fingerprints first, then FP
        self.standby = False  # whether the endpoint answered is a standby constructor
        self.hosts: list[str] = []  # the hosts the Locates declared

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(5, zmq.POLLIN):
                    continue
                identity, *frames = self.sock.recv_multipart()
                msg, _ = protocol.decode(frames)
                if isinstance(msg, protocol.Hello):
                    reply: protocol.Message = (
                        protocol.ErrorReply(self.hello_error, "scripted") if self.hello_error
                        else protocol.Welcome(protocol.PROTOCOL_VERSION, "stub", "0")
                    )
                elif isinstance(msg, protocol.Locate):
                    self.locates += 1
                    self.hosts.append(msg.host)
                    if self.not_ready > 0 or self.endpoint is None:
                        self.not_ready -= 1
                        reply = protocol.ErrorReply(ErrorCode.NOT_READY, "job starting")
                    else:
                        fp = self.fingerprints.pop(0) if self.fingerprints else FP
                        reply = protocol.Located(msg.job, fp, self.endpoint, msg.dp_size, self.mp_size, self.prefetch,
                                                 standby=self.standby)
                else:
                    reply = protocol.ErrorReply(ErrorCode.BAD_REQUEST, msg.TYPE)
                self.sock.send_multipart([identity, *protocol.encode(reply)])
        finally:
            self.sock.close(linger=0)


@pytest.fixture(autouse=True)
def plaintext(monkeypatch):
    """The stubs here serve plaintext (this file tests the delivery protocol, not authentication:
    that is tests/integration/test_curve.py), so the Loader does not take the worker's key."""
    monkeypatch.delenv("FABRIC_KEY", raising=False)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def stubs(ctx):
    started: list[_Thread] = []

    def start(thread: _Thread) -> Any:
        started.append(thread)
        return thread.start()

    yield start
    errors = []
    for t in reversed(started):
        try:
            t.stop()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]


def received(batch) -> tuple[int, int, str]:
    return batch.step, batch.micro_batch, batch.checksum


# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_loader_receives_exactly_the_expected_sequence(ctx, stubs) -> None:
    con = stubs(ConstructorStub(ctx, ranks=(0, 1)))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    loc.not_ready = 2  # the job is still starting: the loader retries
    with Loader(loc.address, job=JOB, dp_rank=1, dp_size=2, max_steps=12, context=ctx) as loader:
        got = []
        for batch in loader:
            assert checksum({k: np.asarray(v) for k, v in batch.items()}) == batch.checksum
            np.testing.assert_array_equal(batch["tag"], [batch.step, 1, batch.micro_batch])
            got.append(received(batch))
        assert loader.state_dict() == {"job": JOB, "next_step": 12, "next_micro": 0}
        assert loader.stats["stale_dropped"] == 0 and loader.stats["relocations"] == 0
    expected = expected_sequence(1, (0, 0), len(got))
    assert got == expected
    assert got[-1][:2] == (11, 2)  # steps 0..11, all micros


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compression", ["lz4", None])
def test_batches_are_numpy_views_of_the_received_frames(ctx, stubs, compression) -> None:
    con = stubs(ConstructorStub(ctx, compression=compression))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, max_steps=1, context=ctx) as loader:
        (batch,) = list(loader)
    for arr in batch.values():
        assert isinstance(arr, np.ndarray) and not arr.flags.owndata
        assert not arr.flags.writeable  # a view of the received zmq frame / decompressed buffer


@pytest.mark.timeout(30)
def test_auto_compression_sends_plain_frames_on_this_machine_and_lz4_to_others(ctx, stubs) -> None:
    """``compression = "auto"``: batches built uncompressed go as built to a trainer that declares
    this machine, and re-encoded with lz4 (once per batch, the bytes ``encode_batch`` gives) to
    one on another machine or one that declares none; the content is the same."""
    con = stubs(ConstructorStub(ctx, ranks=(0,), mp_size=3, compression=None, remote_compression="lz4"))
    frames = {}
    for mp, machine in enumerate((machine_id(), "boot:another-machine", "")):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(con.endpoint)
        try:
            sock.send_multipart(protocol.encode(protocol.Subscribe(JOB, FP, 0, mp, 0, 0, 2, machine=machine)))
            got = []
            while len(got) < 2:
                assert sock.poll(5000), "no batch"
                parts = sock.recv_multipart()
                msg, payload = protocol.decode(parts)
                if isinstance(msg, protocol.Batch):
                    assert checksum(decode_batch(payload[0])) == msg.checksum
                    got.append(bytes(payload[0]))
            frames[machine] = got
        finally:
            sock.close(linger=0)
    plain = [bytes(encode_batch(make_arrays(0, 0, 0), compression=None)),
             bytes(encode_batch(make_arrays(1, 0, 0), compression=None))]
    lz4 = [bytes(encode_batch(make_arrays(0, 0, 0), compression="lz4")),
           bytes(encode_batch(make_arrays(1, 0, 0), compression="lz4"))]
    assert frames[machine_id()] == plain
    assert frames["boot:another-machine"] == lz4 and frames[""] == lz4
    assert plain != lz4
    assert con.encodes == 2  # built once each, whoever received them


@pytest.mark.timeout(30)
def test_credits_come_back_in_chunks_and_all_of_them_before_the_loader_waits(ctx, stubs) -> None:
    prefetch, chunk = 8, 2  # the loader returns a busy stream's credits a quarter window at a time
    last_step = 8  # the constructor has steps 0..7 only (15 batches, an odd number): then the loader waits
    available = sum(num_micro(s) for s in range(last_step))
    con = stubs(ConstructorStub(ctx, ready=lambda s, r, m: s < last_step, compression=None))
    loc = stubs(LocatorStub(ctx, con.endpoint, prefetch=prefetch))

    def sent() -> int:
        with con.lock:
            return con.delivery.stats()["batches_sent"]

    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, context=ctx, deadline_s=1.5, stall_s=30,
                decode_workers=0) as loader:
        it = iter(loader)
        got = [received(next(it))]
        wait_for(lambda: sent() == prefetch + 1 - 1 % chunk, what="the first window")
        for consumed in range(2, available - prefetch + 1):
            got.append(received(next(it)))
            # the trainer is slow: the window is full again, short of at most one chunk
            want = prefetch + consumed - consumed % chunk
            wait_for(lambda: sent() == want, what=f"credits of {consumed} batches")
        assert con.max_outstanding == prefetch
        got += [received(next(it)) for _ in range(available - len(got))]
        assert got == expected_sequence(0, (0, 0), available)
        with pytest.raises(FabricUnavailable):
            next(it)  # nothing more to come: it waited, and gave every credit back first
        with con.lock:
            assert con.credited[(0, 0)] == available
            # giving up, the loader hung up: the constructor may have dropped the subscription
            # already (a race with this check); if not, its window is whole again
            subs = con.delivery.stats()["subscriptions"]
            assert len(subs) <= 1 and all(sub["credits"] == prefetch for sub in subs), subs
        assert loader.stats["relocations"] == 0


@pytest.mark.timeout(30)
def test_credits_bound_what_is_in_flight(ctx, stubs) -> None:
    prefetch = 3
    con = stubs(ConstructorStub(ctx))
    loc = stubs(LocatorStub(ctx, con.endpoint, prefetch=prefetch))
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, context=ctx) as loader:
        it = iter(loader)
        for consumed in range(1, 6):
            next(it)
            # the trainer is slow now: the server fills the window, and must stop there
            wait_for(lambda: con.delivery.stats()["batches_sent"] == consumed + prefetch, what="window filled")
            with con.lock:
                sent = con.delivery.stats()["batches_sent"]
            assert sent == consumed + prefetch
        with con.lock:
            (sub,) = con.delivery.stats()["subscriptions"]
        assert sub["credits"] == 0
    assert con.max_outstanding == prefetch


@pytest.mark.timeout(30)
def test_resume_from_state_dict_mid_step(ctx, stubs) -> None:
    con = stubs(ConstructorStub(ctx))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    first = []
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, context=ctx) as loader:
        for batch in loader:
            first.append(received(batch))
            if len(first) == 5:  # steps 0 (1 micro), 1 (2 micros), 2 micros 0-1 of 3: mid-step
                break
        state = loader.state_dict()
    assert state == {"job": JOB, "next_step": 2, "next_micro": 2}
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, max_steps=6, context=ctx) as resumed:
        resumed.load_state_dict(state)
        second = [received(b) for b in resumed]
    assert first + second == expected_sequence(0, (0, 0), len(first) + len(second))
    assert second[-1][:2] == (5, 2)


@pytest.mark.timeout(15)
def test_state_of_another_job_is_refused(ctx) -> None:
    with Loader("tcp://127.0.0.1:1", job=JOB, dp_rank=0, dp_size=1, context=ctx) as loader:
        with pytest.raises(ValueError, match="other"):
            loader.load_state_dict({"job": "other", "next_step": 3, "next_micro": 0})
        loader.load_state_dict({})
        assert loader.state_dict() == {"job": JOB, "next_step": 0, "next_micro": 0}


@pytest.mark.timeout(40)
def test_constructor_restart_on_a_new_port_mid_stream(ctx, stubs) -> None:
    first = stubs(ConstructorStub(ctx, heartbeat_s=0.05))
    loc = stubs(LocatorStub(ctx, first.endpoint, prefetch=2))
    got = []
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, stall_s=0.5, deadline_s=20,
                max_steps=8, context=ctx) as loader:
        for batch in loader:
            got.append(received(batch))
            if len(got) == 4:  # mid step 2: kill the constructor, start another on a new port
                first.stop()
                second = stubs(ConstructorStub(ctx, heartbeat_s=0.05))
                assert second.endpoint != first.endpoint
                loc.endpoint = second.endpoint
        assert loader.stats["relocations"] >= 1
        assert loader.stats["endpoint"] == second.endpoint
    assert got == expected_sequence(0, (0, 0), len(got))
    assert got[-1][:2] == (7, 1)


@pytest.mark.timeout(30)
def test_farewell_of_a_stopping_constructor_relocates_at_once(ctx, stubs) -> None:
    first = stubs(ConstructorStub(ctx))
    loc = stubs(LocatorStub(ctx, first.endpoint, prefetch=2))
    got = []
    started = time.monotonic()
    # stall_s far above the test's timeout: only the farewell can make the loader move
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, stall_s=60, deadline_s=20,
                max_steps=6, context=ctx) as loader:
        for batch in loader:
            got.append(received(batch))
            if len(got) == 3:  # the constructor is moved: a new one elsewhere, the old one says goodbye
                second = stubs(ConstructorStub(ctx))
                loc.endpoint = second.endpoint
                with first.lock:
                    first.delivery.farewell("moving")
                assert first.delivery.stats()["subscriptions"] == []
        assert loader.stats["relocations"] == 1
        assert loader.stats["endpoint"] == second.endpoint
    assert got == expected_sequence(0, (0, 0), len(got))
    assert time.monotonic() - started < 20


@pytest.mark.timeout(30)
def test_loader_on_a_standby_returns_to_its_primary_once_it_is_up(ctx, stubs) -> None:
    standby = stubs(ConstructorStub(ctx))
    loc = stubs(LocatorStub(ctx, standby.endpoint, prefetch=2))
    loc.standby = True
    got = []
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, stall_s=60, deadline_s=20,
                primary_check_s=0.2, host="gpu-node-7", context=ctx) as loader:
        for batch in loader:
            got.append(received(batch))
            time.sleep(0.03)
            if len(got) == 3:  # the primary is up again
                primary = stubs(ConstructorStub(ctx))
                loc.endpoint, loc.standby = primary.endpoint, False
            if len(got) == 25:
                assert loader.stats["primary_returns"] == 1 and loader.stats["relocations"] == 0
                assert loader.stats["endpoint"] == primary.endpoint
                probes = loc.locates
                with standby.lock:  # the standby was told, and holds no stale subscription
                    left = standby.delivery.stats()
                assert left["subscriptions"] == [] and left["unsubscribes"] == 1
                (where,) = left["departed"]  # where the trainer was when it left: still reported
                assert where[:2] == [0, 0] and where[2] >= 1
            if len(got) == 40:  # 0.45 s later: on the primary, the loader no longer probes
                break
    assert loc.locates == probes
    assert got == expected_sequence(0, (0, 0), len(got))
    wait_for(lambda: primary.delivery.stats()["subscriptions"] == [], what="the closing loader unsubscribes")
    assert set(loc.hosts) == {"gpu-node-7"}, "every Locate declares the trainer's host"


@pytest.mark.timeout(30)
def test_refused_subscription_relocates_and_resumes(ctx, stubs) -> None:
    con = stubs(ConstructorStub(ctx))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    loc.fingerprints = ["fp-before-resubmit", "fp-before-resubmit"]  # the daemon lags behind twice
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, max_steps=2, context=ctx) as loader:
        got = [received(b) for b in loader]
        # at least the two refusals; a stall on a loaded machine may add a relocation
        assert loader.stats["relocations"] >= 2 and loc.locates >= 3
    assert got == expected_sequence(0, (0, 0), 3)
    assert con.delivery.stats()["errors_replied"] >= 2


@pytest.mark.timeout(15)
def test_nothing_listening_raises_fabric_unavailable_within_the_deadline(ctx) -> None:
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)  # a port where nothing listens any more
    address = f"tcp://127.0.0.1:{port}"
    t0 = time.monotonic()
    with Loader([address], job=JOB, dp_rank=0, dp_size=1, deadline_s=1.0, stall_s=0.2, context=ctx) as loader:
        with pytest.raises(FabricUnavailable) as info:
            next(iter(loader))
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0
    assert address in str(info.value) and "no reply to hello" in str(info.value)


@pytest.mark.timeout(15)
def test_silent_constructor_raises_fabric_unavailable_naming_the_endpoint(ctx, stubs) -> None:
    con = stubs(ConstructorStub(ctx, ready=lambda s, r, m: False, heartbeat_s=100))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, deadline_s=1.0, stall_s=0.3, context=ctx) as loader:
        with pytest.raises(FabricUnavailable) as info:
            next(iter(loader))
        assert loader.stats["relocations"] >= 1
    assert con.endpoint in str(info.value) and loc.address in str(info.value)


@pytest.mark.timeout(15)
def test_version_and_bad_request_errors_are_raised_at_once(ctx, stubs) -> None:
    loc = stubs(LocatorStub(ctx, None))
    for code in (ErrorCode.VERSION, ErrorCode.BAD_REQUEST, ErrorCode.INVALID_SPEC):
        loc.hello_error = code
        t0 = time.monotonic()
        with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, deadline_s=10, context=ctx) as loader:
            with pytest.raises(RemoteError) as info:
                next(iter(loader))
        assert info.value.code == code
        assert time.monotonic() - t0 < 2.0


@pytest.mark.timeout(30)
def test_heartbeats_keep_a_waiting_loader_from_relocating(ctx, stubs) -> None:
    holder: dict[str, ConstructorStub] = {}
    # step 2 becomes ready only once the trainer has been kept waiting by 10 heartbeats
    ready = lambda s, r, m: s < 2 or holder["con"].delivery.stats()["heartbeats_sent"] >= 10  # noqa: E731
    con = ConstructorStub(ctx, heartbeat_s=0.05, ready=ready)
    holder["con"] = con
    stubs(con)
    loc = stubs(LocatorStub(ctx, con.endpoint))
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, stall_s=0.3, max_steps=3, context=ctx) as loader:
        got = [received(b) for b in loader]
        assert loader.stats["heartbeats"] >= 10
        assert loader.stats["relocations"] == 0
    assert got == expected_sequence(0, (0, 0), 6)


@pytest.mark.timeout(30)
def test_model_parallel_ranks_receive_identical_frames(ctx, stubs) -> None:
    con = stubs(ConstructorStub(ctx, ranks=(0,), mp_size=2))
    loc = stubs(LocatorStub(ctx, con.endpoint, mp_size=2))
    loaders = [Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, mp_rank=m, max_steps=5, context=ctx)
               for m in range(2)]
    try:
        its = [iter(ld) for ld in loaders]
        for _ in range(len(expected_sequence(0, (0, 0), 9))):
            a, b = next(its[0]), next(its[1])
            assert received(a) == received(b)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
    finally:
        for ld in loaders:
            ld.close()
    # each batch was serialized once (9 consumed + at most `prefetch` sent ahead) and sent to both ranks
    assert 9 <= con.encodes <= 9 + 3
    # the stub's thread counts a send after send_multipart returns: it may still be on its way
    deadline = time.monotonic() + 5.0
    while con.delivery.stats()["batches_sent"] < 18 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert con.delivery.stats()["batches_sent"] >= 18


@pytest.mark.timeout(30)
def test_garbage_and_refused_messages_do_not_break_delivery(ctx, stubs) -> None:
    con = stubs(ConstructorStub(ctx))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(con.endpoint)
    try:
        rogue.send_multipart([b"\x00garbage", b"more"])
        rogue.send_multipart([b'{"v":1,"t":"subscribe","job":5}'])
        rogue.send_multipart([b""])
        cases = [
            (protocol.Hello(protocol.PROTOCOL_VERSION, "trainer"), ErrorCode.BAD_REQUEST),
            (protocol.Subscribe("other-job", FP, 0, 0, 0, 0, 1), ErrorCode.UNKNOWN_JOB),
            (protocol.Subscribe(JOB, "old-fingerprint", 0, 0, 0, 0, 1), ErrorCode.STALE),
            (protocol.Subscribe(JOB, FP, 7, 0, 0, 0, 1), ErrorCode.STALE),
            (protocol.Subscribe(JOB, FP, 0, 3, 0, 0, 1), ErrorCode.BAD_REQUEST),
            (protocol.Credit(JOB, 0, 0, 1), ErrorCode.STALE),
        ]
        for msg, code in cases:
            rogue.send_multipart(protocol.encode(msg))
            assert rogue.poll(5000), f"no reply to {msg}"
            reply, _ = protocol.decode(rogue.recv_multipart())
            assert isinstance(reply, protocol.ErrorReply) and reply.code == code, (msg, reply)
        wait_for(lambda: con.malformed == 3, what="malformed counted")
        assert con.delivery.stats()["errors_replied"] == len(cases)
        with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, max_steps=3, context=ctx) as loader:
            got = [received(b) for b in loader]
        assert got == expected_sequence(0, (0, 0), 6)
    finally:
        rogue.close(linger=0)


@pytest.mark.timeout(30)
def test_vanished_trainer_is_dropped_and_counted(ctx, stubs) -> None:
    # only step 0 is ready: afterwards the subscription holds credits and gets heartbeats
    con = stubs(ConstructorStub(ctx, heartbeat_s=0.02, ready=lambda s, r, m: s == 0))
    # a trainer that dies without a word (a Loader would send Unsubscribe): a bare socket
    trainer = ctx.socket(zmq.DEALER)
    trainer.connect(con.endpoint)
    trainer.send_multipart(protocol.encode(protocol.Subscribe(JOB, FP, 0, 0, 0, 0, 3)))
    assert trainer.poll(5000, zmq.POLLIN), "no batch"
    trainer.recv_multipart()
    wait_for(lambda: con.delivery.stats()["heartbeats_sent"] >= 1, what="heartbeat")
    trainer.close(linger=0)
    # the trainer is gone: the next heartbeat hits EHOSTUNREACH, and the subscription goes
    wait_for(lambda: con.delivery.stats()["unreachable_dropped"] >= 1, what="drop")
    assert con.delivery.stats()["subscriptions"] == []
    assert con.delivery.demand() == {}


class ScriptedConstructor(_Thread):
    """A misbehaving constructor: answers a Subscribe with a fixed script of messages."""

    def __init__(self, ctx: zmq.Context, script: list[list[Any]]) -> None:
        super().__init__()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.script = script
        self.credits = 0

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(5, zmq.POLLIN):
                    continue
                identity, *frames = self.sock.recv_multipart()
                msg, _ = protocol.decode(frames)
                if isinstance(msg, protocol.Subscribe):
                    for message in self.script:
                        self.sock.send_multipart([identity, *message])
                elif isinstance(msg, protocol.Credit):
                    self.credits += msg.credits
        finally:
            self.sock.close(linger=0)


def _message(step: int, micro: int, *, digest: str | None = None, frame: Any = None) -> list[Any]:
    arrays = make_arrays(step, 0, micro)
    header = protocol.Batch(JOB, step, 0, micro, num_micro(step), digest or checksum(arrays), 1, 1, 0)
    return protocol.encode(header, [frame if frame is not None else encode_batch(arrays)])


@pytest.mark.timeout(30)
def test_duplicate_and_out_of_order_batches_are_dropped_and_counted(ctx, stubs) -> None:
    script = [_message(0, 0), _message(0, 0), _message(2, 0), _message(1, 0), _message(1, 1)]
    con = stubs(ScriptedConstructor(ctx, script))
    loc = stubs(LocatorStub(ctx, con.endpoint, prefetch=5))
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, max_steps=2, context=ctx) as loader:
        got = [received(b) for b in loader]
        assert loader.stats["stale_dropped"] == 2
        # every message counted against our credits was given back, dropped ones included
        wait_for(lambda: con.credits == 5, what="credits returned")
    assert got == expected_sequence(0, (0, 0), 3)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["checksum", "frame"])
def test_corrupt_batch_raises_batch_integrity_error(ctx, stubs, bad) -> None:
    broken = _message(1, 1, digest="0" * 64) if bad == "checksum" else _message(1, 1, frame=b"not arrow")
    con = stubs(ScriptedConstructor(ctx, [_message(0, 0), _message(1, 0), broken]))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, context=ctx) as loader:
        it = iter(loader)
        assert received(next(it))[:2] == (0, 0)
        assert received(next(it))[:2] == (1, 0)
        with pytest.raises(BatchIntegrityError, match="step 1 dp_rank 0 micro 1"):
            next(it)


@pytest.mark.timeout(60)
def test_torch_true_yields_tensors_with_the_batch_content(ctx, stubs) -> None:
    torch = pytest.importorskip("torch")
    con = stubs(ConstructorStub(ctx))
    loc = stubs(LocatorStub(ctx, con.endpoint))
    with Loader(loc.address, job=JOB, dp_rank=0, dp_size=1, torch=True, max_steps=2, context=ctx) as loader:
        batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        expected = make_arrays(batch.step, 0, batch.micro_batch)
        for name, tensor in batch.items():
            assert isinstance(tensor, torch.Tensor)
            np.testing.assert_array_equal(tensor.numpy(), expected[name])


@pytest.mark.timeout(15)
def test_torch_missing_is_a_clear_import_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImportError, match="torch=False"):
        Loader("tcp://127.0.0.1:1", job=JOB, dp_rank=0, dp_size=1, torch=True)


# ---------------------------------------------------------------------------- no-network checks


class FakeRouter:
    """Records sends; raises the errors it is told to, like a ROUTER_MANDATORY socket would."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []
        self.fail: list[int] = []

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = True) -> None:
        if self.fail:
            raise zmq.ZMQError(self.fail.pop(0))
        self.sent.append(frames)


def _batch(step: int, micro: int, rank: int = 0) -> EncodedBatch:
    arrays = make_arrays(step, rank, micro)
    return EncodedBatch(protocol.Batch(JOB, step, rank, micro, num_micro(step), checksum(arrays), 1, 1, 0),
                        encode_batch(arrays))


@pytest.mark.timeout(15)
def test_eagain_keeps_the_batch_and_heartbeats_follow_the_injected_clock() -> None:
    now = [0.0]
    sock = FakeRouter()
    d = TrainerDelivery(sock, job=JOB, fingerprint=FP, ranks=[0, 1], mp_size=1, heartbeat_s=1.0, clock=lambda: now[0])
    d.handle(b"t0", protocol.Subscribe(JOB, FP, 0, 0, 1, 1, 2))
    assert d.demand() == {0: (1, 1)}
    lookups: list[tuple[int, int, int]] = []

    def lookup(rank: int, step: int, micro: int) -> EncodedBatch | None:
        lookups.append((rank, step, micro))
        return _batch(step, micro, rank) if step < 3 else None

    sock.fail = [zmq.EAGAIN]
    assert d.pump(lookup) == 0 and d.stats()["eagain"] == 1
    assert d.pump(lookup) == 2  # the kept batch (1, 1), then (2, 0); credits now 0
    assert lookups == [(0, 1, 1), (0, 2, 0)]  # the kept batch was not looked up again
    assert [protocol.decode(f[1:])[0].step for f in sock.sent] == [1, 2]
    assert d.demand() == {0: (2, 1)}
    now[0] = 5.0
    assert d.pump(lookup) == 0 and d.stats()["heartbeats_sent"] == 0  # no credits: no heartbeat
    d.handle(b"t0", protocol.Credit(JOB, 0, 0, 5))
    assert d.pump(lookup) == 2  # (2, 1), (2, 2); step 3 is not ready
    now[0] = 5.5
    assert d.pump(lookup) == 0 and d.stats()["heartbeats_sent"] == 0
    now[0] = 6.0
    d.pump(lookup)
    hb, _ = protocol.decode(sock.sent[-1][1:])
    assert isinstance(hb, protocol.Heartbeat) and hb.next_step == 3
    sock.fail = [zmq.EHOSTUNREACH]
    now[0] = 7.0
    d.pump(lookup)
    assert d.stats()["unreachable_dropped"] == 1 and d.demand() == {}


@pytest.mark.timeout(15)
def test_resubscribe_replaces_and_wrong_lookup_is_a_bug() -> None:
    sock = FakeRouter()
    d = TrainerDelivery(sock, job=JOB, fingerprint=FP, ranks=[0], mp_size=2)
    d.handle(b"a", protocol.Subscribe(JOB, FP, 0, 0, 4, 0, 1))
    d.handle(b"b", protocol.Subscribe(JOB, FP, 0, 1, 2, 1, 1))
    assert d.demand() == {0: (2, 1)}
    d.handle(b"c", protocol.Subscribe(JOB, FP, 0, 1, 6, 0, 1))  # mp 1 restarted on a new socket
    assert d.demand() == {0: (4, 0)} and len(d.stats()["subscriptions"]) == 2
    with pytest.raises(ValueError, match="returned the batch"):
        d.pump(lambda rank, step, micro: _batch(0, 0))


@pytest.mark.timeout(15)
def test_data_wait_is_what_the_trainer_reports_with_its_credits() -> None:
    """A trainer's data wait is measured by its loader (asking for a batch until it has one) and
    travels with its credits; the constructor sums it per trainer, for the subscription (what
    fabricctl top shows) and per trainer ever served (what the metrics export)."""
    sock = FakeRouter()
    d = TrainerDelivery(sock, job=JOB, fingerprint=FP, ranks=[0], mp_size=1, heartbeat_s=100.0)
    lookup = lambda rank, step, micro: _batch(step, micro, rank)  # noqa: E731

    def waited() -> float:
        (sub,) = d.stats()["subscriptions"]
        return sub["data_wait_s"]

    d.handle(b"t0", protocol.Subscribe(JOB, FP, 0, 0, 0, 0, 2))
    assert d.pump(lookup) == 2 and waited() == 0.0
    d.handle(b"t0", protocol.Credit(JOB, 0, 0, 1, wait_s=1.25))
    d.handle(b"t0", protocol.Credit(JOB, 0, 0, 1, wait_s=0.5))
    assert waited() == 1.75
    assert d.pump(lookup) == 2
    assert d.stats()["delivered"] == [[0, 0, 4, 1.75]] and d.stats()["tokens_sent"] == 4  # each test batch holds 1 token
