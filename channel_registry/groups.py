"""The per-user group strategy: Channels' usual recipe behind the registry's interface.

A connection joins the group ``GROUP_PREFIX + <user pk>`` (and one per session,
so a logout can close that session's connections); delivery is one
``group_send`` per user. Groups cannot be listed, so this strategy cannot say
how many channels an event reached (``Delivery.channels`` and ``sent`` are
``None``, the ``ack`` frame's ``delivered`` is ``null``), cannot answer presence,
and keeps a dead member until the layer's ``group_expiry``. It exists so both
approaches can be compared on the same workload, with the same protocol. The
connection limit is counted apart from the groups, in slots (``registry/slots.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Collection
from typing import Any

from .conf import registry_settings
from .delivery.fanout import layer_slots, run_bounded, send_many
from .delivery.strategy import Delivery, DeliveryStrategy, channel_layer
from .dispatch import Dispatcher
from .exceptions import ChannelLayerUnavailable, layer_unavailable
from .history.log import Position, stamped
from .models import Transport, session_digest
from .protocol import CLOSE_TOO_MANY, DISCONNECT_EVENT
from .registry.slots import slots


def group_name(user_id: Any) -> str:
    return f"{registry_settings().GROUP_PREFIX}{user_id}"


def session_group(session_key: str) -> str:
    # 40 hex digits of the digest keep the name within the layer's 100 characters.
    return f"{registry_settings().GROUP_PREFIX}session.{session_digest(session_key)[:40]}"


def connection_groups(user_id: Any, session_key: str | None) -> list[str]:
    """The groups a connection joins: its user's, and its session's when it has one."""
    return [group_name(user_id), *([session_group(session_key)] if session_key else [])]


async def _layer_call(method: str, *args: Any) -> None:
    layer = channel_layer()
    with layer_unavailable(layer):
        async with layer_slots():
            await getattr(layer, method)(*args)


class GroupStrategy(DeliveryStrategy):
    """Per-user groups: `group_add` on connect, one `group_send` per user to deliver.

    ``MAX_CONNECTIONS_PER_USER`` counts a slot per connection (see ``registry/slots.py``).
    """

    async def register(
        self, user_id: Any, channel_name: str, session_key: str | None = None, transport: str = Transport.SOCKET
    ) -> None:
        evicted = await slots.claim(channel_layer(), user_id, channel_name)
        try:
            for group in connection_groups(user_id, session_key):
                await _layer_call("group_add", group, channel_name)
        except Exception:
            # Not registered: the slot goes now, or (Redis down) expires unrefreshed.
            with contextlib.suppress(ChannelLayerUnavailable):
                await slots.release(channel_layer(), channel_name)
            raise
        if evicted:
            event = {"type": DISCONNECT_EVENT, "code": CLOSE_TOO_MANY}
            await send_many(channel_layer(), evicted, event, concurrency=registry_settings().SEND_CONCURRENCY)

    async def unregister(self, user_id: Any, channel_name: str, session_key: str | None = None) -> None:
        try:
            for group in connection_groups(user_id, session_key):
                await _layer_call("group_discard", group, channel_name)
        finally:
            await slots.release(channel_layer(), channel_name)

    async def route(
        self, user_ids: Collection[Any], event: dict[str, Any], positions: dict[Any, Position] | None = None
    ) -> Delivery:
        layer = channel_layer()

        async def send(user_id: Any) -> None:
            message = stamped(event, {user_id: positions[user_id]}) if positions else event
            await layer.group_send(group_name(user_id), message)

        # One group_send per user, within the process's budget of commands in flight.
        with layer_unavailable(layer):
            await run_bounded(list(user_ids), send, registry_settings().SEND_CONCURRENCY)
        return Delivery(channels=None, sent=None, failed=[])

    async def deliver_to_session(self, session_key: str, event: dict[str, Any]) -> Delivery:
        await _layer_call("group_send", session_group(session_key), event)
        return Delivery(channels=None, sent=None, failed=[])


groups = Dispatcher(GroupStrategy())

asend_to_user = groups.asend_to_user
asend_to_users = groups.asend_to_users
anotify_user = groups.anotify_user
send_to_user = groups.send_to_user
send_to_users = groups.send_to_users
notify_user = groups.notify_user
adisconnect_user = groups.adisconnect_user
disconnect_user = groups.disconnect_user


def __getattr__(name: str) -> Any:
    # 0.1 defined GroupConsumer here; it moved to consumers (which imports this module).
    if name == "GroupConsumer":
        from .consumers import GroupConsumer

        warnings.warn(
            "channel_registry.groups.GroupConsumer moved to channel_registry.consumers.GroupConsumer; "
            "the old import will be removed in 0.3.",
            DeprecationWarning,
            stacklevel=2,
        )
        return GroupConsumer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
