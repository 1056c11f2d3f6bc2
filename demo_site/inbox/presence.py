"""Live "who is online" for every open inbox, from the registry's presence signals."""

import asyncio
import contextvars
import logging

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model

from channel_registry import online_user_ids

logger = logging.getLogger(__name__)

#: Every demo connection (both consumers and the event stream) joins this group.
PRESENCE_GROUP = "demo.presence"
PRESENCE_EVENT = "demo.presence"
#: Presence changes within this many seconds of a broadcast share the next one: a user
#: opening and closing sockets in a loop costs every inbox at most two frames a second
#: per server process, each carrying the latest list, instead of a query and a frame per change.
COALESCE_SECONDS = 0.5


def online_people() -> list[dict]:
    """Users with a live registry connection (mapping sockets and event streams)."""
    users = get_user_model().objects.filter(pk__in=online_user_ids()).order_by("username")
    return list(users.values("id", "username"))


async def send_presence() -> None:
    """Send the current online list to every inbox; best effort, failures are logged."""
    try:
        online = await sync_to_async(online_people)()
        await get_channel_layer().group_send(PRESENCE_GROUP, {"type": PRESENCE_EVENT, "online": online})
    except Exception:
        logger.exception("demo: could not broadcast presence")


class PresenceBroadcast:
    """Receiver of ``user_online`` and ``user_offline``: schedule :func:`send_presence`.

    The signals come from the registry's database thread. Waiting there for the
    event loop (``async_to_sync``) can hang daphne's shutdown: a consumer
    cancelled while it unregisters lets the loop stop with its thread still in
    the receiver, which then waits forever, and the interpreter waits for the
    thread. So the receiver only schedules the broadcast on the loop that serves
    the connections, and never blocks on it.

    Broadcasts are coalesced: one runs at once, then changes that arrive while
    it runs or during the next ``COALESCE_SECONDS`` are sent together once.
    """

    def __init__(self) -> None:
        self.loop = None
        self.task = None
        self.dirty = False

    def attach(self) -> None:
        """Called by every demo connection, from the loop that serves it, before it registers."""
        self.loop = asyncio.get_running_loop()

    def __call__(self, **kwargs) -> None:
        if self.loop is None:  # no connection served here: prune_channels, a shell
            async_to_sync(send_presence)()
            return
        try:
            # A fresh context: the database thread's one makes sync_to_async refuse to run.
            self.loop.call_soon_threadsafe(self.start, context=contextvars.Context())
        except RuntimeError:  # the loop is closed: this process is exiting
            pass

    def start(self) -> None:
        self.dirty = True
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.run())  # held here: the loop keeps only weak references

    async def run(self) -> None:
        while self.dirty:
            self.dirty = False
            await send_presence()
            await asyncio.sleep(COALESCE_SECONDS)


broadcast_presence = PresenceBroadcast()
