"""Handshake and resume budgets per user (``HANDSHAKE_LIMIT``, ``RESUME_LIMIT``), both transports.

Against the configured channel layer (Redis buckets with CR_TEST_STACK=real, the
process's own with the in-memory layer); the real-process storm is in
``tests/test_abuse_history.py``.
"""

from __future__ import annotations

import json
import math
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from channel_registry.conf import registry_settings
from channel_registry.consumers import RegistryConsumer
from channel_registry.protocol import CLOSE_RETRY_LATER

from .test_sse import Stream, open_stream, session_cookie  # noqa: F401 (open_stream: a fixture)

pytestmark = pytest.mark.django_db(transaction=True)


async def first_answer(user, path: str = "/ws/") -> dict:
    """A socket's first message: a frame, or the close of a refusal (held back up to 1 s before the accept)."""
    communicator = WebsocketCommunicator(RegistryConsumer.as_asgi(), path)
    communicator.scope["user"] = user
    assert (await communicator.connect(timeout=3))[0]
    message = await communicator.receive_output(3)
    if message["type"] == "websocket.close":
        await communicator.wait(3)
    else:
        await communicator.disconnect()
    return message


async def test_fifty_tabs_resuming_twice_get_through_and_a_loop_past_that_is_told_when_to_retry(connect, alice):
    """A deploy: every tab of 50 comes back with its position, twice (the shipped defaults)."""
    position, started = "0123456789ab:0", time.monotonic()
    burst, per = registry_settings().RESUME_LIMIT
    for _ in range(burst):
        tab = await connect(alice, since=position)
        frame = await tab.receive_json_from()
        assert frame["type"] in ("recovered", "reset"), frame
        position = f"{frame['epoch']}:{frame['seq']}"
        await tab.disconnect()
    # Past the burst, resumes go through only as fast as tokens come back (burst / per a second):
    # on a loaded machine each attempt takes longer, so more get through before the refusal.
    extra = 0
    while (message := await first_answer(alice, f"/ws/?since={position}"))["type"] != "websocket.close":
        extra += 1
        assert extra <= math.ceil((time.monotonic() - started) * burst / per) + 1, "past the budget"
        assert time.monotonic() - started < per, "never refused within the budget's period"
    assert message["code"] == CLOSE_RETRY_LATER and message["reason"].isdigit()
    fresh = await connect(alice)  # a handshake without a position still has budget left
    assert fresh.position["type"] == "position"


async def test_a_socket_over_the_handshake_budget_is_closed_with_4430_and_the_seconds_to_wait(connect, alice, settings):
    settings.CHANNEL_REGISTRY = {"HANDSHAKE_LIMIT": (2, 60)}
    for _ in range(2):
        await (await connect(alice)).disconnect()
    message = await first_answer(alice)
    assert message["code"] == CLOSE_RETRY_LATER
    assert 25 <= int(message["reason"]) <= 29  # a token every 30 s, 1 s held back, and whatever the spends took


async def test_an_event_stream_over_the_handshake_budget_gets_429_with_retry_after(
    open_stream, connect, alice, settings  # noqa: F811
):
    settings.CHANNEL_REGISTRY = {"HANDSHAKE_LIMIT": (2, 60)}
    await connect(alice)
    await open_stream(alice)  # the budget is the user's, over both transports
    refused = Stream(await sync_to_async(session_cookie)(alice))
    await refused.app.send_input({"type": "http.request", "body": b"", "more_body": False})
    head = await refused.app.receive_output(3)
    assert head["status"] == 429 and 25 <= int(dict(head["headers"])[b"Retry-After"]) <= 29  # as the socket's
    body = json.loads((await refused.app.receive_output(3))["body"])
    assert body["code"] == "rate_limited"
