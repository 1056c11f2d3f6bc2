"""This server process's share of the registry: its open connections, the heartbeat, exit clean-up.

Each process keeps the channel names it serves in memory. One heartbeat task
per process refreshes ``last_seen`` for all of its rows with a single UPDATE,
so liveness costs one statement per interval however many sockets are open.
Rows of a process that died stop being refreshed, turn stale after
``STALE_AFTER`` and are skipped by dispatch until ``prune_channels`` deletes them.

The same task checks every open connection's access again (``sessions.ended``):
a connection whose user or session ended by any path is closed within two intervals.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import secrets
import socket
import time

from channels.db import database_sync_to_async
from django.db import DatabaseError, connections

from .. import metrics
from ..conf import registry_settings
from ..delivery.fanout import send_batches
from ..delivery.strategy import channel_layer
from ..exceptions import ChannelLayerUnavailable
from ..models import Transport, UserChannel
from ..protocol import DISCONNECT_EVENT
from .sessions import Access, ended
from .store import Registration, orm

logger = logging.getLogger(__name__)


class ProcessChannels:
    """The connections this server process serves.

    ``open``: registered connections, by channel name. ``closing``: channels
    whose row may still exist although their connection is gone (a DELETE that
    failed or was cancelled, an INSERT cut short); the heartbeat deletes them.
    ``watched``: the access of every open connection, of either strategy and of
    event streams; the heartbeat checks it again.

    The server id changes after a fork, so workers forked from one parent never
    share (and never delete) each other's rows.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._server = ""
        self._open: dict[str, Registration] = {}
        self._closing: dict[str, object] = {}
        self._watched: dict[str, Access] = {}
        #: The database the rows were written to (a test run may have dropped it by exit time).
        self.database: object = None

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._server = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"[-100:]
            self._open = {}
            self._closing = {}
            self._watched = {}
            self.database = None

    @property
    def server(self) -> str:
        self._check_fork()
        return self._server

    @property
    def open(self) -> dict[str, Registration]:
        self._check_fork()
        return self._open

    @property
    def closing(self) -> dict[str, object]:
        self._check_fork()
        return self._closing

    @property
    def watched(self) -> dict[str, Access]:
        self._check_fork()
        return self._watched

    @property
    def idle(self) -> bool:
        """Nothing to refresh, delete or check: no connection is open, no row of this process should exist."""
        return not self.open and not self.closing and not self.watched

    def registration(self, user_id, session: str, transport: str = Transport.SOCKET) -> Registration:
        server = self.server  # first: a fork resets what follows
        self.database = connections.settings[UserChannel.objects.db]["NAME"]
        return Registration(user_id=user_id, server=server, session=session, transport=transport)


process = ProcessChannels()


def beat() -> int:
    """Delete the rows of closed connections, refresh the open ones, restore pruned ones.

    The closing rows go first, so the UPDATE does not keep them alive. A process
    stalled past ``STALE_AFTER`` (a long GC pause, a suspended VM) may find rows
    of its open sockets pruned: the store inserts them again, but only for
    connections still open when it holds the user's lock, so a tab that closed
    during the beat never comes back. Returns the number of rows refreshed.
    """
    for channel_name, user_id in list(process.closing.items()):
        orm.remove_sync(user_id, channel_name)
        process.closing.pop(channel_name, None)
    open_channels = dict(process.open)
    refreshed = orm.refresh(process.server)
    if refreshed < len(open_channels):
        orm.restore(open_channels, still_open=process.open.__contains__)
    return refreshed


def forget_process() -> int:
    """Delete this process's rows; called at interpreter exit (daphne's SIGTERM/SIGINT).

    daphne cancels consumers on shutdown, so their ``disconnect()`` may never
    run: every row carrying this process's server id goes, with ``user_offline``
    for the users left without one — whatever the process believes it still
    has open, since a DELETE cut short may have left a row it no longer tracks.
    """
    if process.database is None:
        return 0  # this process never registered a connection
    if connections.settings[UserChannel.objects.db]["NAME"] != process.database:
        return 0  # a test database, dropped by the test runner before exit
    try:
        deleted = orm.delete(UserChannel.objects.filter(server=process.server))
    except DatabaseError as error:
        logger.warning("channel_registry: could not delete this process's rows at exit (%s)", error)
        return 0
    process.open.clear()
    process.closing.clear()
    return deleted


async def watch(channel_name: str, access: Access) -> int | None:
    """Check the access of a connection that just registered, and keep checking it on every beat.

    Returns the close code if its access has already ended. Watched before the
    check, so a change the check misses is seen by the next beat.
    """
    process.watched[channel_name] = access
    heartbeat.ensure_running()
    try:
        return (await database_sync_to_async(ended)({channel_name: access})).get(channel_name)
    except Exception as error:  # a session cache backend's errors too: the beat checks again
        logger.warning("channel_registry: could not check %s now (%s); the heartbeat will", channel_name, error)
        return None


def unwatch(channel_name: str) -> None:
    process.watched.pop(channel_name, None)
    heartbeat.stop_if_idle()


async def revalidate() -> dict[str, int]:
    """Close, through the channel layer, every watched connection whose access ended; their codes.

    A connection stays watched until it unregisters: one whose close could not
    be sent (Redis down) is closed by a later beat.
    """
    try:
        codes = await database_sync_to_async(ended)(dict(process.watched))
    except Exception:  # the database's, or a session cache backend's: the heartbeat must keep beating
        logger.warning("channel_registry: could not check open connections; retrying next interval", exc_info=True)
        return {}
    by_code: dict[int, list[str]] = {}
    for channel_name, code in codes.items():
        by_code.setdefault(code, []).append(channel_name)
    if not by_code:
        return {}
    batches = [({"type": DISCONNECT_EVENT, "code": code}, names) for code, names in by_code.items()]
    try:
        await send_batches(channel_layer(), batches, concurrency=registry_settings().SEND_CONCURRENCY)
    except ChannelLayerUnavailable:
        logger.warning("channel_registry: could not close %d connection(s) whose access ended", len(codes))
    return codes


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

    def stop_if_idle(self) -> None:
        if process.idle:
            self.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(registry_settings().HEARTBEAT_INTERVAL)
            started, failed = time.perf_counter(), False
            try:
                await database_sync_to_async(beat)()
            except DatabaseError:
                failed = True
                logger.warning("channel_registry heartbeat failed; retrying next interval", exc_info=True)
            metrics.heartbeat(time.perf_counter() - started, failed)
            await revalidate()
            self.stop_if_idle()


heartbeat = Heartbeat()
