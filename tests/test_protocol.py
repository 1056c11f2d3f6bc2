"""The wire protocol, end to end, spoken identically by both consumers.

``ProtocolContract`` runs twice: as ``TestMappingConsumer`` through ``RegistryConsumer``
(the explicit mapping) and as ``TestGroupConsumer`` through ``GroupConsumer`` (per-user
groups). They differ in the documented ways ``tests/backends.py`` declares, and the tests
that touch them read those declarations: the group strategy cannot count the channels a
group reaches, so its ``ack`` carries ``"delivered": null`` and the copies budget cannot
apply; and it keeps no rows, so it cannot tell presence.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from channel_registry.conf import RegistrySettings
from channel_registry.messaging import HOOKS_FIRST, DirectMessages

from .backends import GroupBackend, MappingBackend
from .conftest import rows

pytestmark = pytest.mark.django_db(transaction=True)

#: Generous: a passing test never waits this long, a loaded machine does not flake.
TIMEOUT = 3
PONG = {"type": "pong"}
#: A user id no test database reaches, yet inside PostgreSQL's integer column.
MISSING_USER_ID = 2**31 - 1


# Policies for CAN_MESSAGE, named by dotted path in the tests below.


def same_last_name(sender, recipient_id) -> bool:
    """A sync policy with an ORM query: the consumer must run it off the event loop."""
    return get_user_model().objects.filter(pk=recipient_id, last_name=sender.last_name).exists()


async def asame_last_name(sender, recipient_id) -> bool:
    """The same policy, async."""
    return await get_user_model().objects.filter(pk=recipient_id, last_name=sender.last_name).aexists()


# Matchers for the parts of a frame a test cannot know in advance.


class _Sentence:
    def __eq__(self, other) -> bool:
        return isinstance(other, str) and len(other.strip()) > 3

    def __repr__(self) -> str:
        return "<a human sentence>"


class _RecentUtcTimestamp:
    def __eq__(self, other) -> bool:
        if not isinstance(other, str):
            return False
        try:
            moment = datetime.fromisoformat(other)
        except ValueError:
            return False
        # Minutes, not seconds: the fuzz test reads its frames after all 1,000 examples, over 30 s under load.
        return moment.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - moment) < timedelta(minutes=10)

    def __repr__(self) -> str:
        return "<ISO 8601 UTC timestamp of now>"


class _Seq:
    def __eq__(self, other) -> bool:
        return isinstance(other, int) and not isinstance(other, bool) and other >= 1

    def __repr__(self) -> str:
        return "<a history seq>"


class _Epoch:
    def __eq__(self, other) -> bool:
        return isinstance(other, str) and len(other) == 12 and all(c in "0123456789abcdef" for c in other)

    def __repr__(self) -> str:
        return "<a history epoch>"


SENTENCE = _Sentence()
EPOCH = _Epoch()
SENT_AT = _RecentUtcTimestamp()
SEQ = _Seq()


def error(code: str, client_id=None) -> dict:
    frame = {"type": "error", "code": code, "detail": SENTENCE}
    if client_id is not None:
        frame["id"] = client_id
    return frame


def rate_limited(client_id, within: float) -> dict:
    """The refusal of a sender over budget: when to try again, in seconds, at most ``within``."""
    return {**error("rate_limited", client_id), "retry_after": Between(0, within)}


class Between:
    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __eq__(self, other) -> bool:
        return isinstance(other, (int, float)) and self.low < other <= self.high

    def __repr__(self) -> str:
        return f"<number in ({self.low}, {self.high}]>"


def direct(sender, message, client_id=None) -> dict:
    """The frame every tab of the recipient receives, with its position in the recipient's history."""
    return {
        "type": "direct",
        "from": sender.pk,
        "message": message,
        "id": client_id,
        "sent_at": SENT_AT,
        "epoch": EPOCH,
        "seq": SEQ,
    }


async def send_text(socket, text: str) -> None:
    """Any text frame, the empty one included (``send_to`` refuses it)."""
    await socket.send_input({"type": "websocket.receive", "text": text})


async def send_bytes(socket, data: bytes) -> None:
    await socket.send_input({"type": "websocket.receive", "bytes": data})


