"""The mapping strategy: a ``UserChannel`` row per connection, and this process's share.

Each server process keeps the channel names it serves in memory. One heartbeat
task per process refreshes ``last_seen`` for all of them with a single UPDATE,
so liveness costs one statement per interval however many sockets are open.
Rows of a process that died stop being refreshed, turn stale after
``STALE_AFTER`` and are skipped by dispatch until ``prune_channels`` deletes them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import secrets
import socket
from collections.abc import Collection

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.db import DatabaseError, transaction
from django.utils import timezone

from . import postgres
from .cleanup import prune_dead_servers
from .conf import registry_settings
from .delivery import send_many
from .exceptions import ConnectionLimitExceeded
from .models import UserChannel, stale_cutoff
from .protocol import CLOSE_TOO_MANY, DISCONNECT_EVENT
from .signals import send_presence, user_offline, user_online
from .strategy import Delivery, DeliveryStrategy, channel_layer

logger = logging.getLogger(__name__)


class ProcessChannels:
    """The connections this server process serves, keyed by channel name.

    The server id changes after a fork, so workers forked from one parent never
    share (and never delete) each other's rows.
    """

    def __init__(self) -> None:
        self._pid = None
        self._server = ""
        self._users: dict[str, object] = {}
        self._orphans: dict[str, object] = {}

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._server = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"[-100:]
            self._users = {}
            self._orphans = {}

    @property
    def server(self) -> str:
        self._check_fork()
        return self._server

    @property
    def started(self) -> bool:
        """Whether this process (not a parent it was forked from) has served a connection."""
        return self._pid == os.getpid()

    @property
    def users(self) -> dict[str, object]:
        self._check_fork()
        return self._users

    @property
    def orphans(self) -> dict[str, object]:
        """Closed connections whose DELETE failed (database down); the heartbeat retries them."""
        self._check_fork()
        return self._orphans


process = ProcessChannels()


def _lock_user(user_id) -> None:
    """Lock the user's row until the transaction ends.

    The lock serialises connect, disconnect and prune of one user, so the
    presence signals fire exactly once per transition even when two tabs
    connect or close at the same moment. Rows are counted in a later statement:
    one in the same statement would see the table as it was before the lock
    was granted, missing a row another tab committed meanwhile.
    """
    list(get_user_model().objects.select_for_update().filter(pk=user_id).values_list("pk"))


def _over_limit(user_id) -> list[str]:
    """Live channels to close so one more connection fits, oldest first.

    Raises ``ConnectionLimitExceeded`` when the policy refuses the newcomer.
    Counted from the registry, so the limit holds across every server process.
    """
    options = registry_settings()
    if options.MAX_CONNECTIONS_PER_USER is None:
        return []
    live = list(UserChannel.objects.live().for_user(user_id).order_by("connected_at").channel_names())
    excess = len(live) + 1 - options.MAX_CONNECTIONS_PER_USER
    if excess <= 0:
        return []
    if options.ON_LIMIT != "close_oldest":
        raise ConnectionLimitExceeded(f"user {user_id} already has {len(live)} live connections")
    return live[:excess]


def insert_row(user_id, channel_name: str) -> tuple[bool, list[str]]:
    """Record the connection: (whether it is the user's first, channels the limit evicts)."""
    with transaction.atomic():
        _lock_user(user_id)
        had_rows = UserChannel.objects.for_user(user_id).exists()
        evicted = _over_limit(user_id)
        UserChannel.objects.create(user_id=user_id, channel_name=channel_name, server=process.server)
    return not had_rows, evicted


def delete_row(user_id, channel_name: str) -> bool:
    """Forget the connection; whether it was the user's last one."""
    with transaction.atomic():
        _lock_user(user_id)
        deleted, _ = UserChannel.objects.filter(channel_name=channel_name).delete()
        has_others = UserChannel.objects.for_user(user_id).exists()
    return bool(deleted) and not has_others


def _live(rows) -> list[str]:
    """Channel names of the rows seen within ``STALE_AFTER``.

    Filtered here rather than in SQL: heartbeats keep moving ``last_seen`` past
    the planner's statistics, and a ``last_seen >= cutoff`` condition then
    tempts PostgreSQL into scanning the ``last_seen`` index over every live row
    (3 ms instead of 0.06 ms at 50,000 rows). Stale rows are few; reading them costs nothing.
    """
    cutoff = stale_cutoff()
    return [name for name, last_seen in rows if last_seen >= cutoff]


def orm_rows(user_ids: Collection) -> list[tuple]:
    return list(UserChannel.objects.for_users(user_ids).order_by().values_list("channel_name", "last_seen"))


async def live_channel_names(user_ids: Collection) -> list[str]:
    if postgres.enabled():
        return _live(await postgres.user_rows(user_ids))
    return _live(await database_sync_to_async(orm_rows)(user_ids))


async def announce(signal, user_id) -> None:
    """Send a presence signal from a sync context, as documented; skip the thread hop if nobody listens."""
    if signal.has_listeners(UserChannel):
        await database_sync_to_async(send_presence)(signal, user_id)


def beat() -> int:
    """Refresh every row of this process in one UPDATE; restore rows pruned meanwhile.

    Rows of connections that closed while the database was down go first, so
    the UPDATE below does not keep them alive. A process stalled past
    ``STALE_AFTER`` (a long GC pause, a suspended VM) may find its rows pruned
    while its sockets are still open: they are inserted again so those
    connections become reachable again.
    """
    for channel_name, user_id in list(process.orphans.items()):
        if delete_row(user_id, channel_name):
            send_presence(user_offline, user_id)
        del process.orphans[channel_name]
    users = dict(process.users)
    refreshed = UserChannel.objects.filter(server=process.server).update(last_seen=timezone.now())
    if refreshed < len(users):
        UserChannel.objects.bulk_create(
            [UserChannel(user_id=u, channel_name=c, server=process.server) for c, u in users.items()],
            ignore_conflicts=True,
        )
    return refreshed


def forget_process() -> int:
    """Delete this process's rows; called at interpreter exit (daphne's SIGTERM/SIGINT).

    daphne cancels consumers on shutdown, so their ``disconnect()`` never runs,
    and an unregister cut short by the cancellation has already left
    ``process.users``: every row carrying this process's server id goes.
    """
    if not process.started:
        return 0
    try:
        deleted, _ = UserChannel.objects.filter(server=process.server).delete()
    except DatabaseError:
        logger.warning("channel_registry: could not delete this process's rows at exit", exc_info=True)
        return 0
    process.users.clear()
    return deleted


class Heartbeat:
    """The one periodic task per process and event loop."""

    def __init__(self) -> None:
        self._task: asyncio.Task | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done() or self._task.get_loop() is not asyncio.get_running_loop():
            # A context of its own: not the one of the request or consumer that happened to start it.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="channel_registry heartbeat", context=contextvars.Context()
            )

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(registry_settings().HEARTBEAT_INTERVAL)
            try:
                await database_sync_to_async(beat)()
            except DatabaseError:
                logger.warning("channel_registry heartbeat failed; retrying next interval", exc_info=True)


