"""One interface for the two ways of reaching a user.

The explicit registry (:class:`channel_registry.delivery.mapping.MappingStrategy`) and
per-user groups (:class:`channel_registry.groups.GroupStrategy`) answer the same
questions — how a connection is registered and unregistered, how an event
reaches a set of users — so the consumer, the wire protocol, the event stream
view and the benchmark are written once against this class.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.core.exceptions import ImproperlyConfigured

from .. import metrics
from ..conf import registry_settings
from ..exceptions import HistoryShareExceeded
from ..history.log import Position, history_for
from ..models import Transport, active_users


@dataclass(frozen=True)
class Delivery:
    """What happened to one event.

    ``channels``: live channels targeted; ``sent``: accepted by the layer;
    ``failed``: channel names the layer refused (``ChannelFull``). The group
    strategy cannot know how many channels a group holds: there ``channels``
    and ``sent`` are ``None``.
    """

    channels: int | None
    sent: int | None
    failed: list[str] = field(default_factory=list)


def channel_layer() -> Any:
    """The layer named by the ``CHANNEL_LAYER`` option, or a clear error."""
    alias = registry_settings().CHANNEL_LAYER
    layer = get_channel_layer(alias)
    if layer is None:
        raise ImproperlyConfigured(
            f"channel_registry needs a channel layer: CHANNEL_LAYERS has no {alias!r} entry."
        )
    return layer


class DeliveryStrategy:
    """How connections are recorded and how events reach their users."""

    async def register(
        self, user_id: Any, channel_name: str, session_key: str | None = None, transport: str = Transport.SOCKET
    ) -> None:
        """Make ``channel_name`` reachable as one of ``user_id``'s connections, opened by that session.

        ``transport`` (a ``Transport``) is what the admin shows; a strategy without rows ignores it.
        """
        raise NotImplementedError

    async def unregister(self, user_id: Any, channel_name: str, session_key: str | None = None) -> None:
        """Forget the connection; safe to call for one that is already gone."""
        raise NotImplementedError

    async def deliver(
        self, user_ids: Collection[Any], event: dict[str, Any], *, recover: bool = False, sender: Any = None
    ) -> Delivery:
        """Send ``event`` to every live connection of every user in ``user_ids``.

        With ``recover``, the event is appended to each user's history and goes
        out carrying that user's position, in an order that loses it for no
        connection (see ``history/cursor.py``); for one user, through the direct
        messages' pipeline (``pipeline.py``: on Redis, one script). ``sender`` is
        the user whose share of each history the event takes (a direct message's);
        raises ``HistoryShareExceeded``, sending nothing, when a history holds it already.
        """
        history = history_for(channel_layer()) if recover else None
        if history is None:
            return metrics.copies(await self.route(user_ids, event))
        if len(user_ids) == 1:
            from .pipeline import Outgoing, pipeline_for  # it builds on this module

            (user_id,) = user_ids
            seen = history.last_seen(user_id)  # before the lookup
            out = Outgoing(sender, user_id, event, await self.routes(user_id), seen, [], None, keep_unpaid=False)
            return await pipeline_for(channel_layer()).commit(out, self)
        positions = await history.append(user_ids, event, sender)
        metrics.history_appended(len(positions))
        if len(positions) < len(set(user_ids)):
            raise HistoryShareExceeded(f"a history holds the share of {sender!r} already")
        return metrics.copies(await self.route(user_ids, event, positions))

    async def route(
        self, user_ids: Collection[Any], event: dict[str, Any], positions: dict[Any, Position] | None = None
    ) -> Delivery:
        """Send ``event`` to the users' live connections, stamped with their ``positions`` if given."""
        raise NotImplementedError

    async def deliver_to_session(self, session_key: str, event: dict[str, Any]) -> Delivery:
        """Send ``event`` to every live connection opened by the session ``session_key``."""
        raise NotImplementedError

    async def resolve(self, user_id: Any) -> tuple[bool, list[str] | None]:
        """A direct message's two questions: is ``user_id`` an active user, and ``routes(user_id)``.

        The mapping strategy answers both with one statement.
        """
        if not await active_user_exists(user_id):
            return False, None
        return True, await self.routes(user_id)

    async def routes(self, user_id: Any) -> list[str] | None:
        """The live channels ``deliver`` would send ``user_id``'s events to now; ``None`` when it cannot list them.

        What a sender's copy budget (``FANOUT_LIMIT``) pays for, one token each, before
        anything is stored or sent; a strategy that lists them gets them sent with ``send_to``.
        """
        return None

    async def send_to(self, channels: list[str], event: dict[str, Any]) -> Delivery:
        """Send ``event`` to ``channels``, as listed by ``routes``."""
        raise NotImplementedError

    async def account(self, channels: int, failed: list[str]) -> Delivery:
        """The ``Delivery`` of a send to ``channels`` channels that refused ``failed``; forgets dead processes."""
        raise NotImplementedError


async def active_user_exists(user_id: Any) -> bool:
    # database_sync_to_async, not the async ORM: it closes stale connections itself, so a
    # frame handler that asks it needs no ``close_old_connections`` hop (``socket_only_events``).
    return await database_sync_to_async(active_users().filter(pk=user_id).exists)()
