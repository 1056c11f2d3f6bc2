from channel_registry import asend_to_user
from channel_registry.consumers import RegistryConsumer
from channel_registry.protocol import with_position


class AlertsConsumer(RegistryConsumer):
    """Every tab of the page connects here: notifications, direct messages, and "mark all read"."""

    # A frame of our own next to the protocol's "direct" and "ping".
    frame_types = {**RegistryConsumer.frame_types, "mark_read": "receive_mark_read"}
    # Its handler only writes to the socket: Channels may skip its database clean-up before it.
    socket_only_events = RegistryConsumer.socket_only_events | {"alerts.read"}

    async def receive_mark_read(self, payload):
        # Every tab of this user, on every server process, this one included.
        delivery = await asend_to_user(self.scope["user"], {"type": "alerts.read"})
        return {"type": "marked", "tabs_reached": delivery.sent}

    async def alerts_read(self, event):
        # with_position: the frame carries its place in the user's history, so a tab
        # that was reconnecting gets it too, once.
        await self.send_json(with_position({"type": "read"}, event))
