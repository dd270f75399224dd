"""The wire protocol: every record round-trips; malformed input is a ProtocolError, nothing else.

Records are generated from their own type declarations (fabricd.fuzzing), so every field of every
record type is covered, including fields added later."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from fabric_client import protocol
from fabric_client.errors import ProtocolError
from fabric_client.limits import MAX_STEP
from fabricd import fuzzing
from fabricd.cluster.wire import PEER_KINDS, from_peer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

RECORDS = sorted(protocol.message_types())


@pytest.mark.parametrize("name", RECORDS)
def test_every_message_round_trips(name):
    rng = random.Random(name)
    cls = protocol.message_types()[name]
    for _ in range(20):
        frames = [fuzzing.header(fuzzing.valid_record(cls, rng)), b"payload"]
        msg, payload = protocol.decode(frames)
        assert type(msg) is cls and payload == [b"payload"]
        again, _ = protocol.decode(protocol.encode(msg))
        assert again == msg


@pytest.mark.parametrize("name", RECORDS)
def test_every_field_with_a_wrong_type_or_extreme_value_is_refused(name):
    cls = protocol.message_types()[name]
    cases = list(fuzzing.field_mutations(cls, random.Random(name)))
    assert cases or not msgspec.inspect.type_info(cls).fields[:-1]
    for what, head in cases:
        with pytest.raises(ProtocolError) as info:
            protocol.decode([head])
        assert info.value.code == protocol.ErrorCode.MALFORMED, what


@pytest.mark.parametrize("kind", ["vote_request", "vote_reply", "lease_renew", "lease_ack", "member_beat"])
def test_every_peer_message_field_is_checked(kind):
    cls = PEER_KINDS[kind]
    rng = random.Random(kind)
    for _ in range(10):  # valid bodies decode
        from_peer(protocol.PeerMessage(sender="a", kind=kind, body=fuzzing.encode_raw(fuzzing.valid_record(cls, rng))))
    for what, head in fuzzing.field_mutations(cls, rng):
        body = msgspec.Raw(head.replace(b'"v":1,', b"", 1))
        with pytest.raises(ProtocolError):
            from_peer(protocol.PeerMessage(sender="a", kind=kind, body=body))
            pytest.fail(what)


def _header(**fields):
    return json.dumps({"v": protocol.PROTOCOL_VERSION, **fields}).encode()


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], "malformed"),
        ([b"\xff\xfe not json"], "malformed"),
        ([b"[1, 2]"], "malformed"),
        ([b"[" * 100_000], "malformed"),
        ([b'{"t":"ping","nonce":' + b"[" * 100_000 + b"]" * 100_000 + b"}"], "malformed"),
        ([json.dumps({"v": 99, "t": "ping"}).encode()], "version"),
        ([json.dumps({"v": 2, "t": "locate", "new_field": 1}).encode()], "version"),
        ([_header(t="no_such_type")], "unknown_type"),
        ([_header(t=5)], "unknown_type"),
        ([_header(job="j")], "unknown_type"),
        ([_header(t="locate", job="j", dp_rank=0)], "malformed"),                     # missing dp_size
        ([_header(t="locate", job="j", dp_rank="0", dp_size=1)], "malformed"),        # wrong type
        ([_header(t="locate", job="j", dp_rank=True, dp_size=1)], "malformed"),       # bool is not int
        ([_header(t="locate", job="j", dp_rank=0, dp_size=1, evil=1)], "malformed"),  # unknown field
        ([_header(t="plan_request", job="j", step=0, ranks=[0, "1"])], "malformed"),  # list element
        ([_header(t="plan_request", job="j", step=2**62, ranks=[0])], "malformed"),   # step out of range
        ([_header(t="plan_request", job="j", step=MAX_STEP + 1, ranks=[0])], "malformed"),
        ([_header(t="subscribe", job="j", fingerprint="f", dp_rank=0, mp_rank=0, next_step=2**62,
                  next_micro=0, credits=1)], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"departed": [[0, 0, 2**70]]})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"subscriptions": [1, 2]})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"subscriptions": 5})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"subscriptions": "ab"})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"subscriptions": None})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"subscriptions": [{}]})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"subscriptions": [{"dp_rank": 0, "mp_rank": 0}]})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"departed": 5})], "malformed"),
        ([_header(t="role_stats", role_id="r", stats={"departed": None})], "malformed"),
        ([_header(t="skip_report", job="j", step=-1, source="s", sample_id=0, piece=0, reason="")], "malformed"),
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


def test_positional_construction_and_type_names():
    assert protocol.Subscribe("j", "f", 0, 0, 5, 0, 3).next_step == 5
    assert protocol.Batch.TYPE == "batch" and protocol.message_types()["batch"] is protocol.Batch


def test_frame_damage_is_never_anything_but_a_protocol_error():
    rng = random.Random(3)
    good = protocol.encode(protocol.Locate(job="j", dp_rank=0, dp_size=1))
    for _ in range(300):
        _, frames = fuzzing.frame_damage(list(good), rng)
        try:
            protocol.decode(frames)
        except ProtocolError:
            pass
