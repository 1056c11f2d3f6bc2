"""Consumers: glue between a socket, the wire protocol and a delivery strategy."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer
from django.db import DatabaseError

from . import metrics, protocol
from .cancellation import cancellable
from .conf import registry_settings
from .connection import ConnectionSession, Refused
from .delivery.mapping import MappingStrategy
from .delivery.strategy import DeliveryStrategy
from .exceptions import LAYER_TRANSPORT_ERRORS, ChannelLayerUnavailable, layer_unavailable
from .groups import GroupStrategy
from .history.cursor import HISTORY_EVENTS, Cursor
from .inbound import InboundGate
from .messaging import DirectMessages
from .models import Transport
from .protocol import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, CLOSE_UNAVAILABLE, ProtocolError
from .registry.sessions import Access

logger = logging.getLogger(__name__)

RECEIVE_RETRY_MAX = 10.0


def receive_may_lose_cancellation(layer: Any) -> bool:
    """Whether a cancelled ``layer.receive`` may carry on (see ``cancellable``).

    Not the in-memory layer's, nor a layer that says its receive only awaits
    in-process futures (``BatchedRedisChannelLayer.receive_keeps_cancellation``):
    those need no task of their own per message.
    """
    return not (isinstance(layer, InMemoryChannelLayer) or getattr(layer, "receive_keeps_cancellation", False))


def query_param(scope: dict, name: str) -> str | None:
    """The first value of ``name`` in the connection's query string."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


