"""The yardsticks of ``make load``: the same direct messages without the library, as plain Channels does them.

Served by daphne as ``benchmarks.rivals:application`` with ``tests.fault_settings``
(``CRF_LAYER_BACKEND`` picks the channel layer). Each consumer speaks the load
clients' part of the demo's protocol, and nothing else: the socket signs in with
its session (Channels' ``AuthMiddlewareStack``, at the handshake only), a
``{"type": "direct", "to": <user id>, "id": ..., "message": ...}`` frame goes to
every socket of that user as ``{"type": "direct", "from": ..., "message": ...}``,
and the sender gets ``{"type": "ack", "id": ..., "delivered": <copies or null>}``.
No registry, budgets, history or stored copy: what is left is the floor of a
Channels application.

``/ws/plain/``  the user's channels in a dict of this process, sent through the
                channel layer (the in-memory one: ``CRF_LAYER_BACKEND=memory``).
``/ws/lean/``   the same without Channels' ``close_old_connections`` before each
                event: that hop through asgiref's sync thread is the rest of the cost.
``/ws/groups/`` a group per user (``group_add`` / ``group_send``), the way the
                Channels tutorial does it (the stock ``RedisChannelLayer``: ``stock``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.fault_settings")
django_application = get_asgi_application()

# Imported once Django is set up: they load models.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

DIRECT_EVENT = "direct.frame"


class PlainDirect(AsyncWebsocketConsumer):
    """Direct messages between signed-in users; subclasses say how a user's sockets are found."""

    async def connect(self) -> None:
        user = self.scope["user"]
        if not user.is_authenticated:
            await self.close(4401)
            return
        self.user_id = user.pk
        await self.join()
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        frame = json.loads(text_data or "")
        direct = json.dumps({"type": "direct", "from": self.user_id, "message": frame["message"]})
        copies = await self.deliver(frame["to"], {"type": DIRECT_EVENT, "text": direct})
        await self.send(json.dumps({"type": "ack", "id": frame["id"], "delivered": copies}))

    async def direct_frame(self, event: dict[str, Any]) -> None:
        await self.send(event["text"])

    async def join(self) -> None:
        raise NotImplementedError

    async def deliver(self, user_id: int, event: dict[str, Any]) -> int | None:
        """Send ``event`` to every socket of ``user_id``; how many copies, if known."""
        raise NotImplementedError


#: user id -> the channel names of that user's sockets on this process.
local_channels: defaultdict[int, set[str]] = defaultdict(set)


class InProcessDirect(PlainDirect):
    """The user's sockets in a dict of this process (one process: every socket is here)."""

    async def join(self) -> None:
        local_channels[self.user_id].add(self.channel_name)

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "user_id"):
            local_channels[self.user_id].discard(self.channel_name)

    async def deliver(self, user_id: int, event: dict[str, Any]) -> int | None:
        channels = local_channels.get(user_id, ())
        for channel in channels:
            await self.channel_layer.send(channel, event)
        return len(channels)


class LeanDirect(InProcessDirect):
    """Without the ``close_old_connections`` hop Channels makes before every event (no handler here uses the ORM)."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        await getattr(self, message["type"].replace(".", "_"))(message)


class GroupDirect(PlainDirect):
    """A group per user, as the Channels documentation suggests."""

    async def join(self) -> None:
        self.groups = [f"user.{self.user_id}"]
        await self.channel_layer.group_add(self.groups[0], self.channel_name)

    async def deliver(self, user_id: int, event: dict[str, Any]) -> int | None:
        await self.channel_layer.group_send(f"user.{user_id}", event)
        return None  # group_send does not say how many sockets it reached


application = ProtocolTypeRouter({
    "http": django_application,  # the login page answers: the harness's readiness check
    "websocket": AuthMiddlewareStack(URLRouter([
        path("ws/plain/", InProcessDirect.as_asgi()),
        path("ws/lean/", LeanDirect.as_asgi()),
        path("ws/groups/", GroupDirect.as_asgi()),
    ])),
})  # fmt: skip
