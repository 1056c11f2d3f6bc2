"""One connection's life in the registry, whichever transport carries it.

A WebSocket (``consumers.RegistryConsumerMixin``) and an event stream
(``views.EventStreamView``) live the same life: pay the user's handshake and
resume budgets, register with the delivery strategy, check that the access the
handshake was let in with has not ended meanwhile, join the stream's groups,
read the history after the client's position, pass every incoming event through
the history cursor, and on the way out unregister. :class:`ConnectionSession`
owns that life; the transports only turn its outcomes into their own answers: a
close code or accept for a socket, an HTTP status or SSE text for a stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any

from django.db import DatabaseError

from . import metrics
from .conf import registry_settings
from .delivery import budget
from .delivery.strategy import DeliveryStrategy, channel_layer
from .exceptions import LAYER_TRANSPORT_ERRORS, ChannelLayerUnavailable, ConnectionLimitExceeded
from .history.cursor import Cursor
from .history.log import history_for
from .inbound import InboundGate, user_bucket
from .protocol import CLOSE_RETRY_LATER, CLOSE_TOO_MANY, CLOSE_UNAVAILABLE
from .registry.liveness import unwatch, watch
from .registry.sessions import Access

logger = logging.getLogger(__name__)

#: How the session awaits a registry call: as it is, or outside a request's thread (``views.on_shared_thread``).
Hop = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


class Refused(Exception):
    """The connection was not opened, and nothing of it is left registered.

    ``code`` is the close code a socket gets (``protocol.CLOSE_*``); an event stream
    answers it with an HTTP status, or, for an access that ended, a ``disconnect``
    event. ``retry_after``: the whole seconds to wait, over a handshake or resume budget.
    """

    def __init__(self, code: int, retry_after: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.retry_after = retry_after


async def inline(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return await coroutine


class ConnectionSession:
    """The registry's side of one connection: ``open`` it, ``admit`` what arrives, ``close`` it.

    ``channel_name`` is the connection's channel; ``access`` what its handshake was
    let in with; ``transport`` (a ``models.Transport``) and ``owner`` (the consumer
    or view) label its row and metrics. ``groups`` are joined after registering and
    left after unregistering (a consumer's own ``groups`` are Channels' to join);
    ``inbound`` is charged to the user's bucket too once registered; registry calls
    are awaited through ``hop``.
    """

    def __init__(
        self,
        strategy: DeliveryStrategy,
        channel_name: str,
        access: Access,
        transport: str,
        owner: object,
        *,
        groups: Collection[str] = (),
        inbound: InboundGate | None = None,
        hop: Hop = inline,
    ) -> None:
        self.strategy = strategy
        self.channel_name = channel_name
        self.access = access
        self.transport = transport
        self.owner = owner
        self.groups = groups
        self.inbound = inbound
        self.hop = hop
        self.layer = channel_layer()
        #: Where this connection is in its user's history; ``None`` without one.
        self.cursor: Cursor | None = None
        self.registered = False
        self.opened = False

    @property
    def user_id(self) -> Any:
        return self.access.user_id

    @property
    def session_key(self) -> str | None:
        return self.access.session_key or None

    async def open(self, since: str | None) -> list[dict[str, Any]]:
        """The connection's first events (its history position, or what it missed since ``since``).

        Raises :class:`Refused`, having unregistered what it registered. Each step
        needs the one before: the history is read only once registered (see
        ``history/cursor.py`` for why that order loses nothing), so a transport
        that shows "open" only after this returns shows it to a reachable client.
        """
        await self.register(resuming=since is not None)
        try:
            await self.check_access()
            events = await self.start(since)
        except Refused:
            await self.close()
            raise
        self.opened = True
        metrics.connection_opened(self.transport, self.owner)
        return events

    async def register(self, resuming: bool) -> None:
        """Pay the handshake (and resume) budget, as both transports do, then register."""
        try:
            verdict = await budget.spend(self.layer, self.user_id, budget.connection_costs(resuming))
            if not verdict.allowed:
                raise Refused(CLOSE_RETRY_LATER, await budget.held_back(verdict))
            await self.hop(self.strategy.register(self.user_id, self.channel_name, self.session_key, self.transport))
        except ConnectionLimitExceeded:
            raise Refused(CLOSE_TOO_MANY) from None
        except (DatabaseError, ChannelLayerUnavailable):
            logger.exception("channel_registry: could not register %s", self.channel_name)
            raise Refused(CLOSE_UNAVAILABLE) from None
        self.registered = True
        user_limit = registry_settings().INBOUND_USER_LIMIT
        if self.inbound and user_limit:
            self.inbound.share(user_bucket(self.user_id, user_limit))

    async def check_access(self) -> None:
        # The session may have ended since the middleware loaded it: a logout or
        # password change whose close went out before this registration.
        ended = await self.hop(watch(self.channel_name, self.access))
        if ended is not None:
            raise Refused(ended)

    async def start(self, since: str | None) -> list[dict[str, Any]]:
        """Join ``groups``, then start the cursor: its first events."""
        try:
            for group in self.groups:
                await self.layer.group_add(group, self.channel_name)
            history = history_for(self.layer)
            if history is None:
                return []
            cursor = Cursor(history, self.user_id)
            events = await cursor.start(since)
        except ChannelLayerUnavailable:
            logger.warning("channel_registry: history unavailable for %s", self.channel_name, exc_info=True)
            raise Refused(CLOSE_UNAVAILABLE) from None
        self.cursor = cursor
        return events

    async def admit(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """What to pass on for one incoming event: recoverable events pass the cursor
        (duplicates dropped, gaps filled, in ``seq`` order); the others as they are."""
        return [event] if self.cursor is None else await self.cursor.admit(event)

    async def close(self, code: object = metrics.NO_CLOSE_CODE) -> None:
        """Unregister, then leave ``groups``; safe to call in every case, and more than once.

        ``code`` is how the connection ended, for the metrics. Unregistering comes
        first: presence and delivery read the row; a group membership only expires.
        """
        if self.opened:
            self.opened = False
            metrics.connection_closed(self.transport, self.owner, code)
        if not self.registered:
            return
        self.registered = False
        unwatch(self.channel_name)
        try:
            await self.hop(self.strategy.unregister(self.user_id, self.channel_name, self.session_key))
            for group in self.groups:
                await self.layer.group_discard(group, self.channel_name)
        except (DatabaseError, ChannelLayerUnavailable, *LAYER_TRANSPORT_ERRORS):
            # The row turns stale and prune_channels removes it.
            logger.warning("channel_registry: could not unregister %s", self.channel_name, exc_info=True)
