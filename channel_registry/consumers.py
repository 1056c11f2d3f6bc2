"""Consumers: glue between a socket, the wire protocol and a delivery strategy."""

from __future__ import annotations

import asyncio
import logging
import time

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib.auth import get_user_model
from django.db import DatabaseError, DataError
from django.utils.module_loading import import_string

from . import protocol
from .conf import registry_settings
from .exceptions import LAYER_TRANSPORT_ERRORS, ChannelLayerUnavailable, ConnectionLimitExceeded
from .groups import GroupStrategy
from .mapping import MappingStrategy
from .protocol import CLOSE_FORBIDDEN, CLOSE_TOO_MANY, CLOSE_UNAUTHENTICATED, CLOSE_UNAVAILABLE, ProtocolError
from .strategy import DeliveryStrategy

logger = logging.getLogger(__name__)

RECEIVE_RETRY_MAX = 10.0


class RegistryConsumerMixin:
    """Registers an authenticated socket on connect and forgets it when the consumer ends.

    Put it before ``AsyncWebsocketConsumer`` (or the JSON variant) in the bases.
    A refused socket is accepted, then closed with a code: closing before
    ``accept()`` makes daphne answer a bare HTTP 403, which the browser only
    reports as 1006 — indistinguishable from a network drop.
    """

    strategy: DeliveryStrategy = MappingStrategy()
    #: The registered user's primary key; ``None`` until registration succeeded.
    user_id = None
    #: The unregistration started when the client's close arrived.
    _unregistering: asyncio.Future | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.refuse(CLOSE_UNAUTHENTICATED)
            return
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None)
        try:
            await self.strategy.register(user.pk, self.channel_name, self.session_key)
        except ConnectionLimitExceeded:
            await self.refuse(CLOSE_TOO_MANY)
            return
        except (DatabaseError, ChannelLayerUnavailable):
            logger.exception("channel_registry: could not register %s", self.channel_name)
            await self.refuse(CLOSE_UNAVAILABLE)
            return
        self.user_id = user.pk
        # Accepted only once registered: a client that sees "open" is reachable.
        await self.accept()

    async def refuse(self, code: int) -> None:
        await self.accept()
        await self.close(code=code)

    @property
    def channel_receive(self):
        return self._receive_until_reachable

    @channel_receive.setter
    def channel_receive(self, layer_receive) -> None:
        # AsyncConsumer.__call__ assigns the layer's receive here and awaits it in
        # its dispatch loop; an error there would kill the consumer and close the
        # socket with 1011. Wrapping it lets open sockets ride out a Redis outage.
        self._layer_receive = layer_receive

    async def _receive_until_reachable(self) -> dict:
        delay = 0.5
        while True:
            try:
                return await self._layer_receive()
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
        self._unregistering = asyncio.ensure_future(self._unregister())
        await super().websocket_disconnect(message)

    async def __call__(self, scope, receive, send):
        # The other exits — an exception in a handler, or cancellation (daphne
        # cancels consumers on shutdown) — end here, so the row goes in all cases.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await (self._unregistering or self._unregister())

    async def _unregister(self) -> None:
        user_id, self.user_id = self.user_id, None
        if user_id is None:
            return
        try:
            await self.strategy.unregister(user_id, self.channel_name, self.session_key)
        except (DatabaseError, ChannelLayerUnavailable):
            # The row turns stale and prune_channels removes it.
            logger.warning("channel_registry: could not unregister %s", self.channel_name, exc_info=True)

    async def registry_disconnect(self, event) -> None:
        """Sent by ``disconnect_user`` and when a session ends: close this connection with the given code."""
        await self.close(code=event.get("code", CLOSE_FORBIDDEN))


