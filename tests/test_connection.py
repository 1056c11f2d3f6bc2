"""One connection session, two transports: the same steps answered as a socket and as an event stream."""

import json

import pytest
from asgiref.sync import sync_to_async

from channel_registry import ChannelLayerUnavailable
from channel_registry.consumers import GroupConsumer
from channel_registry.history.cursor import Cursor
from channel_registry.registry.liveness import process

from .conftest import close_layer_connections, rows
from .test_sse import Stream, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def unreadable_history(monkeypatch):
    """Every history read after registering fails, as when the history's Redis refuses it."""

    async def start(cursor, since):
        raise ChannelLayerUnavailable("the history's Redis refused the read")

    monkeypatch.setattr(Cursor, "start", start)


@pytest.mark.parametrize("consumer", [None, GroupConsumer], ids=["mapping", "groups"])
async def test_a_socket_whose_history_cannot_be_read_is_closed_with_4503_and_leaves_nothing(
    connect, alice, consumer, unreadable_history
):
    kwargs = {"consumer": consumer} if consumer else {}

    socket = await connect(alice, **kwargs)

    assert socket.position is None  # no first frame: the close
    assert await socket.receive_output(3) == {"type": "websocket.close", "code": 4503}
    # Unregistered before the refusal went out, not when the client's close arrives.
    assert await rows(user=alice) == [] and process.watched == {}


async def test_a_stream_whose_history_cannot_be_read_gets_503_and_leaves_nothing(alice, unreadable_history):
    stream = Stream(await sync_to_async(session_cookie)(alice))

    await stream.app.send_input({"type": "http.request", "body": b"", "more_body": False})
    head = await stream.app.receive_output(3)

    assert head["status"] == 503
    assert (b"Retry-After", b"5") in head["headers"]
    assert json.loads((await stream.app.receive_output(3))["body"])["code"] == "unavailable"
    assert await rows(user=alice) == [] and process.watched == {}
    await close_layer_connections()
