"""``hangup.py``: how the library finds the server's transport behind ``send``, and what it does to it.

Over a real loopback connection for asyncio (uvicorn's case); with a recording
transport for Twisted (daphne's). ``tests/test_abuse.py`` floods both real servers.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
from channels.sessions import InstanceSessionWrapper

from channel_registry import hangup
from channel_registry.middleware import CloseOnDatabaseError

from .processes import await_until


class ServerProtocol(asyncio.Protocol):
    """uvicorn's shape: the application's ``send`` is a method of the protocol holding ``transport``."""

    def __init__(self) -> None:
        self.received = 0
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)

    def connection_lost(self, exc) -> None:
        self.lost.set_result(exc)

    async def send(self, message: dict) -> None:
        self.transport.write(message["text"].encode())


class TwistedTransport:
    """What daphne's protocol holds: records the two calls hang_up may make."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pauseProducing")

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")


class DaphneServer:
    async def handle_reply(self, protocol, message: dict) -> None:
        pass


@pytest.fixture
def drop_after(monkeypatch):
    monkeypatch.setattr(hangup, "DROP_AFTER", 0.2)
    return 0.2


@pytest.fixture
async def connection():
    """(the server's protocol, the client's reader and writer) over loopback."""
    made = asyncio.get_running_loop().create_future()

    def accept() -> ServerProtocol:
        made.set_result(ServerProtocol())
        return made.result()

    server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    yield await made, reader, writer
    writer.close()
    server.close()


async def test_an_asyncio_transport_stops_reading_at_once_and_is_dropped_after_the_close_frame(connection, drop_after):
    protocol, reader, writer = connection
    await protocol.send({"text": "close frame"})
    assert hangup.hang_up(protocol.send)

    # What was written still arrives; read before the drop, which a loaded machine may reach mid-loop.
    assert await reader.readexactly(len("close frame")) == b"close frame"
    for _ in range(20):  # the client keeps sending: none of it is read
        writer.write(b"x" * 10_000)
        await asyncio.sleep(0.005)
    assert protocol.received == 0
    await asyncio.wait_for(protocol.lost, drop_after + 1)  # dropped, not waiting for the client


async def test_daphne_sends_through_a_partial_of_its_protocol(drop_after):
    transport = TwistedTransport()
    protocol = type("WebSocketProtocol", (), {"transport": transport})()
    send = functools.partial(DaphneServer().handle_reply, protocol)

    assert hangup.hang_up(send)
    assert transport.calls == ["pauseProducing"]
    await await_until(lambda: len(transport.calls) > 1, within=drop_after + 5)
    assert transport.calls == ["pauseProducing", "abortConnection"]


async def test_the_servers_send_is_found_under_channels_sessions_and_the_librarys_middleware():
    protocol = ServerProtocol()
    seen = []

    async def app(scope, receive, send):
        seen.append(send)

    sessions = InstanceSessionWrapper({"cookies": {}}, protocol.send)
    await CloseOnDatabaseError(app)({"type": "websocket"}, None, sessions.send)
    assert seen[0] is not protocol.send
    assert hangup.server_send(seen[0]) == protocol.send


async def test_an_unknown_server_is_left_alone():
    async def send(message):
        pass

    assert not hangup.hang_up(send)
    assert not hangup.hang_up(functools.partial(send))  # a partial, but of nothing holding a transport