async def answer(socket, wait: float = TIMEOUT) -> dict:
    """The next frame ``socket`` receives, as JSON; a consumer crash is raised at once."""
    get = asyncio.ensure_future(socket.output_queue.get())
    done, _ = await asyncio.wait({get, socket.future}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    if get not in done:
        get.cancel()
        if socket.future.done():
            socket.future.result()  # the consumer's own exception
            raise AssertionError("the consumer stopped without closing the socket")
        raise AssertionError(f"no answer within {wait} s")
    output = get.result()
    assert output["type"] == "websocket.send", f"expected a frame, the socket did {output}"
    return json.loads(output["text"])


def direct_text(to: int, size: int, fill: str = "x", client_id: str = "big") -> str:
    """A direct frame to ``to`` of exactly ``size`` bytes of UTF-8, its message padded with ``fill``."""
    template = '{"type":"direct","to":%d,"id":"%s","message":"%s"}'
    missing = size - len((template % (to, client_id, "")).encode())
    count, rest = divmod(missing, len(fill.encode()))
    text = template % (to, client_id, fill * count + "x" * rest)
    assert len(text.encode()) == size
    return text


def nested(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def dave(make_user):
    """A deactivated account."""
    return make_user("dave", is_active=False)


@dataclass
class Chat:
    """Alice's socket, a tab of Bob's (her usual recipient) and Carol, who is never addressed."""

    contract: ProtocolContract
    alice: object
    bob: object
    sender: WebsocketCommunicator
    recipient: WebsocketCommunicator
    bystander: WebsocketCommunicator

    async def send(self, frame: dict) -> dict:
        await self.sender.send_json_to(frame)
        return await answer(self.sender)

    async def nothing_leaked_and_still_works(self) -> None:
        """The socket answers the next frames, and the bad one reached no one."""
        await self.sender.send_json_to({"type": "ping"})
        assert await answer(self.sender) == PONG  # no second answer came before it
        assert await self.send(
            {"type": "direct", "to": self.bob.pk, "message": "still there?", "id": "next"}
        ) == self.contract.ack("next", 1)
        # Bob's next frame is this one: the refused frame never reached him.
        assert await answer(self.recipient) == direct(self.alice, "still there?", "next")
        assert await self.bystander.receive_nothing()


MESSAGES = [
    None,
    True,
    0,
    -1.5,
    "",
    "héllo 👋 \u0000 \u2028",
    [],
    [1, "two", [3.0, None]],
    {},
    {"text": "hi", "meta": {"tags": ["a", "b"], "n": 2**63}},
    nested(30),
]


BOB = object()  # replaced by Bob's id in the frames below


class OnlyStaffMessages(DirectMessages):
    """A recipient hook that refuses everyone but staff, declared explicitly."""

    recipient_lookup = HOOKS_FIRST

    async def get_recipient(self, user_id):
        return user_id if await get_user_model().objects.filter(pk=user_id, is_staff=True).aexists() else None


def hooks_declared():
    return OnlyStaffMessages


def hooks_detected():
    """A subclass written before ``recipient_lookup``: it warns once, and its hook still runs."""
    with pytest.warns(DeprecationWarning, match="recipient_lookup"):

        class LegacyOnlyStaff(DirectMessages):
            get_recipient = OnlyStaffMessages.get_recipient

    return LegacyOnlyStaff


def frames_to(user, count: int, start: int = 0) -> list[dict]:
    return [{"type": "direct", "to": user.pk, "message": n, "id": n} for n in range(start, start + count)]


FUZZ_MAX_BYTES = 4096
ANY_CHAR = st.characters(codec=None, exclude_categories=[])  # lone surrogates included
ANY_TEXT = st.text(ANY_CHAR, max_size=20)


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
        st.floats(),
        ANY_TEXT,
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
#: Numbers Python's json reads oddly or not at all, and \u escapes (lone surrogates among them).
ODD_TOKENS = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.sampled_from(["1e999", "-1e999", "1e-999", "-0", "0.0", "1E2", "NaN", "-Infinity", "0x10", "01"]),
    st.lists(st.integers(0, 0xFFFF), max_size=4).map(lambda cps: '"' + "".join(f"\\u{c:04x}" for c in cps) + '"'),
)


def object_text(fields: dict) -> str:
    """A JSON object's text from its members' texts."""
    return "{" + ",".join(f'"{name}":{text}' for name, text in fields.items()) + "}"


def dumped(values):
    """JSON text of ``values``: NaN and Infinity included, surrogates escaped or raw."""
    return st.builds(lambda value, ascii: json.dumps(value, ensure_ascii=ascii), values, st.booleans())


def frames(users):
    """Frames as a client could send them: ``bytes`` (binary) or ``str`` (text)."""
    addressee = users["addressee"]
    known = [addressee, users["sender"], users["inactive"], MISSING_USER_ID, 2**31]
    recipients = st.one_of(
        st.sampled_from(known),
        st.integers(),
        JSON_VALUES,
    )
    directs = st.builds(
        lambda frame, extra: {**frame, **extra},
        st.fixed_dictionaries(
            {"type": st.one_of(st.just("direct"), st.just("ping"), JSON_VALUES)},
            optional={
                "to": recipients,
                "message": st.one_of(JSON_VALUES, st.integers(0, 40).map(nested)),
                "id": st.one_of(st.none(), st.integers(), ANY_TEXT, st.text(max_size=70), JSON_VALUES),
                "from": JSON_VALUES,
            },
        ),
        st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=2),
    )
    well_formed = st.fixed_dictionaries(  # mostly valid: ack, forbidden or unknown_recipient
        {"type": st.just("direct"), "to": st.sampled_from(known), "message": JSON_VALUES},
        optional={"id": st.one_of(st.integers(-(2**53) + 1, 2**53 - 1), st.text(max_size=64))},
    )
    deep = st.builds(  # nesting up to past the parser's recursion limit
        lambda depth, where: (
            "[" * depth + "]" * depth
            if where == "top"
            else f'{{"type":"direct","to":{addressee},"{where}":{"[" * depth + "]" * depth},"message":1}}'
        ),
        st.integers(0, 2000),
        st.sampled_from(["message", "id", "top"]),
    )
    odd = st.builds(  # an odd token where a field is expected
        lambda field, token: object_text({"type": '"direct"', "to": str(addressee), "message": '"m"', field: token}),
        st.sampled_from(["to", "message", "id", "type"]),
        ODD_TOKENS,
    )
    sizes = st.builds(  # around the size limit, in one- or multi-byte characters
        lambda delta, fill: direct_text(addressee, FUZZ_MAX_BYTES + delta, fill=fill),
        st.integers(-4, 4),
        st.sampled_from(["x", "é", "€", "👋"]),
    )
    return st.one_of(
        st.binary(max_size=64),
        st.text(ANY_CHAR, max_size=64),
        dumped(JSON_VALUES),
        dumped(directs),
        dumped(directs),
        dumped(well_formed),
        deep,
        odd,
        sizes,
    )