heartbeat = Heartbeat()


class MappingStrategy(DeliveryStrategy):
    """Explicit mapping: one row per connection, ``send`` to each live channel."""

    async def register(self, user_id, channel_name: str) -> None:
        # The connection limit needs a count under the lock: only the ORM path does that.
        if postgres.enabled() and registry_settings().MAX_CONNECTIONS_PER_USER is None:
            first, evicted = await postgres.insert_row(user_id, channel_name, process.server), []
        else:
            first, evicted = await database_sync_to_async(insert_row)(user_id, channel_name)
        process.users[channel_name] = user_id
        heartbeat.ensure_running()
        if first:
            await announce(user_online, user_id)
        if evicted:
            await self.send(evicted, {"type": DISCONNECT_EVENT, "code": CLOSE_TOO_MANY})

    async def unregister(self, user_id, channel_name: str) -> None:
        if process.users.pop(channel_name, None) is None:
            return
        try:
            if postgres.enabled():
                last = await postgres.delete_row(user_id, channel_name)
            else:
                last = await database_sync_to_async(delete_row)(user_id, channel_name)
        except DatabaseError:
            process.orphans[channel_name] = user_id
            raise
        finally:
            if not process.users and not process.orphans:
                heartbeat.stop()
        if last:
            await announce(user_offline, user_id)

    async def deliver(self, user_ids: Collection, event: dict) -> Delivery:
        names = await live_channel_names(user_ids)
        if not names:
            return Delivery(channels=0, sent=0, failed=[])
        failed = await self.send(names, event)
        if failed:
            await database_sync_to_async(prune_dead_servers)(failed)
        return Delivery(channels=len(names), sent=len(names) - len(failed), failed=failed)

    async def send(self, names: list[str], event: dict) -> list[str]:
        return await send_many(channel_layer(), names, event, concurrency=registry_settings().SEND_CONCURRENCY)
