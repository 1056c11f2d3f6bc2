"""The event stream view: an SSE client is one more registered connection of its user.

Streams are driven through Django's real ASGI handler, so "the client went away"
is the ``http.disconnect`` daphne sends, not a generator closed by hand.
"""

import contextlib
import json
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application
from django.db import OperationalError, connection
from django.test import AsyncClient, Client, RequestFactory, override_settings

from channel_registry import adisconnect_user, anotify_user, asend_to_user
from channel_registry.protocol import PROTOCOL_VERSION
from channel_registry.registry.liveness import process
from channel_registry.views import RETRY_MS, EventStreamView

from .conftest import close_layer_connections, rows

pytestmark = pytest.mark.django_db(transaction=True)

application = get_asgi_application()


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def http_scope(cookie: str, *headers: tuple[bytes, bytes]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/events/",
        "raw_path": b"/events/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"accept", b"text/event-stream"), (b"cookie", cookie.encode()),
                    *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


class Stream:
    """One client of ``/events/``: the response head, then body chunks as text."""

    def __init__(self, cookie: str, *headers: tuple[bytes, bytes]) -> None:
        self.app = ApplicationCommunicator(application, http_scope(cookie, *headers))
        self.head: dict = {}

    async def open(self) -> None:
        await self.app.send_input({"type": "http.request", "body": b"", "more_body": False})
        self.head = await self.app.receive_output(3)
        assert await self.read() == f"retry: {RETRY_MS}\n\n"
        # A new client's first event: where its user's history stands, as the id the browser keeps.
        first = await self.read_event()
        assert first["event"] == "position" and first["id"] == f"{first['data']['epoch']}:{first['data']['seq']}"
        assert first["data"]["protocol"] == PROTOCOL_VERSION
        self.epoch = first["data"]["epoch"]

    @property
    def headers(self) -> dict:
        return {name.decode().lower(): value.decode() for name, value in self.head["headers"]}

    async def read(self) -> str:
        message = await self.app.receive_output(3)
        assert message["type"] == "http.response.body"
        return message["body"].decode()

    async def read_event(self) -> dict:
        """The next event, heartbeats skipped: {"id", "event", "data" (parsed JSON)}."""
        while (text := await self.read()).startswith(":"):
            pass
        fields = dict(line.split(": ", 1) for line in text.strip("\n").split("\n"))
        return {**fields, "data": json.loads(fields["data"])}

    async def leave(self) -> None:
        """What daphne sends when the browser closes the tab."""
        await self.app.send_input({"type": "http.disconnect"})
        await self.app.wait(3)


@pytest.fixture
async def open_stream():
    streams = []

    async def open_as(user) -> Stream:
        stream = Stream(await sync_to_async(session_cookie)(user))
        streams.append(stream)
        await stream.open()
        return stream

    yield open_as
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.leave()
    await close_layer_connections()


async def test_anonymous_client_gets_401():
    response = await AsyncClient().get("/events/")
    assert response.status_code == 401


async def test_a_stream_over_the_connection_limit_is_refused_at_once_with_429(open_stream, connect, alice, settings):
    settings.CHANNEL_REGISTRY = {"MAX_CONNECTIONS_PER_USER": 2}
    await connect(alice)
    await open_stream(alice)
    refused = Stream(await sync_to_async(session_cookie)(alice))
    await refused.app.send_input({"type": "http.request", "body": b"", "more_body": False})
    head = await refused.app.receive_output(3)  # not a stream that never sends its status line
    assert head["status"] == 429
    body = json.loads((await refused.app.receive_output(3))["body"])
    assert body == {"type": "error", "code": "too_many_connections", "detail": "too many open connections"}
    assert len(await rows(user=alice)) == 2


@pytest.mark.parametrize(
    "headers",
    [
        [(b"origin", b"http://testserver:8080"), (b"sec-fetch-site", b"same-site")],  # a page on another port
        [(b"sec-fetch-site", b"cross-site")],
        [(b"sec-fetch-site", b"same-site")],  # an <img> on another port: no Origin
    ],
)
async def test_a_request_from_another_origins_page_is_refused_with_403_before_registering(alice, headers):
    refused = Stream(await sync_to_async(session_cookie)(alice), *headers)
    await refused.app.send_input({"type": "http.request", "body": b"", "more_body": False})
    assert (await refused.app.receive_output(3))["status"] == 403
    assert json.loads((await refused.app.receive_output(3))["body"])["code"] == "forbidden"
    assert await rows(user=alice) == []


async def test_the_sites_own_page_opens_a_stream(open_stream, alice):
    stream = Stream(await sync_to_async(session_cookie)(alice), (b"sec-fetch-site", b"same-origin"))
    await stream.open()
    assert stream.head["status"] == 200
    await stream.leave()


async def test_a_stream_that_cannot_register_gets_503_with_retry_after(alice):
    stream = Stream(await sync_to_async(session_cookie)(alice))
    # Only the registry write fails: the session and the user must still load.
    with mock.patch("channel_registry.views.EventStreamView.strategy") as strategy:
        strategy.register.side_effect = OperationalError("database down")
        await stream.app.send_input({"type": "http.request", "body": b"", "more_body": False})
        head = await stream.app.receive_output(3)
    assert head["status"] == 503
    assert (b"Retry-After", b"5") in head["headers"]
    assert json.loads((await stream.app.receive_output(3))["body"])["code"] == "unavailable"


async def test_response_headers_and_registration(open_stream, alice):
    stream = await open_stream(alice)

    assert stream.head["status"] == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert "access-control-allow-origin" not in stream.headers
    [row] = await rows(user=alice)
    assert process.open[row.channel_name].user_id == alice.pk
    assert row.transport == "stream"


async def test_notification_reaches_the_stream(open_stream, alice):
    stream = await open_stream(alice)

    delivery = await anotify_user(alice, {"text": "hi"})

    assert delivery.sent == 1
    assert await stream.read() == (
        f'id: {stream.epoch}:1\nevent: notification\n'
        f'data: {{"type":"notification","data":{{"text":"hi"}},"epoch":"{stream.epoch}","seq":1}}\n\n'
    )


async def test_direct_message_reaches_stream_and_socket_with_the_same_frame(open_stream, connect, alice, bob):
    stream = await open_stream(alice)
    socket_tab = await connect(alice)
    sender = await connect(bob)

    await sender.send_json_to({"type": "direct", "to": alice.pk, "message": "<b>hi</b>", "id": "m1"})

    assert await sender.receive_json_from() == {"type": "ack", "id": "m1", "delivered": 2}
    event = await stream.read_event()
    assert event["event"] == "direct"
    assert event["data"] == await socket_tab.receive_json_from()
    assert event["data"]["message"] == "<b>hi</b>"


async def test_other_event_types_keep_their_name_and_data(open_stream, alice):
    stream = await open_stream(alice)

    await asend_to_user(alice, {"type": "chat.message", "text": "x"})
    await anotify_user(alice, "second")

    assert await stream.read_event() == {
        "id": f"{stream.epoch}:1", "event": "chat.message",
        "data": {"type": "chat.message", "text": "x", "epoch": stream.epoch, "seq": 1},
    }
    assert (await stream.read_event())["id"] == f"{stream.epoch}:2"


@override_settings(CHANNEL_REGISTRY={"SSE_HEARTBEAT": 0.05})
async def test_heartbeat_comments_while_quiet_and_events_still_arrive(open_stream, alice):
    stream = await open_stream(alice)

    assert await stream.read() == ": heartbeat\n\n"
    assert await stream.read() == ": heartbeat\n\n"
    await anotify_user(alice, "after the heartbeats")

    frame = {"type": "notification", "data": "after the heartbeats", "epoch": stream.epoch, "seq": 1}
    assert (await stream.read_event())["data"] == frame


async def test_client_going_away_removes_the_row(open_stream, alice, presence_events):
    stream = await open_stream(alice)
    [row] = await rows(user=alice)

    await stream.leave()

    assert await rows(user=alice) == []
    assert row.channel_name not in process.open
    assert presence_events == [("online", alice.pk), ("offline", alice.pk)]
    assert (await anotify_user(alice, "nobody")).channels == 0


async def test_disconnect_user_ends_the_stream_with_its_code(open_stream, alice):
    stream = await open_stream(alice)

    assert await adisconnect_user(alice, code=4401) == 1

    assert (await stream.read_event())["data"] == {"type": "disconnect", "code": 4401}
    assert await stream.app.receive_output(3) == {"type": "http.response.body"}
    assert await rows(user=alice) == []


def database_sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="counts PostgreSQL sessions")
async def test_open_streams_hold_no_database_connection_of_their_own(open_stream, alice):
    await open_stream(alice)
    before = await sync_to_async(database_sessions)()

    for _ in range(4):
        await open_stream(alice)

    assert len(await rows(user=alice)) == 5
    assert await sync_to_async(database_sessions)() == before


class PresenceStream(EventStreamView):
    groups = ["sse.test.presence"]


async def test_stream_joins_its_groups_while_open(alice, layer):
    request = RequestFactory().get("/events/")
    request.user = alice
    response = await PresenceStream.as_view()(request)
    chunks = aiter(response.streaming_content)
    assert await anext(chunks) == f"retry: {RETRY_MS}\n\n".encode()
    assert (await anext(chunks)).startswith(b"id: ")  # the position

    await layer.group_send("sse.test.presence", {"type": "demo.presence", "online": [1]})
    assert (await anext(chunks)).startswith(b"event: demo.presence\n")  # not recoverable: no id

    await adisconnect_user(alice)
    [last] = [chunk async for chunk in chunks]
    assert last.startswith(b"event: disconnect\n")
    assert await rows(user=alice) == []