def strict_json(text: str):
    """What the consumer should make of a text frame: a value, or ``None`` when it is not JSON it accepts."""

    def refuse(token):
        raise ValueError(token)

    def finite(token):
        value = float(token)
        if value in (float("inf"), float("-inf")):
            raise ValueError(token)
        return value

    try:
        value = json.loads(text, parse_constant=refuse, parse_float=finite)
        json.dumps(value, ensure_ascii=False).encode()  # lone surrogates
    except (ValueError, RecursionError):
        return None
    return value


def depth_of(value) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [c for v in level if isinstance(v, (list, dict)) for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def acceptable_replies(frame, users) -> set[str]:
    """The answers the spec allows for ``frame``: ``pong``, ``ack`` or an error code."""
    if isinstance(frame, bytes):
        return {"invalid_payload"}
    if len(frame.encode("utf-8", "surrogatepass")) > FUZZ_MAX_BYTES:
        return {"too_large"}
    payload = strict_json(frame)
    if not isinstance(payload, dict):
        return {"invalid_json"}
    # The parser recurses: whether this deep a text parses depends on the stack it runs on
    # (and hypothesis raises the recursion limit while it runs). If not, it is invalid JSON.
    close_to_recursion_limit = {"invalid_json"} if "[" * 400 in frame or "{" * 400 in frame else set()
    kind = payload.get("type")
    if kind == "ping":
        return {"pong"} | close_to_recursion_limit
    if kind != "direct":
        return {"unknown_type"} | close_to_recursion_limit
    to, client_id = payload.get("to"), payload.get("id")
    if type(to) is not int or not 0 < to < 2**53 or "message" not in payload:
        return {"invalid_payload"} | close_to_recursion_limit
    if not (client_id is None or type(client_id) is int or (type(client_id) is str and len(client_id) <= 64)):
        return {"invalid_payload"} | close_to_recursion_limit
    outcome = {users["addressee"]: "ack", users["sender"]: "forbidden"}.get(to, "unknown_recipient")
    # What the channel layer cannot carry may be refused: very deep nesting, integers past
    # 64 bits, and ids past 2**53 (browsers would not read them back exactly).
    exotic = depth_of(payload["message"]) > 30 or has_huge_int(payload["message"]) or has_huge_int(client_id, 2**53)
    return {outcome} | ({"invalid_payload"} if exotic else set()) | close_to_recursion_limit


def has_huge_int(value, bound=2**63) -> bool:
    level = [value]
    while level:
        if any(type(v) is int and not -bound <= v < bound for v in level):
            return True
        level = [c for v in level if isinstance(v, (list, dict)) for c in (v.values() if isinstance(v, dict) else v)]
    return False


def addresses(frame, user_id) -> bool:
    payload = strict_json(frame) if isinstance(frame, str) else None
    return isinstance(payload, dict) and payload.get("type") == "direct" and payload.get("to") == user_id


class ProtocolContract:
    """The protocol's tests, written once: a subclass per strategy declares what it can do
    (``tests/backends.py``) and provides ``open_as``."""

    def ack(self, client_id, tabs: int) -> dict:
        """The sender's ack when the recipient has ``tabs`` open tabs.

        The mapping strategy counts the channels it sent to. The group strategy sends
        one ``group_send`` and groups cannot be listed, so it cannot count: ``null``.
        """
        return {"type": "ack", "id": client_id, "delivered": tabs if self.counts_tabs else None}

    @pytest.fixture
    async def chat(self, open_as, alice, bob, carol):
        return Chat(self, alice, bob, await open_as(alice), await open_as(bob), await open_as(carol))

    # Delivery

    async def test_direct_message_reaches_every_tab_of_the_recipient_and_no_one_else(self, open_as, alice, bob, carol):
        sender, alice_other_tab = await open_as(alice), await open_as(alice)
        bob_tabs = [await open_as(bob) for _ in range(3)]
        bystander = await open_as(carol)

        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": {"text": "hi Bob"}, "id": "m1"})

        assert await answer(sender) == self.ack("m1", 3)
        for tab in bob_tabs:
            assert await answer(tab) == direct(alice, {"text": "hi Bob"}, "m1")
        others = [sender, alice_other_tab, bystander, *bob_tabs]
        assert all(await asyncio.gather(*(other.receive_nothing() for other in others)))

    async def test_ack_counts_the_recipients_tabs_on_mapping_and_is_null_on_groups(self, open_as, alice, bob):
        """Per-user groups cannot be listed, so the group strategy cannot count what it reached."""
        sender = await open_as(alice)
        tabs = [await open_as(bob)]
        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": 1, "id": 1})
        reply = await answer(sender)
        assert reply == self.ack(1, 1)

        tabs += [await open_as(bob), await open_as(bob)]
        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": 2, "id": 2})
        reply = await answer(sender)
        assert reply == self.ack(2, 3)
        assert [(await answer(tabs[0]))["message"], (await answer(tabs[0]))["message"]] == [1, 2]
        assert [(await answer(tab))["message"] for tab in tabs[1:]] == [2, 2]

    async def test_offline_recipient_is_acknowledged_not_refused(self, open_as, alice, bob):
        """Offline is not an error: mapping says delivered 0; groups, which cannot count, say null."""
        sender = await open_as(alice)
        gone = await open_as(bob)
        await gone.disconnect()

        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "anyone?", "id": "m"})
        reply = await answer(sender)
        assert reply == self.ack("m", 0)
        # Nothing is queued for later: Bob's next tab starts empty.
        assert await (await open_as(bob)).receive_nothing()

    async def test_only_the_mapping_strategy_records_connections_and_presence(self, open_as, alice, presence_events):
        """The protocol is the same; groups keep no rows, so the group strategy cannot tell presence."""
        await open_as(alice)
        assert [row.user_id for row in await rows()] == ([alice.pk] if self.keeps_rows else [])
        assert presence_events == ([("online", alice.pk)] if self.keeps_rows else [])

    async def test_message_may_be_any_json_value_and_arrives_unchanged(self, chat):
        for n, message in enumerate(MESSAGES):
            reply = await chat.send({"type": "direct", "to": chat.bob.pk, "message": message, "id": n})
            assert reply == self.ack(n, 1), message
            assert await answer(chat.recipient) == direct(chat.alice, message, n)

    async def test_client_id_is_optional_and_echoed_exactly(self, chat):
        for client_id in [None, "", "a" * 64, "ünïcode", 0, -7, 2**53 - 1]:
            frame = {"type": "direct", "to": chat.bob.pk, "message": "x"}
            if client_id is not None:
                frame["id"] = client_id
            assert await chat.send(frame) == self.ack(client_id, 1)
            assert await answer(chat.recipient) == direct(chat.alice, "x", client_id)

    async def test_sent_at_is_the_iso_8601_utc_time_of_sending(self, chat):
        before = datetime.now(UTC)
        await chat.send({"type": "direct", "to": chat.bob.pk, "message": "x"})
        sent_at = (await answer(chat.recipient))["sent_at"]
        assert sent_at.endswith("Z")
        moment = datetime.fromisoformat(sent_at)
        assert moment.utcoffset() == timedelta(0)
        assert before - timedelta(milliseconds=1) <= moment <= datetime.now(UTC)

    async def test_sender_is_taken_from_the_connection_never_from_the_payload(self, chat, carol):
        for claimed in [carol.pk, chat.bob.pk, "admin", None, {"id": carol.pk}]:
            frame = {"type": "direct", "to": chat.bob.pk, "message": "it's me", "from": claimed}
            assert await chat.send(frame) == self.ack(None, 1)
            assert await answer(chat.recipient) == direct(chat.alice, "it's me"), claimed

    async def test_ping_is_answered_with_pong_on_the_pinging_socket_only(self, chat):
        await chat.sender.send_json_to({"type": "ping", "id": "p", "extra": [1]})
        assert await answer(chat.sender) == PONG
        assert await chat.recipient.receive_nothing()

    # Errors: each code comes from the input that should produce it, and the socket keeps working.

    @pytest.mark.parametrize(
        "text",
        [
            "hello",
            "",
            "{",
            '{"type": "ping",}',
            "\ufeff{}",
            '{"type": "ping", "n": NaN}',
            '{"type": "direct", "to": 2, "message": 1e999}',
            '{"type": "direct", "to": 2, "message": "\\ud800"}',
            '{"type": "direct", "to": 2, "message": "\ud800"}',
            '{"type": "ping", "x": ' + "[" * 5000 + "]" * 5000 + "}",
        ],
        ids=lambda text: repr(text)[:40],
    )
    async def test_text_that_is_not_json_is_invalid_json(self, chat, text):
        await send_text(chat.sender, text)
        assert await answer(chat.sender) == error("invalid_json")
        await chat.nothing_leaked_and_still_works()

    @pytest.mark.parametrize("value", [[{"type": "ping"}], "ping", 42, None], ids=repr)
    async def test_json_that_is_not_an_object_is_invalid_json(self, chat, value):
        await chat.sender.send_json_to(value)
        assert await answer(chat.sender) == error("invalid_json")
        await chat.nothing_leaked_and_still_works()

    @pytest.mark.parametrize(
        ("field", "frame"),
        [
            ("to", {"message": "x"}),
            ("to", {"to": "12", "message": "x"}),
            ("to", {"to": True, "message": "x"}),
            ("to", {"to": 0, "message": "x"}),
            ("to", {"to": 2**53, "message": "x"}),
            ("message", {"to": BOB}),
            ("message", {"to": BOB, "message": nested(40)}),
            ("message", {"to": BOB, "message": {"n": 2**64}}),
            ("id", {"to": BOB, "message": "x", "id": "a" * 65}),
            ("id", {"to": BOB, "message": "x", "id": 1.5}),
            ("id", {"to": BOB, "message": "x", "id": True}),
        ],
        ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={str(x)[:12]}" for k, x in v.items()),
    )
    async def test_missing_or_wrong_typed_field_is_invalid_payload_naming_the_field(self, chat, field, frame):
        frame = {"type": "direct", "id": "q1", **{k: chat.bob.pk if v is BOB else v for k, v in frame.items()}}
        reply = await chat.send(frame)
        # The id is echoed whenever it could be read, i.e. unless it is the bad field.
        assert reply == error("invalid_payload", None if field == "id" else "q1")
        assert f"'{field}'" in reply["detail"]
        await chat.nothing_leaked_and_still_works()

    @pytest.mark.parametrize("data", [b"", b'{"type": "ping"}', bytes(20000)], ids=lambda data: repr(data)[:20])
    async def test_binary_frames_are_invalid_payload(self, chat, data):
        await send_bytes(chat.sender, data)
        assert await answer(chat.sender) == error("invalid_payload")
        await chat.nothing_leaked_and_still_works()

    @pytest.mark.parametrize(
        "kind",
        [{"type": "shout"}, {"type": "Direct"}, {}, {"type": 42}],
        ids=repr,
    )
    async def test_unknown_frame_type_is_unknown_type_with_the_id_echoed(self, chat, kind):
        assert await chat.send({**kind, "to": chat.bob.pk, "message": "x", "id": "t1"}) == error("unknown_type", "t1")
        await chat.nothing_leaked_and_still_works()

    @pytest.mark.parametrize("kind", [["direct"], {"name": "direct"}, []], ids=repr)
    async def test_a_list_or_object_as_type_is_unknown_type_not_a_crash(self, chat, kind):
        assert await chat.send({"type": kind, "to": chat.bob.pk, "message": "x", "id": "t1"}) == error(
            "unknown_type", "t1"
        )
        await chat.nothing_leaked_and_still_works()

    async def test_frame_of_16_kib_is_delivered_and_one_byte_more_is_too_large(self, chat):
        await send_text(chat.sender, direct_text(chat.bob.pk, 16 * 1024, client_id="fits"))
        assert await answer(chat.sender) == self.ack("fits", 1)
        assert (await answer(chat.recipient))["id"] == "fits"

        await send_text(chat.sender, direct_text(chat.bob.pk, 16 * 1024 + 1, client_id="over"))
        assert await answer(chat.sender) == error("too_large")
        await chat.nothing_leaked_and_still_works()

    async def test_the_size_limit_counts_utf8_bytes_not_characters(self, chat):
        text = direct_text(chat.bob.pk, 16 * 1024 + 1, fill="é")
        assert len(text) < 16 * 1024
        await send_text(chat.sender, text)
        assert await answer(chat.sender) == error("too_large")
        await chat.nothing_leaked_and_still_works()

    async def test_too_large_applies_before_parsing_and_follows_max_message_bytes(self, open_as, alice, settings):
        settings.CHANNEL_REGISTRY = {"MAX_MESSAGE_BYTES": 100}
        sender = await open_as(alice)
        await send_text(sender, "x" * 101)  # not JSON either: the size is what the client must fix first
        assert await answer(sender) == error("too_large")
        await send_text(sender, '{"type": "ping"}' + " " * 84)
        assert await answer(sender) == PONG

    @pytest.mark.parametrize("recipient", ["no such id", "deactivated user", "beyond the id column", "largest safe id"])
    async def test_unknown_or_inactive_recipient_is_unknown_recipient(self, chat, open_as, make_user, recipient):
        erin = await sync_to_async(make_user)("erin")
        erin_tab = await open_as(erin)
        await get_user_model().objects.filter(pk=erin.pk).aupdate(is_active=False)  # deactivated, a tab still open
        to = {
            "no such id": MISSING_USER_ID,
            "deactivated user": erin.pk,
            "beyond the id column": 2**31,
            "largest safe id": 2**53 - 1,
        }[recipient]
        assert await chat.send({"type": "direct", "to": to, "message": "x", "id": "u"}) == error(
            "unknown_recipient", "u"
        )
        assert await erin_tab.receive_nothing()
        await chat.nothing_leaked_and_still_works()

    async def test_messaging_yourself_is_forbidden_by_default(self, chat, open_as):
        own_tab = await open_as(chat.alice)
        assert await chat.send({"type": "direct", "to": chat.alice.pk, "message": "note", "id": "s"}) == error(
            "forbidden", "s"
        )
        assert await own_tab.receive_nothing()
        await chat.nothing_leaked_and_still_works()

    async def test_allow_self_message_delivers_to_all_your_tabs_the_sending_one_included(
        self, open_as, alice, settings
    ):
        settings.CHANNEL_REGISTRY = {"ALLOW_SELF_MESSAGE": True}
        sender, other_tab = await open_as(alice), await open_as(alice)
        await sender.send_json_to({"type": "direct", "to": alice.pk, "message": "note", "id": "s"})
        # The ack and the message travel separately: their order on the sending socket is not defined.
        replies = [await answer(sender), await answer(sender)]
        assert sorted(replies, key=lambda frame: frame["type"]) == [self.ack("s", 2), direct(alice, "note", "s")]
        assert await answer(other_tab) == direct(alice, "note", "s")

    @pytest.mark.parametrize(
        "policy", ["tests.test_protocol.same_last_name", "tests.test_protocol.asame_last_name"], ids=["sync", "async"]
    )
    async def test_can_message_policy_decides_and_a_refusal_looks_like_a_missing_account(
        self, connect, make_user, settings, policy
    ):
        """Finding 6: ``forbidden`` for an existing id and ``unknown_recipient`` for a missing one
        told any sender which accounts exist. By default both answer the same."""
        settings.CHANNEL_REGISTRY = {"CAN_MESSAGE": policy}
        make = sync_to_async(make_user)
        ann, ben, cat = await make("ann", last_name="Lee"), await make("ben", last_name="Lee"), await make("cat")
        sender = await connect(ann, consumer=self.consumer)
        ben_tab, cat_tab = await connect(ben, consumer=self.consumer), await connect(cat, consumer=self.consumer)

        await sender.send_json_to({"type": "direct", "to": cat.pk, "message": "hi", "id": "no"})
        refused = await answer(sender)
        await sender.send_json_to({"type": "direct", "to": MISSING_USER_ID, "message": "hi", "id": "no"})
        missing = await answer(sender)
        assert refused == error("unknown_recipient", "no")
        assert {**refused, "detail": ""} == {**missing, "detail": ""}  # the detail only repeats the id sent
        await sender.send_json_to({"type": "direct", "to": ben.pk, "message": "hi", "id": "yes"})
        assert await answer(sender) == self.ack("yes", 1)

        assert await answer(ben_tab) == direct(ann, "hi", "yes")
        assert await cat_tab.receive_nothing()

        settings.CHANNEL_REGISTRY = {"CAN_MESSAGE": policy, "REVEAL_REFUSALS": True}
        await sender.send_json_to({"type": "direct", "to": cat.pk, "message": "hi", "id": "no"})
        assert await answer(sender) == error("forbidden", "no")
        await sender.send_json_to({"type": "direct", "to": MISSING_USER_ID, "message": "hi", "id": "no"})
        assert await answer(sender) == error("unknown_recipient", "no")
        assert await cat_tab.receive_nothing()

    @pytest.mark.parametrize("messages", [hooks_declared, hooks_detected])
    async def test_a_get_recipient_hook_decides_who_receives(self, connect, make_user, messages):
        hooked = type("HookedConsumer", (self.consumer,), {"messages_class": messages()})
        make = sync_to_async(make_user)
        ann, boss, cat = await make("ann"), await make("boss", is_staff=True), await make("cat")
        sender = await connect(ann, consumer=hooked)
        boss_tab, cat_tab = await connect(boss, consumer=hooked), await connect(cat, consumer=hooked)

        await sender.send_json_to({"type": "direct", "to": cat.pk, "message": "hi", "id": "no"})
        assert await answer(sender) == error("unknown_recipient", "no")
        await sender.send_json_to({"type": "direct", "to": boss.pk, "message": "hi", "id": "yes"})
        assert await answer(sender) == self.ack("yes", 1)
        assert await answer(boss_tab) == direct(ann, "hi", "yes")
        assert await cat_tab.receive_nothing()

    async def test_ack_delivered_false_discloses_nothing_about_the_recipients_connections(
        self, open_as, alice, bob, settings
    ):
        settings.CHANNEL_REGISTRY = {"ACK_DELIVERED": False}
        sender = await open_as(alice)
        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "offline", "id": 1})
        offline = await answer(sender)
        tabs = [await open_as(bob), await open_as(bob)]
        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "online", "id": 1})
        assert offline == await answer(sender) == {"type": "ack", "id": 1, "delivered": None}
        assert [(await answer(tab))["message"] for tab in tabs] == ["online", "online"]

    async def test_with_private_acks_a_sender_over_the_copies_budget_cannot_tell_0_1_or_5_tabs_apart(
        self, open_as, make_user, settings
    ):
        """Issue 17, item 8: a refused copies budget answered a ``retry_after`` exact to the millisecond,
        the price of the recipient's connections: online or not, and on how many tabs. With
        ``ACK_DELIVERED`` off every message gets the same ack; one over the budget is kept in the
        recipient's history, not sent, and reaches their tabs with the next event sent to them."""
        settings.CHANNEL_REGISTRY = {"ACK_DELIVERED": False, "RATE_LIMIT": None, "FANOUT_LIMIT": (4, 60)}
        make = sync_to_async(make_user)
        sender = await open_as(await make("sender"))
        zero, one, five = await make("zero"), await make("one"), await make("five")
        tabs = {zero: [], one: [await open_as(one)], five: [await open_as(five) for _ in range(5)]}

        answers: dict = {user: [] for user in tabs}
        for n in range(3):  # 1 copy to "one" each time, 5 to "five": the budget of 4 runs out at once
            for user in tabs:
                await sender.send_json_to({"type": "direct", "to": user.pk, "message": n, "id": "m"})
                answers[user].append(await answer(sender))

        assert answers[zero] == answers[one] == answers[five] == [{"type": "ack", "id": "m", "delivered": None}] * 3
        assert [(await answer(tabs[one][0]))["message"] for _ in range(3)] == [0, 1, 2]
        expected: list = [0, 1, 2]  # without a copies budget every message went out
        if self.copy_budget_applies:
            for tab in tabs[five]:
                assert await tab.receive_nothing()
            await self.dispatcher.anotify_user(five, "next")
            expected.append("next")
        for tab in tabs[five]:
            got = [await answer(tab) for _ in expected]
            assert [frame.get("message", frame.get("data")) for frame in got] == expected

    # Rate limit: token buckets per user, over all of their connections.

    async def test_default_rate_limit_allows_20_messages_then_refuses(self, chat, settings):
        """The shipped count, over an hour instead of 10 s: with the default refill (a token every
        0.5 s) the outcome of the 21st frame would depend on how fast a loaded machine sends 21."""
        messages, _ = RegistrySettings().RATE_LIMIT or (0, 0)
        assert messages == 20
        settings.CHANNEL_REGISTRY = {"RATE_LIMIT": (messages, 3600)}
        for frame in frames_to(chat.bob, 20):
            assert await chat.send(frame) == self.ack(frame["id"], 1)
        assert await chat.send(frames_to(chat.bob, 1, start=20)[0]) == rate_limited(20, within=180)
        assert [(await answer(chat.recipient))["message"] for _ in range(20)] == list(range(20))
        assert await chat.recipient.receive_nothing()

    async def test_rate_limit_trips_then_recovers_once_tokens_refill(self, open_as, alice, bob, settings):
        settings.CHANNEL_REGISTRY = {"RATE_LIMIT": (3, 0.6)}  # one token every 0.2 s
        sender, tab = await open_as(alice), await open_as(bob)
        first, second = frames_to(bob, 4), frames_to(bob, 3, start=4)

        for frame in first[:3]:
            await sender.send_json_to(frame)
            assert await answer(sender) == self.ack(frame["id"], 1)
        await sender.send_json_to(first[3])
        assert await answer(sender) == rate_limited(3, within=0.2)
        await sender.send_json_to({"type": "ping"})
        assert await answer(sender) == PONG  # the connection stays usable meanwhile

        await asyncio.sleep(0.65)  # a full window: the bucket is full again
        for frame in second:
            await sender.send_json_to(frame)
            assert await answer(sender) == self.ack(frame["id"], 1)
        assert [(await answer(tab))["message"] for _ in range(6)] == [0, 1, 2, 4, 5, 6]
        assert await tab.receive_nothing()

    async def test_rate_limit_is_per_user_over_all_their_connections(self, open_as, alice, bob, settings):
        """Finding 2: ten sockets used to mean ten budgets."""
        settings.CHANNEL_REGISTRY = {"RATE_LIMIT": (2, 60)}
        first, second = await open_as(alice), await open_as(alice)
        await open_as(bob)
        for socket, frame in zip([first, second], frames_to(bob, 2), strict=True):
            await socket.send_json_to(frame)
            assert (await answer(socket))["type"] == "ack"
        for socket in (first, second, await open_as(alice)):
            await socket.send_json_to(frames_to(bob, 1, start=2)[0])
            assert await answer(socket) == rate_limited(2, within=30)
        bob_sender = await open_as(bob)
        await bob_sender.send_json_to(frames_to(alice, 1, start=3)[0])
        assert await answer(bob_sender) == self.ack(3, 3)  # another user's budget is their own

    async def test_fanout_limit_charges_every_copy_to_the_sender_before_sending(
        self, open_as, alice, bob, carol, settings
    ):
        settings.CHANNEL_REGISTRY = {"RATE_LIMIT": None, "FANOUT_LIMIT": (4, 60)}  # a copy every 15 s
        sender = await open_as(alice)
        bob_tabs = [await open_as(bob) for _ in range(3)]
        carol_tab = await open_as(carol)
        await sender.send_json_to(frames_to(bob, 1)[0])
        assert await answer(sender) == self.ack(0, 3)  # 3 copies paid: 1 left
        await sender.send_json_to(frames_to(bob, 1, start=1)[0])
        if self.copy_budget_applies:
            assert await answer(sender) == rate_limited(1, within=30)  # 2 more copies: 30 s
            to_bob = [0]  # the refused message made no copy at all
        else:
            assert await answer(sender) == self.ack(1, 3)
            to_bob = [0, 1]
        await sender.send_json_to(frames_to(carol, 1, start=2)[0])
        assert await answer(sender) == self.ack(2, 1)  # one copy still fits
        for tab in bob_tabs:
            assert [(await answer(tab))["message"] for _ in to_bob] == to_bob
            assert await tab.receive_nothing()
        assert (await answer(carol_tab))["message"] == 2

    async def test_rate_limit_none_disables_it(self, open_as, alice, bob, settings):
        settings.CHANNEL_REGISTRY = {"RATE_LIMIT": None}
        sender = await open_as(alice)
        for frame in frames_to(bob, 25):
            await sender.send_json_to(frame)
            assert (await answer(sender))["type"] == "ack"

    async def test_rate_limit_is_decided_without_the_database(
        self, open_as, alice, bob, settings, database_unreachable
    ):
        settings.CHANNEL_REGISTRY = {"RATE_LIMIT": (1, 60)}
        sender = await open_as(alice)
        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": 1})
        assert (await answer(sender))["type"] == "ack"
        async with database_unreachable():
            # Reaching the database here would answer "unavailable".
            await sender.send_json_to({"type": "direct", "to": bob.pk, "message": 2, "id": "x"})
            assert await answer(sender, wait=10) == rate_limited("x", within=60)

    async def test_database_outage_answers_unavailable_and_the_socket_outlives_it(self, chat, database_unreachable):
        async with database_unreachable():
            reply = await chat.send({"type": "direct", "to": chat.bob.pk, "message": "x", "id": "d"})
            assert reply == error("unavailable", "d")
        await chat.nothing_leaked_and_still_works()

    # 1,000 random frames per strategy through one socket.

    async def test_1000_random_frames_never_crash_the_consumer_nor_reach_anyone_unaddressed(
        self, connect, alice, bob, carol, dave, settings
    ):
        """Alice's one socket gets 1,000 random frames; Carol may be addressed, Bob never is."""
        # One socket sends 1,000 frames back to back: no per-user or per-connection budget.
        settings.CHANNEL_REGISTRY = {
            "RATE_LIMIT": None, "INBOUND_LIMIT": None, "HISTORY_SENDER_LIMIT": None, "HISTORY_SENDER_SHARE": None,
            "MAX_MESSAGE_BYTES": FUZZ_MAX_BYTES,
        }  # fmt: skip
        users = {"sender": alice.pk, "addressee": carol.pk, "inactive": dave.pk}
        sockets = {"sender": await connect(alice, consumer=self.consumer)}
        addressee, bystander = await connect(carol, consumer=self.consumer), await connect(bob, consumer=self.consumer)
        delivered = []  # (id, message) of every acknowledged frame, all addressed to Carol
        loop = asyncio.get_running_loop()

        async def exchange(frame) -> dict:
            if sockets["sender"].future.done():  # a previous example crashed it: report, and go on with a new one
                sockets["sender"] = await connect(alice, consumer=self.consumer)
            sender = sockets["sender"]
            await (send_bytes(sender, frame) if isinstance(frame, bytes) else send_text(sender, frame))
            reply = await answer(sender)
            assert not sender.future.done(), "the socket closed after answering"
            return reply

        @hypothesis_settings(
            max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True
        )
        @given(frame=frames(users).filter(lambda frame: not addresses(frame, bob.pk)))
        def one_frame(frame):
            reply = asyncio.run_coroutine_threadsafe(exchange(frame), loop).result(timeout=30)
            kind = reply["code"] if reply["type"] == "error" else reply["type"]
            assert kind in acceptable_replies(frame, users), reply
            if reply["type"] == "error":
                assert set(reply) <= {"type", "code", "detail", "id"} and reply["detail"] == SENTENCE
            if "id" in reply and reply["id"] is not None:
                assert reply["id"] == strict_json(frame)["id"]  # echoed only when read from the frame
            if reply["type"] == "ack":
                payload = strict_json(frame)
                assert reply == self.ack(payload.get("id"), 1)
                delivered.append((payload.get("id"), payload["message"]))

        await asyncio.to_thread(one_frame)  # hypothesis drives from a thread; the sockets live on this loop

        assert delivered, "no random frame was valid: the generator is broken"
        received = [await answer(addressee) for _ in delivered]
        assert [(frame["id"], frame["message"]) for frame in received] == delivered
        assert all(frame == direct(alice, frame["message"], frame["id"]) for frame in received)
        sender = sockets["sender"]
        await sender.send_json_to({"type": "direct", "to": carol.pk, "message": "the end", "id": "last"})
        assert await answer(sender) == self.ack("last", 1)
        assert await answer(addressee) == direct(alice, "the end", "last")
        for socket in (sender, addressee, bystander):
            assert await socket.receive_nothing()


class TestMappingConsumer(MappingBackend, ProtocolContract):
    """Through ``RegistryConsumer``: acks count tabs, rows are kept, every copy is charged."""


class TestGroupConsumer(GroupBackend, ProtocolContract):
    """Through ``GroupConsumer``: acks say ``null``, no rows, only ``RATE_LIMIT`` applies."""
