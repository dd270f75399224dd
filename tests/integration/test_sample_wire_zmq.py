"""Loaded units over a real ZeroMQ socket (PAIR over inproc, zero-copy both ways): the frames of
``encode_load_reply`` decode to exactly the units sent, as views of the received frames."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from fabric_client import protocol
from fabricd.errors import SampleError
from fabricd.roles.sample_wire import decode_load_reply, encode_load_reply

from ..unit.test_sample_wire import FIXED, NATIVE, _assert_same, _fixed_unit, _native_unit, _request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def test_frames_survive_a_zmq_pair_round_trip_zero_copy() -> None:
    rng = np.random.default_rng(6)
    results = [
        _native_unit(rng, 40, [(2, 4), (4, 6)], targets=True),
        SampleError("src-b", 3, "transient read error"),
        _native_unit(rng, 9, []),
        _native_unit(rng, 30, [(8, 8)]),
    ]
    ctx = zmq.Context()
    a = ctx.socket(zmq.PAIR)
    b = ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://sample-wire-test")
        b.connect("inproc://sample-wire-test")
        frames = encode_load_reply(_request(len(results)), results, NATIVE)
        a.send_multipart(frames, copy=False)
        assert b.poll(10_000), "nothing arrived"
        got = b.recv_multipart(copy=False)
        assert all(isinstance(f, zmq.Frame) for f in got)
        msg, payload = protocol.decode(got)
        out = decode_load_reply(msg, payload)
        del got, payload, frames  # the views keep the frames' memory alive
        assert out[1] == "transient read error"
        for i in (0, 2, 3):
            _assert_same(out[i], results[i], NATIVE)
        assert not out[0].input_ids.flags.owndata and not out[0].pixels.flags.owndata  # views of the frames
        # fixed mode too, several messages back to back
        fixed = [_fixed_unit(rng, 30, [2, 20], targets=True), _fixed_unit(rng, 3, [])]
        for _ in range(3):
            a.send_multipart(encode_load_reply(_request(2), fixed, FIXED), copy=False)
        for _ in range(3):
            assert b.poll(10_000)
            msg, payload = protocol.decode(b.recv_multipart(copy=False))
            for g, w in zip(decode_load_reply(msg, payload), fixed):
                _assert_same(g, w, FIXED)
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
