"""One interface for the two ways of reaching a user.

The explicit registry (:class:`channel_registry.mapping.MappingStrategy`) and
per-user groups (:class:`channel_registry.groups.GroupStrategy`) answer the same
questions — how a connection is registered and unregistered, how an event
reaches a set of users — so the consumer, the wire protocol, the event stream
view and the benchmark are written once against this class.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db import DataError

from .conf import registry_settings


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

    async def register(self, user_id: Any, channel_name: str, session_key: str | None = None) -> None:
        """Make ``channel_name`` reachable as one of ``user_id``'s connections, opened by that session."""
        raise NotImplementedError

    async def unregister(self, user_id: Any, channel_name: str, session_key: str | None = None) -> None:
        """Forget the connection; safe to call for one that is already gone."""
        raise NotImplementedError

    async def deliver(self, user_ids: Collection[Any], event: dict[str, Any]) -> Delivery:
        """Send ``event`` to every live connection of every user in ``user_ids``."""
        raise NotImplementedError

    async def deliver_to_session(self, session_key: str, event: dict[str, Any]) -> Delivery:
        """Send ``event`` to every live connection opened by the session ``session_key``."""
        raise NotImplementedError

    async def deliver_to_recipient(self, user_id: Any, event: dict[str, Any]) -> Delivery | None:
        """``deliver([user_id], event)`` if ``user_id`` is an active user, else ``None`` (nothing sent).

        A direct message's recipient check; the mapping strategy answers it with
        the same statement that finds the recipient's channels.
        """
        if not await active_user_exists(user_id):
            return None
        return await self.deliver([user_id], event)


async def active_user_exists(user_id: Any) -> bool:
    try:
        return bool(await get_user_model().objects.filter(pk=user_id, is_active=True).aexists())
    except DataError:  # an id outside the column's range (SQLite)
        return False