class RegistryConsumerMixin:
    """Registers an authenticated socket on connect and forgets it when the consumer ends.

    Put it before ``AsyncWebsocketConsumer`` (or the JSON variant) in the bases.
    A refused socket is accepted, then closed with a code: closing before
    ``accept()`` makes daphne answer a bare HTTP 403, which the browser only
    reports as 1006 — indistinguishable from a network drop.
    """

    strategy: DeliveryStrategy = MappingStrategy()
    #: The registered user's primary key; ``None`` until the connection opened, and once it closes.
    user_id = None
    #: The unregistration started when the client's close arrived.
    _unregistering: asyncio.Future | None = None
    #: The registry's side of this connection, from ``connect`` on.
    connection_session: ConnectionSession | None = None
    #: What this connection may send (``INBOUND_LIMIT``); ``None`` without a limit.
    inbound: InboundGate | None = None
    #: Events whose handlers need no ``close_old_connections`` first. Channels runs it
    #: through the thread pool before every handler; for these the hop is skipped: the
    #: channel layer events whose handlers only write to the socket (one per delivered
    #: copy of every message). A subclass whose handler of one of them uses the ORM
    #: takes it out of this set; one whose frame handlers reach the database only through
    #: ``database_sync_to_async`` or the registry's native connections may add
    #: ``"websocket.receive"`` (the demo does).
    socket_only_events: frozenset[str] = HISTORY_EVENTS

    async def websocket_connect(self, message) -> None:
        # Channels joins ``groups`` before ``connect``: an unreachable or full Redis there
        # crashed the consumer (HTTP 500 for the handshake); it is an outage like any other.
        try:
            with layer_unavailable(self.channel_layer):
                await super().websocket_connect(message)
        except ChannelLayerUnavailable:
            logger.warning("channel_registry: could not join the groups of %s", self.channel_name, exc_info=True)
            await self.refuse(CLOSE_UNAVAILABLE)

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.refuse(CLOSE_UNAUTHENTICATED)
            return
        self.session_key = getattr(self.scope.get("session"), "session_key", None)
        access = Access.of(user, self.session_key)
        self.connection_session = ConnectionSession(
            self.strategy, self.channel_name, access, Transport.SOCKET, self, inbound=self.inbound
        )
        try:
            events = await self.connection_session.open(query_param(self.scope, "since"))
        except Refused as refused:
            await self.refuse(refused.code, reason=None if refused.retry_after is None else str(refused.retry_after))
            return
        self.user_id = user.pk
        # Accepted only once registered: a client that sees "open" is reachable.
        await self.accept()
        for event in events:
            await self.dispatch_one(event)

    @property
    def cursor(self) -> Cursor | None:
        """Where this connection is in its user's history; ``None`` without one."""
        return self.connection_session.cursor if self.connection_session else None

    async def dispatch(self, message) -> None:
        session = self.connection_session
        for event in [message] if session is None else await session.admit(message):
            await self.dispatch_one(event)

    async def dispatch_one(self, event) -> None:
        if event["type"] in self.socket_only_events:
            await getattr(self, get_handler_name(event))(event)
        else:
            await super().dispatch(event)

    async def registry_position(self, event) -> None:
        await self.send(text_data=json.dumps(protocol.history_frame(event)))

    registry_recovered = registry_reset = registry_position

    async def refuse(self, code: int, reason: str | None = None) -> None:
        metrics.connection_refused(Transport.SOCKET, code)
        await self.accept()
        await self.close(code=code, reason=reason)

    @property
    def channel_receive(self):
        return self._receive_until_reachable

    @channel_receive.setter
    def channel_receive(self, layer_receive) -> None:
        # AsyncConsumer.__call__ assigns the layer's receive here and awaits it in
        # its dispatch loop; an error there would kill the consumer and close the
        # socket with 1011. Wrapping it lets open sockets ride out a Redis outage.
        self._layer_receive = layer_receive
        self._guard_receive = receive_may_lose_cancellation(self.channel_layer)

    async def _receive_until_reachable(self) -> dict:
        delay = 0.5
        while True:
            try:
                received = self._layer_receive()
                return await (cancellable(received) if self._guard_receive else received)
            except LAYER_TRANSPORT_ERRORS as error:
                logger.warning("channel_registry: channel layer unreachable (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECEIVE_RETRY_MAX)

    async def websocket_disconnect(self, message) -> None:
        # The row goes as soon as the server reports the close, whatever else
        # waits: on Python 3.11 the consumer's pending layer receive may swallow
        # its cancellation (CPython gh-86296), and Channels' dispatch loop then
        # waits for it in a ``finally`` until the server kills the consumer.
        # A task of its own, so the dispatch loop cancels that receive as early as before.
        self._unregistering = asyncio.ensure_future(self._unregister(message.get("code")))
        await super().websocket_disconnect(message)

    async def __call__(self, scope, receive, send):
        # The consumer reads the server's queue through the connection's inbound
        # budget, which never stops reading it, and sends through it: nothing once
        # the budget closed the connection (see inbound.py).
        limit = registry_settings().INBOUND_LIMIT
        self.inbound = gate = InboundGate(receive, send, limit) if limit else None
        # The other exits — an exception in a handler, or cancellation (daphne
        # cancels consumers on shutdown) — end here, so the row goes in all cases.
        try:
            if gate:
                receive, send = gate.receive, gate.send
            await cancellable(super().__call__(scope, receive, send))
        finally:
            if gate:
                gate.stop()
            await (self._unregistering or self._unregister())

    async def _unregister(self, code: object = metrics.NO_CLOSE_CODE) -> None:
        self.user_id = None
        if self.connection_session is not None:
            await self.connection_session.close(code)

    async def registry_disconnect(self, event) -> None:
        """Sent by ``disconnect_user`` and when a session ends: close this connection with the given code."""
        await self.close(code=event.get("code", CLOSE_FORBIDDEN))


class RegistryConsumer(RegistryConsumerMixin, AsyncJsonWebsocketConsumer):
    """A ready JSON consumer: notifications and direct messages between users.

    Extension points (override in a subclass): ``frame_types`` (add your own
    client frame types) and ``messages_class`` (a :class:`DirectMessages`
    subclass: who may receive, the policy, the frame built, what happens after).
    """

    #: Client frame ``type`` → name of the method that answers it.
    frame_types = {"direct": "receive_direct", "ping": "receive_ping"}
    #: How this connection's user sends direct messages: the same class serves HTTP views.
    messages_class: type[DirectMessages] = DirectMessages
    socket_only_events = HISTORY_EVENTS | {protocol.DIRECT_EVENT, protocol.NOTIFY_EVENT}

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        """Answer one client frame; a bad frame gets an ``error`` frame, never a crash."""
        if self.user_id is None:
            return
        try:
            payload = protocol.decode_frame(text_data, registry_settings().MAX_MESSAGE_BYTES)
            reply = await self.handle_frame(payload)
        except ProtocolError as error:
            # Answered at once, budget refusals included; a connection that sends on
            # regardless runs into its inbound budget (INBOUND_LIMIT) and is closed.
            if error.retry_after and self.inbound:
                self.inbound.told_to_wait(error.retry_after)
            reply = error.frame()
        if reply is not None:
            await self.send_json(reply)

    async def handle_frame(self, payload: dict) -> dict | None:
        frame_type = payload.get("type")
        handler = self.frame_types.get(frame_type) if isinstance(frame_type, str) else None
        if handler is None:
            raise ProtocolError(
                protocol.UNKNOWN_TYPE,
                f"unknown frame type; expected one of {sorted(self.frame_types)}",
                protocol.read_client_id(payload),
            )
        try:
            return await getattr(self, handler)(payload)
        except (DatabaseError, ChannelLayerUnavailable) as error:
            logger.warning("channel_registry: %s failed: %s", handler, error)
            raise ProtocolError(
                protocol.UNAVAILABLE,
                "the server cannot deliver messages right now; try again shortly",
                protocol.read_client_id(payload),
            ) from error

    async def receive_ping(self, payload: dict) -> dict:
        return protocol.PONG

    async def receive_direct(self, payload: dict) -> dict:
        messages = self.messages_class(self.scope["user"], self.strategy)
        return await messages.send(protocol.parse_direct(payload))

    async def registry_direct(self, event) -> None:
        await self.send_json(protocol.with_position(event["frame"], event))

    async def registry_notify(self, event) -> None:
        await self.send_json(protocol.with_position(protocol.notification_frame(event["data"]), event))


class GroupConsumer(RegistryConsumer):
    """:class:`RegistryConsumer`'s protocol, delivered through per-user groups."""

    strategy = GroupStrategy()
