"""Reading live channel names: the one query on the dispatcher's hot path.

Django's async ORM runs every query through one shared worker thread, which
costs ~0.6 ms per lookup here and serialises all of a process's lookups. On
PostgreSQL with psycopg 3 the registry reads instead over a few native async
connections of its own (~0.12 ms, never blocking the event loop), compiling the
same ORM query. Synchronous callers (``send_to_user`` from a view or a task)
keep the ORM and their own connection, so they see their own transaction.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Collection
from contextvars import ContextVar

from channels.db import database_sync_to_async
from django.db import DatabaseError, OperationalError, connections

from .conf import registry_settings
from .models import UserChannel

try:
    import psycopg
except ImportError:  # pragma: no cover - the ORM path serves every other setup
    psycopg = None

#: Native connections per process and event loop.
POOL_SIZE = 8

#: Set by the sync wrappers: their caller may hold a transaction the native connections would not see.
sync_caller: ContextVar[bool] = ContextVar("channel_registry_sync_caller", default=False)


def live_names_query(user_ids: Collection):
    return UserChannel.objects.live().filter(user_id__in=user_ids).channel_names()


def orm_live_channel_names(user_ids: Collection) -> list[str]:
    return list(live_names_query(user_ids))


class NativePool:
    """At most ``POOL_SIZE`` autocommit psycopg ``AsyncConnection``s per event loop."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def fetch_column(self, sql: str, params) -> list:
        idle, slots = await self._for_running_loop()
        async with slots:
            conn = idle.pop() if idle else await self._connect()
            try:
                cursor = await conn.execute(sql, params)
                rows = await cursor.fetchall()
            except psycopg.Error as error:
                await conn.close()  # never reuse a connection in an unknown state
                raise _django_error(error) from error
            idle.append(conn)
        return [row[0] for row in rows]

    async def _for_running_loop(self) -> tuple[list, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if loop not in self._loops:
            idle: list = []
            guard = _close_on_loop_shutdown(idle)
            await anext(guard)
            self._loops[loop] = (idle, asyncio.Semaphore(POOL_SIZE), guard)
        idle, slots, _ = self._loops[loop]
        return idle, slots

    async def _connect(self):
        params = connections[UserChannel.objects.db].get_connection_params()
        params.pop("cursor_factory", None)  # Django's sync cursor classes
        try:
            return await psycopg.AsyncConnection.connect(autocommit=True, **params)
        except psycopg.Error as error:
            raise _django_error(error) from error


async def _close_on_loop_shutdown(idle: list):
    """An async generator parked at its ``yield`` for the loop's lifetime.

    ``asyncio.run()`` and ``asyncio.Runner`` finalise pending async generators
    before closing a loop, which runs this ``finally``: a short-lived loop (a
    test, ``async_to_sync``) leaves no open connection behind — an open one
    would, for instance, keep Django from dropping a test database.
    """
    try:
        yield
    finally:
        while idle:
            await idle.pop().close()


def _django_error(error) -> DatabaseError:
    """Callers handle Django's exceptions (the consumer answers ``unavailable``)."""
    kind = OperationalError if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) else DatabaseError
    return kind(str(error))


native_pool = NativePool()


def _native_reads() -> bool:
    return (
        psycopg is not None
        and registry_settings().ASYNC_READS
        and not sync_caller.get()
        and connections[UserChannel.objects.db].vendor == "postgresql"
    )


async def live_channel_names(user_ids: Collection) -> list[str]:
    """Channel names of every live connection of ``user_ids``, in one query."""
    if not _native_reads():
        return await database_sync_to_async(orm_live_channel_names)(user_ids)
    sql, params = live_names_query(user_ids).query.sql_with_params()
    return await native_pool.fetch_column(sql, params)
