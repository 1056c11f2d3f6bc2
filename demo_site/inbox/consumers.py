"""The demo's consumers: the library's two, plus live presence and stored messages."""

from channels.db import database_sync_to_async
from django.db import connections
from django.utils import timezone

from channel_registry import protocol
from channel_registry.consumers import GroupConsumer, RegistryConsumer
from channel_registry.delivery.strategy import Delivery
from channel_registry.messaging import DirectMessages
from channel_registry.registry import postgres

from .models import Notification
from .presence import PRESENCE_GROUP, broadcast_presence


def insert_statement() -> str:
    """``INSERT`` of one ``Notification``, named from the model's metadata."""
    quote = connections[Notification.objects.db].ops.quote_name
    meta = Notification._meta
    columns = ", ".join(quote(meta.get_field(name).column) for name in ("recipient", "sender", "message", "created_at"))
    return f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES (%s, %s, %s, %s) RETURNING {quote(meta.pk.column)}"


async def store_copy(recipient_id, sender_id, message) -> None:
    """The stored copy of a message that went out.

    On PostgreSQL, on the registry's native connections from the event loop: one
    round trip, no turn in asgiref's single sync thread (where every copy used to
    queue behind the others) and no connection health check first. Elsewhere
    through ``database_sync_to_async``, which closes stale connections itself.
    """
    if postgres.enabled():
        from psycopg.types.json import Jsonb

        await postgres.pool.fetch_all(insert_statement(), [recipient_id, sender_id, Jsonb(message), timezone.now()])
    else:
        await database_sync_to_async(Notification.objects.create)(
            recipient_id=recipient_id, sender_id=sender_id, message=message
        )


class InboxMessages(DirectMessages):
    """The one path of "a user sends a direct message" in the demo, socket or ``POST /messages/``:
    the library's checks and budgets, then a stored copy of every message that went out."""

    async def delivered(self, direct: protocol.Direct, delivery: Delivery) -> None:
        await store_copy(direct.to, self.sender.pk, direct.message)


class InboxMixin:
    """Joins the presence group, and sends direct messages through :class:`InboxMessages`."""

    groups = [PRESENCE_GROUP]
    messages_class = InboxMessages
    #: A frame's handler reaches the database only on the registry's native connections or
    #: through ``database_sync_to_async``: Channels' ``close_old_connections`` hop is not needed.
    socket_only_events = RegistryConsumer.socket_only_events | {"websocket.receive"}

    async def connect(self) -> None:
        broadcast_presence.attach()
        await super().connect()

    async def demo_presence(self, event) -> None:
        if self.user_id is not None:  # a refused socket is closing
            await self.send_json(event)


class InboxConsumer(InboxMixin, RegistryConsumer):
    """``/ws/registry/``: the explicit registry (mapping strategy)."""


class InboxGroupConsumer(InboxMixin, GroupConsumer):
    """``/ws/groups/``: per-user groups. Not in the registry, so not in the online list."""