class RegistryConsumer(RegistryConsumerMixin, AsyncJsonWebsocketConsumer):
    """A ready JSON consumer: notifications and direct messages between users.

    Extension points (override in a subclass): ``frame_types`` (add your own
    client frame types), ``get_recipient``, ``can_message``,
    ``build_direct_message``.
    """

    #: Client frame ``type`` → name of the method that answers it.
    frame_types = {"direct": "receive_direct", "ping": "receive_ping"}
    #: Channel layer events whose handlers only write to the socket. Channels runs
    #: ``close_old_connections`` through the thread pool before every handler; for
    #: these (one per delivered copy of every message) the hop is skipped. A
    #: subclass whose handler of one of them uses the ORM takes it out of this set.
    socket_only_events = frozenset({protocol.DIRECT_EVENT, protocol.NOTIFY_EVENT})

    async def connect(self) -> None:
        await super().connect()
        limit = registry_settings().RATE_LIMIT
        self.rate_limit = limit and protocol.TokenBucket(*limit, clock=time.monotonic)

    async def dispatch(self, message) -> None:
        if message["type"] in self.socket_only_events:
            await getattr(self, get_handler_name(message))(message)
        else:
            await super().dispatch(message)

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        """Answer one client frame; a bad frame gets an ``error`` frame, never a crash."""
        if self.user_id is None:
            return
        try:
            payload = protocol.decode_frame(text_data, registry_settings().MAX_MESSAGE_BYTES)
            reply = await self.handle_frame(payload)
        except ProtocolError as error:
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
        direct = protocol.parse_direct(payload)
        if self.rate_limit and not self.rate_limit.take():
            raise ProtocolError(protocol.RATE_LIMITED, "too many messages; slow down", direct.id)
        default_rules = self.recipient_rules_are_default()
        recipient_id = direct.to if default_rules else await self.get_recipient(direct.to)
        if recipient_id is not None and not await self.can_message(recipient_id):
            raise ProtocolError(protocol.FORBIDDEN, "you may not message this user", direct.id)
        event = {"type": protocol.DIRECT_EVENT, "frame": self.build_direct_message(direct)}
        if recipient_id is None:
            delivery = None
        elif default_rules:  # get_recipient's check made by the channel lookup itself: one statement
            delivery = await self.strategy.deliver_to_recipient(recipient_id, event)
        else:
            delivery = await self.strategy.deliver([recipient_id], event)
        if delivery is None:
            raise ProtocolError(protocol.UNKNOWN_RECIPIENT, f"no active user with id {direct.to}", direct.id)
        return protocol.ack_frame(direct.id, delivery.sent)

    def recipient_rules_are_default(self) -> bool:
        """Whether ``get_recipient`` and ``can_message`` are the library's (no policy, no override).

        Then the self-message rule needs no query and "an active user" is part of
        the strategy's channel lookup (``deliver_to_recipient``); an override or a
        ``CAN_MESSAGE`` policy runs first, on a recipient known to exist, as before.
        """
        cls = type(self)
        return (
            cls.get_recipient is RegistryConsumer.get_recipient
            and cls.can_message is RegistryConsumer.can_message
            and registry_settings().CAN_MESSAGE is None
        )

    async def get_recipient(self, user_id: int):
        """The recipient's primary key if they may receive messages, else ``None``."""
        try:
            exists = await get_user_model().objects.filter(pk=user_id, is_active=True).aexists()
        except DataError:  # an id outside the column's range on Django 4.2
            return None
        return user_id if exists else None

    async def can_message(self, recipient_id) -> bool:
        settings = registry_settings()
        if recipient_id == self.user_id and not settings.ALLOW_SELF_MESSAGE:
            return False
        if settings.CAN_MESSAGE is None:
            return True
        policy = import_string(settings.CAN_MESSAGE)
        if not asyncio.iscoroutinefunction(policy):
            policy = database_sync_to_async(policy)
        return bool(await policy(self.scope["user"], recipient_id))

    def build_direct_message(self, direct: protocol.Direct) -> dict:
        """The frame every tab of the recipient receives."""
        return protocol.direct_frame(self.user_id, direct)

    async def registry_direct(self, event) -> None:
        await self.send_json(event["frame"])

    async def registry_notify(self, event) -> None:
        await self.send_json(protocol.notification_frame(event["data"]))


class GroupConsumer(RegistryConsumer):
    """:class:`RegistryConsumer`'s protocol, delivered through per-user groups."""

    strategy = GroupStrategy()
