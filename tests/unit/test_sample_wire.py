"""Loaded units on the wire (``fabricd.roles.sample_wire``): ``encode_load_reply`` ->
frames -> ``decode_load_reply`` gives back every field exactly, in fixed and native mode, with
and without targets, with failed slots; malformed frames are a ``ProtocolError(MALFORMED)``
and never another exception. (The same frames over a real ZeroMQ socket:
``tests/integration/test_sample_wire_zmq.py``.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fabric_client import protocol
from fabric_client.errors import ProtocolError
from fabricd.errors import SampleError
from fabricd.images import ImageSpec
from fabricd.roles.sample_wire import decode_load_reply, encode_load_reply, pixel_shape
from fabricd.sources.transform import SampleData

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

FIXED = ImageSpec(mode="fixed", image_tokens=5, image_size=4)
# p = 2, m = 2: a patch row is 3 * 2 * 2 = 12 values; an image of grid (1, gh, gw) has gh*gw patches
NATIVE = ImageSpec(mode="native", patch_size=2, merge_size=2, min_pixels=16, max_pixels=4096)


def _request(n: int, req_id: int = 41) -> protocol.LoadRequest:
    return protocol.LoadRequest(job="job-a", source="src-b", req_id=req_id, count=n)


def _fixed_unit(rng: np.random.Generator, length: int, starts: list[int], *, targets: bool = False) -> SampleData:
    k = len(starts)
    return SampleData(
        input_ids=rng.integers(3, 50_000, length).astype(np.int32),
        image_starts=np.array(starts, np.int32),
        pixels=rng.integers(0, 256, (k, 4, 4, 3)).astype(np.uint8),
        image_lengths=np.full(k, FIXED.image_tokens, np.int32),
        image_grid=np.tile(np.array([1, 4, 4], np.int32), (k, 1)),
        targets=(np.where(rng.random(length) < 0.3, -100, rng.integers(3, 50_000, length)).astype(np.int32)
                 if targets else None),
    )


def _native_unit(rng: np.random.Generator, length: int, grids: list[tuple[int, int]], *,
                 targets: bool = False) -> SampleData:
    k = len(grids)
    lengths = [gh * gw // 4 for gh, gw in grids]
    starts, pos = [], 1
    for ln in lengths:
        starts.append(pos)
        pos += ln + 1
    assert pos <= length
    rows = sum(gh * gw for gh, gw in grids)
    return SampleData(
        input_ids=rng.integers(3, 50_000, length).astype(np.int32),
        image_starts=np.array(starts, np.int32),
        pixels=rng.integers(0, 256, (rows, NATIVE.patch_dim)).astype(np.uint8),
        image_lengths=np.array(lengths, np.int32),
        image_grid=np.array([(1, gh, gw) for gh, gw in grids], np.int32).reshape(k, 3),
        targets=(np.where(rng.random(length) < 0.3, -100, rng.integers(3, 50_000, length)).astype(np.int32)
                 if targets else None),
    )


def _assert_same(got: SampleData, want: SampleData, images: ImageSpec) -> None:
    assert isinstance(got, SampleData)
    for name, dtype in (("input_ids", np.int32), ("image_starts", np.int32), ("image_lengths", np.int32),
                        ("image_grid", np.int32)):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert a.shape == np.asarray(b).shape, name
    assert got.pixels.dtype == np.uint8
    assert got.pixels.shape == want.pixels.shape
    assert got.pixels.shape[1:] == pixel_shape(images)
    np.testing.assert_array_equal(got.pixels, want.pixels)
    if want.targets is None:
        assert got.targets is None
    else:
        assert got.targets is not None and got.targets.dtype == np.int32
        np.testing.assert_array_equal(got.targets, want.targets)


def _round_trip(req: protocol.LoadRequest, results: list, images: ImageSpec, *, as_bytes: bool = True):
    frames = encode_load_reply(req, results, images)
    assert len(frames) == 11  # header + 10 payload frames
    if as_bytes:  # what a socket hands over (copy=True)
        frames = [f if isinstance(f, bytes) else memoryview(np.ascontiguousarray(f)).cast("B").tobytes()
                  for f in frames]
    msg, payload = protocol.decode(frames)
    assert isinstance(msg, protocol.LoadReply)
    return msg, decode_load_reply(msg, payload)


def _check(req: protocol.LoadRequest, results: list, images: ImageSpec, **kw) -> protocol.LoadReply:
    msg, out = _round_trip(req, results, images, **kw)
    assert (msg.job, msg.source, msg.req_id, msg.count) == (req.job, req.source, req.req_id, len(results))
    assert tuple(msg.pixel_shape) == pixel_shape(images)
    assert len(out) == len(results)
    for got, want in zip(out, results):
        if isinstance(want, SampleError):
            assert got == want.reason
        else:
            _assert_same(got, want, images)
    return msg


# ------------------------------------------------------------------------------------------
# round trips


def test_pixel_shape() -> None:
    assert pixel_shape(FIXED) == (4, 4, 3)
    assert pixel_shape(NATIVE) == (12,)
    assert pixel_shape(ImageSpec(mode="native")) == (588,)


def test_round_trip_fixed_mixed() -> None:
    rng = np.random.default_rng(1)
    results = [
        _fixed_unit(rng, 30, [2, 20]),
        SampleError("src-b", 7, "image 0: cannot decode: UnidentifiedImageError: nope"),
        _fixed_unit(rng, 11, [], targets=True),           # no images
        _fixed_unit(rng, 17, [0], targets=True),
        SampleError("src-b", 9, "piece 3 out of range: the sample has 1 piece(s)"),
        _fixed_unit(rng, 1, []),                          # a one-token unit
    ]
    msg = _check(_request(len(results)), results, FIXED)
    assert [list(e) for e in msg.errors] == [[1, results[1].reason], [4, results[4].reason]]


def test_round_trip_native_mixed() -> None:
    rng = np.random.default_rng(2)
    results = [
        _native_unit(rng, 40, [(2, 4), (4, 6)], targets=True),
        _native_unit(rng, 9, []),                                   # zero images
        SampleError("src-b", 3, "transient read error"),
        _native_unit(rng, 25, [(2, 2)]),
        _native_unit(rng, 60, [(6, 2), (2, 2), (4, 4)]),
        _native_unit(rng, 12, [], targets=True),
    ]
    _check(_request(len(results)), results, NATIVE)
    # also straight from encode's frames (numpy arrays, no bytes copy in between)
    _check(_request(len(results)), results, NATIVE, as_bytes=False)


def test_round_trip_native_default_geometry() -> None:
    spec = ImageSpec(mode="native")
    rng = np.random.default_rng(3)
    unit = SampleData(
        input_ids=rng.integers(3, 100, 20).astype(np.int32),
        image_starts=np.array([3], np.int32),
        pixels=rng.integers(0, 256, (16, 588)).astype(np.uint8),
        image_lengths=np.array([4], np.int32),
        image_grid=np.array([[1, 4, 4]], np.int32),
    )
    _check(_request(1), [unit], spec)


def test_round_trip_all_failed_and_empty_request() -> None:
    errs = [SampleError("src-b", i, f"reason {i} ünïcode") for i in range(3)]
    msg, out = _round_trip(_request(3), errs, NATIVE)
    assert out == ["reason 0 ünïcode", "reason 1 ünïcode", "reason 2 ünïcode"]
    msg, out = _round_trip(_request(0), [], FIXED)
    assert out == [] and msg.count == 0 and msg.errors == []
    msg, out = _round_trip(_request(0), [], NATIVE)
    assert out == []


def test_round_trip_only_units_without_images() -> None:
    rng = np.random.default_rng(4)
    results = [_fixed_unit(rng, 5, []), _fixed_unit(rng, 8, [], targets=True)]
    _check(_request(2), results, FIXED)
    results = [_native_unit(rng, 5, []), _native_unit(rng, 8, [], targets=True)]
    _check(_request(2), results, NATIVE)


def test_defaults_for_missing_lengths_and_grids() -> None:
    """A fixed-mode unit without image_lengths / image_grid: every block is image_tokens long,
    grids are zeros (what decode hands pack_micro_batch)."""
    unit = SampleData(input_ids=np.arange(3, 20, dtype=np.int32), image_starts=np.array([1, 8], np.int32),
                      pixels=np.full((2, 4, 4, 3), 9, np.uint8))
    _, (out,) = _round_trip(_request(1), [unit], FIXED)
    np.testing.assert_array_equal(out.image_lengths, [5, 5])
    np.testing.assert_array_equal(out.image_grid, np.zeros((2, 3)))
    assert out.targets is None


def test_random_round_trips() -> None:
    rng = np.random.default_rng(5)
    for trial in range(40):
        native = bool(trial % 2)
        results = []
        for _ in range(int(rng.integers(0, 9))):
            kind = rng.integers(0, 5)
            if kind == 0:
                results.append(SampleError("src-b", int(rng.integers(0, 99)), "x" * int(rng.integers(0, 50))))
            elif native:
                k = int(rng.integers(0, 4))
                grids = [(2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))) for _ in range(k)]
                need = sum(gh * gw // 4 + 1 for gh, gw in grids) + 1
                results.append(_native_unit(rng, need + int(rng.integers(0, 20)), grids, targets=bool(kind % 2)))
            else:
                k = int(rng.integers(0, 3))
                length = int(rng.integers(1, 40)) + k * FIXED.image_tokens
                starts = sorted(rng.integers(0, length - FIXED.image_tokens + 1, k).tolist())  # blocks inside
                results.append(_fixed_unit(rng, length, starts, targets=bool(kind % 2)))
        _check(_request(len(results), req_id=trial), results, NATIVE if native else FIXED, as_bytes=bool(trial % 3))


# ------------------------------------------------------------------------------------------
# malformed frames


def _valid(native: bool = True) -> tuple[protocol.LoadReply, list[bytes]]:
    rng = np.random.default_rng(7)
    if native:
        results = [_native_unit(rng, 20, [(2, 4)], targets=True), SampleError("s", 1, "bad"),
                   _native_unit(rng, 30, [(2, 2), (4, 2)])]
        images = NATIVE
    else:
        results = [_fixed_unit(rng, 20, [3], targets=True), SampleError("s", 1, "bad"), _fixed_unit(rng, 9, [0, 4])]
        images = FIXED
    frames = encode_load_reply(_request(3), results, images)
    msg, payload = protocol.decode([frames[0]] + [memoryview(np.ascontiguousarray(f)).cast("B").tobytes()
                                                  for f in frames[1:]])
    decode_load_reply(msg, payload)  # the baseline is valid
    return msg, payload


def _malformed(msg: protocol.LoadReply, payload: list) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_load_reply(msg, payload)
    assert info.value.code == protocol.ErrorCode.MALFORMED
    return info.value


def _i64(values: list[int]) -> bytes:
    return np.array(values, np.int64).tobytes()


def _replace(payload: list, i: int, frame: bytes) -> list:
    out = list(payload)
    out[i] = frame
    return out


def _with(msg: protocol.LoadReply, **changes) -> protocol.LoadReply:
    fields = {f: getattr(msg, f) for f in msg.__struct_fields__}
    fields.update(changes)
    return protocol.LoadReply(**fields)


@pytest.mark.parametrize("count", [0, 1, 9, 11, 20])
def test_wrong_frame_count(count: int) -> None:
    msg, payload = _valid()
    frames = (payload * 2)[:count]
    err = _malformed(msg, frames)
    assert "10" in err.reason


@pytest.mark.parametrize("native", [True, False])
def test_offsets_not_matching(native: bool) -> None:
    msg, payload = _valid(native)
    tok = np.frombuffer(payload[1], np.int64).tolist()
    img = np.frombuffer(payload[3], np.int64).tolist()
    px = np.frombuffer(payload[5], np.int64).tolist()
    tgt = np.frombuffer(payload[9], np.int64).tolist()
    assert tok[0] == 0 and len(tok) == 4
    cases = [
        (1, _i64(tok[:-1])),                              # n offsets for n units
        (1, _i64(tok + [tok[-1]])),                       # n + 2
        (1, _i64([1] + tok[1:])),                         # not starting at 0
        (1, _i64(tok[:-1] + [tok[-1] - 1])),              # not ending at the frame's size
        (1, _i64(tok[:-1] + [tok[-1] + 1])),
        (1, _i64([0, tok[2], tok[1], tok[3]] if tok[2] != tok[1] else [0, 5, 2, tok[3]])),  # decreasing
        (1, b""),
        (3, _i64(img[:-1] + [img[-1] + 1])),
        (3, _i64([0, img[-1], 0, img[-1]])),
        (5, _i64(px[:-1] + [px[-1] - 1])),
        (5, _i64([0, -1, px[-1], px[-1]])),
        (9, _i64(tgt[:-1] + [tgt[-1] + 2])),
        (9, _i64([0] * 4)),
    ]
    for i, frame in cases:
        _malformed(msg, _replace(payload, i, frame))
    # per-image frames of another count than image starts
    lens = np.frombuffer(payload[6], np.int32)
    _malformed(msg, _replace(payload, 6, lens[:-1].tobytes()))
    _malformed(msg, _replace(payload, 6, np.concatenate([lens, [1]]).astype(np.int32).tobytes()))
    grids = np.frombuffer(payload[7], np.int32).reshape(-1, 3)
    _malformed(msg, _replace(payload, 7, grids[:-1].tobytes()))
    _malformed(msg, _replace(payload, 7, np.concatenate([grids, [[1, 2, 2]]]).astype(np.int32).tobytes()))
    # the header's count disagrees with the offsets
    _malformed(_with(msg, count=2), payload)
    _malformed(_with(msg, count=4), payload)


@pytest.mark.parametrize("native", [True, False])
def test_truncated_buffers(native: bool) -> None:
    msg, payload = _valid(native)
    for i in range(10):
        frame = payload[i]
        for cut in sorted({1, 3, 4, 8, len(frame)}):
            if 0 < cut <= len(frame):
                _malformed(msg, _replace(payload, i, frame[:-cut]))
        # one byte too many is not a whole element (nor a whole pixel row) either
        _malformed(msg, _replace(payload, i, frame + b"\x00"))


@pytest.mark.parametrize("shape", [[-1], [0], [], [12, -3], [-12], [4, 4, 0], [5], [4, 4, 4]])
def test_bad_pixel_shape(shape: list[int]) -> None:
    msg, payload = _valid(native=shape != [4, 4, 4])  # [4, 4, 4]: fixed rows of 48 bytes read as 64
    _malformed(_with(msg, pixel_shape=shape), payload)


def test_negative_pixel_shape_is_refused_in_the_header() -> None:
    msg, payload = _valid()
    header = json.loads(protocol.encode(msg)[0])
    for bad in ([-588], [0, -1], [1, 2, 3, 4], "588", [1.5]):
        header["pixel_shape"] = bad
        with pytest.raises(ProtocolError) as info:
            protocol.decode([json.dumps(header).encode(), *payload])
        assert info.value.code == protocol.ErrorCode.MALFORMED


def test_targets_not_matching_tokens() -> None:
    msg, payload = _valid()
    tok = np.frombuffer(payload[1], np.int64)
    tgt = np.frombuffer(payload[9], np.int64)
    targets = np.frombuffer(payload[8], np.int32)
    assert tgt[1] - tgt[0] == tok[1] - tok[0] and tgt[-1] == tgt[1]   # unit 0 has targets
    # unit 0's targets one short, unit 2's one long: both frames stay self-consistent in size
    short = _i64([0, int(tgt[1]) - 1, int(tgt[1]) - 1, int(tgt[1]) - 1])
    err = _malformed(msg, _replace(_replace(payload, 9, short), 8, targets[:-1].tobytes()))
    assert "unit 0" in err.reason
    # unit 2 gets targets of another length than its tokens
    extra = np.concatenate([targets, np.arange(5, dtype=np.int32)])
    n0 = int(tgt[1])
    err = _malformed(msg, _replace(_replace(payload, 9, _i64([0, n0, n0, n0 + 5])), 8, extra.tobytes()))
    assert "unit 2" in err.reason


def test_pixels_not_whole_rows() -> None:
    msg, payload = _valid()
    px = payload[4]
    _malformed(msg, _replace(payload, 4, px[:-5]))
    _malformed(msg, _replace(payload, 4, px + b"\x01" * 7))
    msg, payload = _valid(native=False)
    _malformed(msg, _replace(payload, 4, payload[4][:-48]))   # one whole row missing: offsets disagree
    _malformed(msg, _replace(payload, 4, payload[4][:-47]))


def test_random_corruption_is_malformed_or_decodes() -> None:
    """Never anything but ProtocolError(MALFORMED): flipped bytes, cut and grown frames, swapped
    frames, random pixel shapes and counts."""
    rng = np.random.default_rng(8)
    base = [_valid(True), _valid(False)]
    for trial in range(600):
        msg, payload = base[trial % 2]
        payload = list(payload)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, 10))
            f = bytearray(payload[i])
            op = rng.integers(0, 5)
            if op == 0 and f:
                f[int(rng.integers(0, len(f)))] = int(rng.integers(0, 256))
            elif op == 1:
                f = f[:int(rng.integers(0, len(f) + 1))]
            elif op == 2:
                f += rng.integers(0, 256, int(rng.integers(1, 30))).astype(np.uint8).tobytes()
            elif op == 3:
                j = int(rng.integers(0, 10))
                payload[i], payload[j] = payload[j], payload[i]
                continue
            else:
                f = bytearray(rng.integers(0, 256, int(rng.integers(0, 64))).astype(np.uint8).tobytes())
            payload[i] = bytes(f)
        m = msg
        if rng.random() < 0.2:
            m = _with(m, pixel_shape=[int(x) for x in rng.integers(-2, 20, int(rng.integers(0, 4)))])
        if rng.random() < 0.2:
            m = _with(m, count=int(rng.integers(0, 6)))
        try:
            out = decode_load_reply(m, payload)
        except ProtocolError as e:
            assert e.code == protocol.ErrorCode.MALFORMED
        else:
            assert len(out) == m.count
            for u in out:
                assert isinstance(u, (SampleData, str))


def test_a_long_failure_reason_does_not_poison_the_reply() -> None:
    rng = np.random.default_rng(9)
    ok = _fixed_unit(rng, 10, [2])
    results = [ok, SampleError("src-b", 5, "image " + "a/" * 5000 + "x.png: No such file or directory")]
    frames = encode_load_reply(_request(2), results, FIXED)
    msg, payload = protocol.decode(frames)           # raises ProtocolError(MALFORMED) today
    out = decode_load_reply(msg, payload)
    _assert_same(out[0], ok, FIXED)
    assert isinstance(out[1], str) and out[1].startswith("image a/a/")


@pytest.mark.parametrize("case", ["fixed_rows", "native_rows", "start_outside"])
def test_inconsistent_unit_is_malformed_at_decode(case: str) -> None:
    rng = np.random.default_rng(10)
    if case == "fixed_rows":
        unit, images = _fixed_unit(rng, 20, [3, 9]), FIXED
        unit = SampleData(unit.input_ids, unit.image_starts, unit.pixels[:1], unit.image_lengths, unit.image_grid)
    elif case == "native_rows":
        unit, images = _native_unit(rng, 20, [(2, 4)]), NATIVE
        unit = SampleData(unit.input_ids, unit.image_starts, unit.pixels[:-4], unit.image_lengths, unit.image_grid)
    else:
        unit, images = _fixed_unit(rng, 20, [3]), FIXED
        unit = SampleData(unit.input_ids, np.array([25], np.int32), unit.pixels, unit.image_lengths, unit.image_grid)
    msg, payload = protocol.decode(encode_load_reply(_request(1), [unit], images))
    _malformed(msg, payload)


def _first_problem_per_unit(msg: protocol.LoadReply, payload: list) -> str | None:
    """The per-unit rule the decoder vectorizes, one unit at a time: the message of the first
    unit (not a failed one) whose targets or images are inconsistent, or None."""
    from fabricd.roles.sample_wire import _unit_problem
    b = [np.frombuffer(f, t) for f, t in zip(payload, (np.int32, np.int64, np.int32, np.int64, np.uint8, np.int64,
                                                        np.int32, np.int32, np.int32, np.int64))]
    ids, tok, starts, img, px, pxo, lens, grids, tg, tgo = b
    native = len(msg.pixel_shape) == 1
    px = px.reshape(-1, *msg.pixel_shape)
    grids = grids.reshape(-1, 3)
    failed = {int(i) for i, _ in msg.errors}
    for i in range(msg.count):
        if i in failed:
            continue
        if tgo[i + 1] != tgo[i] and tgo[i + 1] - tgo[i] != tok[i + 1] - tok[i]:
            return f"load_reply unit {i}: targets do not match its tokens"
        unit = SampleData(ids[tok[i]:tok[i + 1]], starts[img[i]:img[i + 1]], px[pxo[i]:pxo[i + 1]],
                          lens[img[i]:img[i + 1]], grids[img[i]:img[i + 1]])
        if (problem := _unit_problem(unit, native)) is not None:
            return f"load_reply unit {i}: {problem}"
    return None


@pytest.mark.parametrize("native", [False, True])
def test_inconsistent_units_found_as_one_at_a_time(native: bool) -> None:
    """The decoder checks every unit of a reply at once; it refuses exactly the replies, and
    names exactly the unit and the problem, that checking one unit at a time does: random
    replies with failed slots, whose starts, lengths, grids, targets and pixel rows are pushed
    out of shape one field at a time (the frames stay well-formed)."""
    rng = np.random.default_rng(11 + native)
    images = NATIVE if native else FIXED
    seen = {"refused": 0, "decoded": 0}
    for _ in range(400):
        n = int(rng.integers(1, 6))
        results = []
        for i in range(n):
            if rng.random() < 0.2:
                results.append(SampleError("src-b", i, "unreadable"))
            elif native:
                results.append(_native_unit(rng, 40, [(2, 2 * int(rng.integers(1, 4)))] * int(rng.integers(0, 3)),
                                            targets=bool(rng.random() < 0.5)))
            else:
                k = int(rng.integers(0, 3))
                results.append(_fixed_unit(rng, 30, sorted(rng.choice(20, k, replace=False).tolist()),
                                           targets=bool(rng.random() < 0.5)))
        msg, payload = protocol.decode(encode_load_reply(_request(n), results, images))
        payload = [bytearray(bytes(memoryview(f))) for f in payload]
        field = int(rng.choice([2, 6, 7, 9, 5]))  # starts, lengths, grids, target offsets, pixel offsets
        arr = np.frombuffer(payload[field], np.int32 if field in (2, 6, 7) else np.int64)
        if arr.size and rng.random() < 0.8:
            arr = arr.copy()
            j = int(rng.integers(0, arr.size))
            if field in (5, 9):  # an interior offset only, so the offsets stay in order and in bounds
                if 0 < j < arr.size - 1:
                    arr[j] = int(rng.integers(arr[j - 1], arr[j + 1] + 1))
            else:
                arr[j] = int(rng.integers(-3, 45))
            payload[field] = bytearray(arr.tobytes())
        payload = [bytes(f) for f in payload]
        want = _first_problem_per_unit(msg, payload)
        try:
            decode_load_reply(msg, payload)
        except ProtocolError as e:
            assert e.code == protocol.ErrorCode.MALFORMED
            assert want is not None and e.reason == want, (e.reason, want)
            seen["refused"] += 1
        else:
            assert want is None
            seen["decoded"] += 1
    assert seen["refused"] > 50 and seen["decoded"] > 50, seen
