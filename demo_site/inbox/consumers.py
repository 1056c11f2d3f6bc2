"""The demo's consumers: the library's two, plus live presence and stored messages."""

from channel_registry import protocol
from channel_registry.consumers import GroupConsumer, RegistryConsumer
from channel_registry.messaging import DirectMessages
from channel_registry.strategy import Delivery

from .models import Notification
from .presence import PRESENCE_GROUP, broadcast_presence


class InboxMessages(DirectMessages):
    """The one path of "a user sends a direct message" in the demo, socket or ``POST /messages/``:
    the library's checks and budgets, then a stored copy of every message that went out."""

    async def delivered(self, direct: protocol.Direct, delivery: Delivery) -> None:
        await Notification.objects.acreate(recipient_id=direct.to, sender_id=self.sender.pk, message=direct.message)


class InboxMixin:
    """Joins the presence group, and sends direct messages through :class:`InboxMessages`."""

    groups = [PRESENCE_GROUP]
    messages_class = InboxMessages

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
