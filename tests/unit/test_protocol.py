"""The wire protocol: every record round-trips; malformed input is a ProtocolError, nothing else."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from fabric_client import protocol
from fabric_client.errors import ProtocolError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

SAMPLE_VALUES = {int: 7, str: "x", float: 1.5, bool: True, dict: {"a": 1}}


def _sample(cls):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        kwargs[f.name] = [] if typing.get_origin(tp) is list else SAMPLE_VALUES[tp]
    return cls(**kwargs)


@pytest.mark.parametrize("name", sorted(protocol.message_types()))
def test_every_message_round_trips(name):
    cls = protocol.message_types()[name]
    msg = _sample(cls)
    frames = protocol.encode(msg, (b"payload",))
    decoded, payload = protocol.decode(frames)
    assert decoded == msg and payload == [b"payload"]


def _header(**fields):
    return json.dumps({"v": protocol.PROTOCOL_VERSION, **fields}).encode()


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], "malformed"),
        ([b"\xff\xfe not json"], "malformed"),
        ([b"[1, 2]"], "malformed"),
        ([json.dumps({"v": 99, "t": "ping"}).encode()], "version"),
        ([json.dumps({"t": "ping"}).encode()], "version"),
        ([_header(t="no_such_type")], "unknown_type"),
        ([_header(t=5)], "unknown_type"),
        ([_header(t="locate", job="j", dp_rank=0)], "malformed"),                     # missing dp_size
        ([_header(t="locate", job="j", dp_rank="0", dp_size=1)], "malformed"),        # wrong type
        ([_header(t="locate", job="j", dp_rank=True, dp_size=1)], "malformed"),       # bool is not int
        ([_header(t="locate", job="j", dp_rank=0, dp_size=1, evil=1)], "malformed"),  # unknown field
        ([_header(t="plan_request", job="j", step=0, ranks=[0, "1"])], "malformed"),  # list element
        ([b" " * (protocol.MAX_HEADER_BYTES + 1)], "malformed"),
    ],
)
def test_malformed_messages_are_protocol_errors(frames, code):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames)
    assert info.value.code == code


def test_defaults_fill_missing_optional_fields():
    msg, _ = protocol.decode([_header(t="locate", job="j", dp_rank=1, dp_size=2)])
    assert msg == protocol.Locate(job="j", dp_rank=1, dp_size=2, mp_rank=0)
