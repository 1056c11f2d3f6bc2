"""The demo's consumers: the library's two, plus live presence and stored messages."""

from channel_registry import protocol
from channel_registry.consumers import GroupConsumer, RegistryConsumer

from .models import Notification
from .presence import PRESENCE_GROUP, broadcast_presence


async def store_direct(sender_id, direct: protocol.Direct) -> None:
    await Notification.objects.acreate(recipient_id=direct.to, sender_id=sender_id, message=direct.message)


class InboxMixin:
    """Joins the presence group, and keeps a copy of every direct message sent."""

    groups = [PRESENCE_GROUP]

    async def connect(self) -> None:
        broadcast_presence.attach()
        await super().connect()

    async def demo_presence(self, event) -> None:
        if self.user_id is not None:  # a refused socket is closing
            await self.send_json(event)

    async def receive_direct(self, payload: dict) -> dict:
        ack = await super().receive_direct(payload)  # raises when refused: nothing stored
        await store_direct(self.user_id, protocol.parse_direct(payload))
        return ack


class InboxConsumer(InboxMixin, RegistryConsumer):
    """``/ws/registry/``: the explicit registry (mapping strategy)."""


class InboxGroupConsumer(InboxMixin, GroupConsumer):
    """``/ws/groups/``: per-user groups. Not in the registry, so not in the online list."""
