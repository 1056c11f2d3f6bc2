"""The per-connection inbound budget (``INBOUND_LIMIT``, ``inbound.py``) through both consumers.

In-process, with Channels' communicator; ``tests/test_abuse.py`` floods real daphne and uvicorn.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from channel_registry.inbound import FRAME_COST, IN_FLIGHT_SHARE
from channel_registry.protocol import CLOSE_TOO_FAST

from .backends import GroupBackend, MappingBackend
from .test_protocol import PONG, Between

pytestmark = pytest.mark.django_db(transaction=True)

PING = '{"type":"ping","id":"p"}'
PINGS = [PING.replace('"p"', f'"{n}"') for n in range(8)]  # as long as PING
PING_COST = len(PING) + FRAME_COST
#: Three pings fit; the fourth is refused. Refills in a second.
THREE_PINGS = (3 * PING_COST, 1)


async def outputs(socket, count: int, wait: float = 5) -> list[dict]:
    """The next ``count`` things the consumer sent: frames as JSON, a close as ``{"close": code}``."""
    found = []
    for _ in range(count):
        output = await socket.receive_output(wait)
        found.append(json.loads(output["text"]) if output["type"] == "websocket.send" else {"close": output["code"]})
    return found


def expected_answers(capacity: int, cost: int) -> tuple[int, int]:
    """(frames paid, frames refused) before a connection sending frames of ``cost`` back to back is closed:
    paid while the bucket holds the cost, then refused once, then while what it sent without waiting
    stays within ``IN_FLIGHT_SHARE`` of the budget."""
    return capacity // cost, 1 + int(capacity * IN_FLIGHT_SHARE // cost)


async def everything(socket) -> list[dict]:
    """What the consumer sends until it has been quiet for a while."""
    found = []
    while not await socket.receive_nothing(0.2):
        found += await outputs(socket, 1)
    return found


def refused(client_id=None, within: float = 1.0) -> dict:
    frame = {"type": "error", "code": "rate_limited", "detail": "too many frames on this connection; slow down"}
    if client_id is not None:
        frame["id"] = client_id
    return {**frame, "retry_after": Between(0, within)}


class InboundContract:
    """The budget is the consumers' shared front door: the same for every strategy."""

    async def test_a_frame_over_the_connection_budget_is_refused_at_once_and_the_budget_refills(
        self, open_as, alice, settings
    ):
        settings.CHANNEL_REGISTRY = {"INBOUND_LIMIT": THREE_PINGS}
        socket = await open_as(alice)
        for ping in PINGS[:4]:
            await socket.send_to(text_data=ping)
        answers = await outputs(socket, 4)
        assert sorted(answers, key=str) == sorted([PONG] * 3 + [refused("3", within=1.0)], key=str)

        await asyncio.sleep(next(a["retry_after"] for a in answers if a["type"] == "error"))
        await socket.send_to(text_data=PING)
        assert await outputs(socket, 1) == [PONG]  # a client that waits as told loses nothing else
        assert await socket.receive_nothing()

    async def test_frames_on_their_way_when_refused_are_refused_too_and_a_client_that_waits_is_never_closed(
        self, open_as, alice, settings
    ):
        """A quarter budget (``IN_FLIGHT_SHARE``) of frames sent before the wait it was told is over
        is refused, not closed on: they were on their way. Waiting as told starts afresh."""
        # A quarter of the budget is one ping; a ping refills in a second.
        settings.CHANNEL_REGISTRY = {"INBOUND_LIMIT": (4 * PING_COST, 4)}
        socket = await open_as(alice)
        for ping in PINGS[:6]:
            await socket.send_to(text_data=ping)
        answers = await outputs(socket, 6)
        assert sorted(answers, key=str) == sorted([PONG] * 4 + [refused("4", 1.1), refused("5", 1.1)], key=str)
        for _ in range(2):
            await asyncio.sleep(max(a.get("retry_after", 0) for a in answers))
            for ping in PINGS[:3]:  # one the bucket holds again, then two more before the answers arrive
                await socket.send_to(text_data=ping)
            answers = await outputs(socket, 3)
            assert sorted(answers, key=str) == sorted([PONG, refused("1", 1.1), refused("2", 1.1)], key=str)
        assert await socket.receive_nothing()

    async def test_a_users_connections_in_one_process_share_one_inbound_budget(self, open_as, alice, bob, settings):
        """``INBOUND_USER_LIMIT``: a second socket of the same user brings no second budget; another user's does."""
        settings.CHANNEL_REGISTRY = {"INBOUND_LIMIT": (4 * PING_COST, 10), "INBOUND_USER_LIMIT": (6 * PING_COST, 10)}
        first, second, bobs = await open_as(alice), await open_as(alice), await open_as(bob)
        for ping in PINGS[:4]:
            await first.send_to(text_data=ping)
        assert await outputs(first, 4) == [PONG] * 4
        for ping in PINGS[:3]:
            await second.send_to(text_data=ping)
        assert sorted(await outputs(second, 3), key=str) == sorted([PONG, PONG, refused("2", within=10)], key=str)
        for ping in PINGS[:4]:
            await bobs.send_to(text_data=ping)
        assert await outputs(bobs, 4) == [PONG] * 4

    @pytest.mark.parametrize(
        "frame",
        [PING, "not json", b"\x00" * 10, "x" * 20_000],
        ids=["ping", "invalid", "binary", "oversize"],
    )
    async def test_every_kind_of_frame_counts_and_sending_on_after_refusals_closes_with_4420(
        self, open_as, alice, settings, frame
    ):
        settings.CHANNEL_REGISTRY = {"INBOUND_LIMIT": (10 * 1024, 10)}  # no refill worth counting
        socket = await open_as(alice)
        paid, refusals = expected_answers(10 * 1024, len(frame) + FRAME_COST)
        for _ in range(paid + refusals + 5):
            await (socket.send_to(bytes_data=frame) if isinstance(frame, bytes) else socket.send_to(text_data=frame))

        answers = await everything(socket)
        assert answers.count({"close": CLOSE_TOO_FAST}) == 1
        kinds = [a.get("code") for a in answers if "close" not in a]
        assert kinds.count("rate_limited") == refusals, kinds
        # Paid frames not handled by the time of the close are dropped; nothing after it is read.
        assert len(kinds) <= paid + refusals

    async def test_forty_directs_at_once_are_all_answered_under_the_default_budgets(self, open_as, alice, bob):
        """The default inbound budget leaves a burst to the per-user budget (20 messages), answered at once."""
        sender = await open_as(alice)
        await open_as(bob)
        for n in range(40):
            await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "x" * 1000, "id": n})
        answers = await outputs(sender, 40)
        assert sorted(a["id"] for a in answers) == list(range(40))
        # 20 from the full bucket, plus one per 0.5 s it took to answer them all.
        assert 20 <= [a["type"] for a in answers].count("ack") <= 25
        assert all(a["code"] == "rate_limited" for a in answers if a["type"] == "error")
        assert await sender.receive_nothing()


class TestMappingConsumer(MappingBackend, InboundContract):
    """Through ``RegistryConsumer``."""


class TestGroupConsumer(GroupBackend, InboundContract):
    """Through ``GroupConsumer``."""
