"""protocol.py alone: parsing client frames and building server frames, no socket, no database."""

import json
from datetime import UTC, datetime, timedelta

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from channel_registry import protocol
from channel_registry.protocol import Direct, ProtocolError, decode_frame, parse_direct

LIMIT = 16 * 1024


def refused(code: str, call, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call(*args)
    assert caught.value.code == code
    return caught.value


def nested(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


# decode_frame


def test_a_json_object_is_decoded():
    assert decode_frame('{"type": "ping", "n": [1, 2.5, null]}', LIMIT) == {"type": "ping", "n": [1, 2.5, None]}


def test_a_binary_frame_is_invalid_payload():
    assert "binary" in refused("invalid_payload", decode_frame, None, LIMIT).detail


def test_the_limit_is_inclusive_and_counts_utf8_bytes():
    fits = '{"m": "' + "x" * (LIMIT - 9) + '"}'
    assert len(fits) == LIMIT
    assert decode_frame(fits, LIMIT)
    refused("too_large", decode_frame, fits + " ", LIMIT)
    two_byte = '{"m": "' + "é" * (LIMIT // 2) + '"}'
    assert len(two_byte) < LIMIT
    refused("too_large", decode_frame, two_byte, LIMIT)


def test_a_raw_lone_surrogate_counts_three_bytes_and_is_refused_not_crashed_on():
    refused("too_large", decode_frame, "\ud800" * 6, 17)
    refused("invalid_json", decode_frame, '{"m": "\ud800"}', LIMIT)


@pytest.mark.parametrize(
    "text",
    ["", "nope", "{", '{"a": 1,}', "{'a': 1}", '{"a": NaN}', '{"a": -Infinity}', '{"a": 1e999}', '{"a": 1} 2'],
)
def test_what_is_not_strict_json_is_invalid_json(text):
    refused("invalid_json", decode_frame, text, LIMIT)


@pytest.mark.parametrize("text", ["[]", "1", '"s"', "null", "true"])
def test_json_other_than_an_object_is_invalid_json(text):
    refused("invalid_json", decode_frame, text, LIMIT)


@pytest.mark.parametrize(
    "text", ['{"m": "\\ud800"}', '{"m": "\\udc00\\ud800"}', '{"\\udfff": 1}', '{"m": ["\\ud83d"]}']
)
def test_escaped_lone_surrogates_are_invalid_json(text):
    refused("invalid_json", decode_frame, text, LIMIT)


def test_an_escaped_surrogate_pair_is_one_character():
    assert decode_frame('{"m": "\\ud83d\\udc4b"}', LIMIT) == {"m": "👋"}


def test_nesting_past_the_parsers_recursion_limit_is_invalid_json():
    refused("invalid_json", decode_frame, '{"m": ' + "[" * 5000 + "]" * 5000 + "}", LIMIT)


@pytest.mark.parametrize("inner", [("[", "]"), ('{"a":', "}")])
def test_frame_depth_limit_is_the_same_on_every_interpreter(inner):
    """Python 3.13's parser accepts 5,000 levels, 3.11's stops near 1,000: the limit is the library's."""
    opening, closing = inner
    depth = protocol.MAX_FRAME_DEPTH - 1  # plus the frame's own object
    at_limit = '{"m": ' + opening * depth + "1" + closing * depth + "}"
    assert decode_frame(at_limit, LIMIT)["m"] is not None
    past = '{"m": ' + opening * (depth + 1) + "1" + closing * (depth + 1) + "}"
    error = refused("invalid_json", decode_frame, past, LIMIT)
    assert str(protocol.MAX_FRAME_DEPTH) in error.detail


@given(st.text(st.characters(codec=None, exclude_categories=[])))
def test_any_text_is_decoded_or_refused_with_a_protocol_error(text):
    try:
        payload = decode_frame(text, LIMIT)
    except ProtocolError as error:
        assert error.code in {"invalid_json", "too_large"}
        return
    assert isinstance(payload, dict)
    json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()


# read_client_id and parse_direct


@pytest.mark.parametrize(
    ("frame", "client_id"),
    [
        ({}, None),
        ({"id": None}, None),
        ({"id": ""}, ""),
        ({"id": "a" * 64}, "a" * 64),
        ({"id": "a" * 65}, None),
        ({"id": 0}, 0),
        ({"id": -(2**53) + 1}, -(2**53) + 1),
        ({"id": True}, None),
        ({"id": 1.0}, None),
        ({"id": ["a"]}, None),
    ],
)
def test_read_client_id_returns_only_ids_that_can_be_echoed(frame, client_id):
    assert protocol.read_client_id(frame) == client_id
    assert type(protocol.read_client_id(frame)) is type(client_id)


def test_a_valid_direct_frame_is_parsed_ignoring_from_and_extra_fields():
    payload = {"type": "direct", "to": 7, "message": {"a": [1]}, "id": "c1", "from": 1, "extra": True}
    assert parse_direct(payload) == Direct(to=7, message={"a": [1]}, id="c1")
    assert parse_direct({"to": 2**53 - 1, "message": None}) == Direct(to=2**53 - 1, message=None, id=None)


@pytest.mark.parametrize(
    ("field", "payload"),
    [
        ("to", {"message": 1}),
        ("to", {"to": "7", "message": 1}),
        ("to", {"to": 7.0, "message": 1}),
        ("to", {"to": True, "message": 1}),
        ("to", {"to": 0, "message": 1}),
        ("to", {"to": 2**53, "message": 1}),
        ("message", {"to": 7}),
        ("message", {"to": 7, "message": nested(100)}),
        ("message", {"to": 7, "message": [2**64]}),
        ("message", {"to": 7, "message": {"n": -(2**63) - 1}}),
    ],
)
def test_a_bad_field_is_invalid_payload_naming_it_with_the_id_kept(field, payload):
    error = refused("invalid_payload", parse_direct, {"id": "c1", **payload})
    assert f"'{field}'" in error.detail
    assert error.frame() == {"type": "error", "code": "invalid_payload", "detail": error.detail, "id": "c1"}


@pytest.mark.parametrize("client_id", ["a" * 65, 1.5, False, [1], {"a": 1}])
def test_an_unusable_id_is_invalid_payload_without_an_id(client_id):
    error = refused("invalid_payload", parse_direct, {"to": 7, "message": 1, "id": client_id})
    assert "'id'" in error.detail
    assert "id" not in error.frame()


def test_64_bit_integers_and_moderate_nesting_are_carried():
    for message in [2**64 - 1, -(2**63), nested(20), {"a": {"b": {"c": [[]]}}}]:
        assert parse_direct({"to": 7, "message": message}).message == message


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=30,
)


@given(
    st.fixed_dictionaries(
        {}, optional={"to": st.integers() | JSON, "message": JSON | st.integers(0, 60).map(nested), "id": JSON}
    )
)
def test_what_parse_direct_accepts_the_channel_layer_and_json_can_carry(payload):
    try:
        direct = parse_direct(payload)
    except ProtocolError as error:
        assert error.code == "invalid_payload"
        return
    event = {"type": "registry.direct", "frame": protocol.direct_frame(1, direct)}
    assert msgpack.unpackb(msgpack.packb(event, use_bin_type=True), raw=False) == event
    json.dumps(event, allow_nan=False)


# Server frames


def test_error_frame_carries_falsy_ids_and_omits_a_missing_one():
    assert protocol.error_frame("forbidden", "no", 0) == {"type": "error", "code": "forbidden", "detail": "no", "id": 0}
    assert protocol.error_frame("forbidden", "no", "")["id"] == ""
    assert "id" not in protocol.error_frame("forbidden", "no")


def test_ack_frame_carries_delivered_even_when_unknown():
    assert protocol.ack_frame("c", 0) == {"type": "ack", "id": "c", "delivered": 0}
    assert protocol.ack_frame(None, None) == {"type": "ack", "id": None, "delivered": None}


def test_direct_frame_names_the_given_sender_and_a_utc_millisecond_timestamp():
    frame = protocol.direct_frame(42, Direct(to=7, message="hi", id=3))
    sent_at = frame.pop("sent_at")
    assert frame == {"type": "direct", "from": 42, "message": "hi", "id": 3}
    assert sent_at.endswith("Z") and len(sent_at) == len("2024-01-01T00:00:00.000Z")
    moment = datetime.fromisoformat(sent_at)
    assert moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=5)
