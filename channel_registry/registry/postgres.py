"""PostgreSQL fast path: the registry's hot statements over native async connections.

Django's async ORM runs every query through one shared worker thread: ~0.6 ms
per lookup here, all of a process's lookups in single file, and a connect or
disconnect costs a transaction of three round trips on top (~1.3 ms each). With
psycopg 3 the registry talks to PostgreSQL directly from the event loop instead:
a lookup is one round trip (~0.12 ms), and registering or unregistering is one
pipelined transaction. :class:`PostgresStore` is the row store with those
paths replaced; the ORM store stays the reference implementation for every
other database, for synchronous callers (who keep their own connection and so
see their own transaction) and for housekeeping.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from contextvars import ContextVar

from django.contrib.auth import get_user_model
from django.db import DatabaseError, IntegrityError, OperationalError, connections
from django.utils import timezone

from ..conf import registry_settings
from ..exceptions import ConnectionLimitExceeded
from ..models import UserChannel, active_field, stale_cutoff
from ..signals import user_offline, user_online
from .store import OrmStore, Registration, announce, limit_outcome, live_by_user, live_names, recipient_names

try:
    import psycopg
except ImportError:  # pragma: no cover - the ORM path serves every other setup
    psycopg = None

#: Native connections per process and event loop.
POOL_SIZE = 8

#: Registry rows describe live sockets: a database crash that loses the last
#: few hundred milliseconds of connects costs nothing, because each process's
#: heartbeat re-inserts its missing rows. Not waiting for the WAL flush halves a connect.
ASYNC_COMMIT = "SET LOCAL synchronous_commit TO OFF"

#: Set by the sync wrappers: their caller may hold a transaction these connections would not see.
sync_caller: ContextVar[bool] = ContextVar("channel_registry_sync_caller", default=False)


def enabled() -> bool:
    """Whether the running code may use the native connections."""
    return (
        psycopg is not None
        and registry_settings().NATIVE_POSTGRES
        and not sync_caller.get()
        and connections[UserChannel.objects.db].vendor == "postgresql"
    )


def active_users_condition(quote: Callable[[str], str]) -> str | None:
    """``models.active_users()`` as a condition on the user table ``u``; ``None`` where only the
    ORM can say it: a default manager that filters users, or ``is_active`` on a parent table."""
    model, field = get_user_model(), active_field()
    if model._default_manager.all().query.where:
        return None
    if field is None:
        return ""
    if field.model._meta.db_table != model._meta.db_table:
        return None
    return f" AND u.{quote(field.column)} = TRUE"


class Statements:
    """The registry's statements, named from the models' metadata (swappable user model, custom tables)."""

    def __init__(self) -> None:
        quote = connections[UserChannel.objects.db].ops.quote_name
        user_meta = get_user_model()._meta
        table = quote(UserChannel._meta.db_table)
        user_id = quote(UserChannel._meta.get_field("user").column)
        # The same row lock as the ORM path: connects, disconnects and prunes of one user take turns.
        self.user_rows = f"SELECT {user_id}, channel_name, last_seen FROM {table} WHERE {user_id} = ANY(%s)"
        users, pk = quote(user_meta.db_table), quote(user_meta.pk.column)
        self.lock_user = f"SELECT 1 FROM {users} WHERE {pk} = %s FOR UPDATE"
        # A direct message's recipient check and channel lookup: the user LEFT JOIN their rows.
        active = active_users_condition(quote)
        self.recipient_rows = None if active is None else (
            f"SELECT c.channel_name, c.last_seen FROM {users} u LEFT JOIN {table} c ON c.{user_id} = u.{pk} "
            f"WHERE u.{pk} = %s{active}"
        )
        columns = f"{user_id}, channel_name, server, session, transport, connected_at, last_seen"
        # A CTE's SELECT sees the table as it was before the CTE's own INSERT/DELETE:
        # "does the user have any other row" — asked after the lock, so it is exact.
        self.insert = (
            f"WITH added AS (INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING 1) "
            f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {user_id} = %s)"
        )
        # With a connection limit: insert only if the policy keeps the newcomer
        # (close_oldest, or fewer live rows than the limit), and return the
        # user's rows so the oldest live ones can be evicted.
        self.insert_limited = (
            f"WITH mine AS (SELECT channel_name, connected_at, last_seen FROM {table} WHERE {user_id} = %s), "
            f"added AS (INSERT INTO {table} ({columns}) SELECT %s, %s, %s, %s, %s, %s, %s "
            f"WHERE %s OR (SELECT count(*) FROM mine WHERE last_seen >= %s) < %s RETURNING 1) "
            f"SELECT EXISTS (SELECT 1 FROM mine), EXISTS (SELECT 1 FROM added), "
            f"ARRAY(SELECT channel_name FROM mine ORDER BY connected_at), "
            f"ARRAY(SELECT last_seen FROM mine ORDER BY connected_at)"
        )
        self.delete = (
            f"WITH gone AS (DELETE FROM {table} WHERE channel_name = %s AND {user_id} = %s RETURNING 1) "
            f"SELECT EXISTS (SELECT 1 FROM gone), EXISTS (SELECT 1 FROM {table} "
            f"WHERE {user_id} = %s AND channel_name <> %s)"
        )


class NativePool:
    """At most ``POOL_SIZE`` autocommit psycopg ``AsyncConnection``s per event loop."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._statements: Statements | None = None

    @property
    def statements(self) -> Statements:
        if self._statements is None:
            self._statements = Statements()
        return self._statements

    async def fetch_all(self, sql: str, params) -> list[tuple]:
        async def run(conn):
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall()

        return await self.run(run)

    async def locked_row(self, user_id, sql: str, params) -> tuple:
        """Lock the user's row, run ``sql`` and commit: one transaction, one round trip.

        The four statements travel as one simple query (client-side binding,
        psycopg quotes every parameter), so a connect costs one round trip
        instead of four.
        """

        async def run(conn):
            cursor = psycopg.AsyncClientCursor(conn)
            script = f"BEGIN; {ASYNC_COMMIT}; {self.statements.lock_user}; {sql}; COMMIT"
            await cursor.execute(script, [user_id, *params])
            for _ in range(3):  # past the results of BEGIN, SET and the lock
                cursor.nextset()
            return await cursor.fetchone()

        return await self.run(run)

    async def run(self, work):
        idle, slots = await self._for_running_loop()
        async with slots:
            if idle:
                try:
                    return await self._use(idle, idle.pop(), work)
                except OperationalError:
                    # An idle connection outlived a database restart; a fresh one
                    # decides. Safe to repeat: the failed attempt committed nothing.
                    pass
            return await self._use(idle, await self._connect(), work)

    async def _use(self, idle: list, conn, work):
        try:
            result = await work(conn)
        except BaseException as error:
            # Never reuse a connection in an unknown state. A cancelled task
            # (a socket closing mid-connect) may have left a transaction open
            # that holds the user's row lock: closing ends it at once
            # (close() does not yield, so it runs even while cancelled).
            await conn.close()
            if isinstance(error, psycopg.Error):
                raise _django_error(error) from error
            raise
        idle.append(conn)
        return result

    async def close_idle(self) -> None:
        """Close the running loop's idle connections: the next statement connects with the current settings."""
        idle, _ = await self._for_running_loop()
        while idle:
            await idle.pop().close()

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
        django_connection = connections[UserChannel.objects.db]
        params = django_connection.get_connection_params()
        params.pop("cursor_factory", None)  # Django's sync cursor classes
        try:
            conn = await psycopg.AsyncConnection.connect(autocommit=True, **params)
            # Django's timestamp loaders assume the session time zone Django sets on
            # its own connections; on a server in another zone every row would read
            # as stale (or never stale) without this.
            await conn.execute("SELECT set_config('TimeZone', %s, false)", [django_connection.timezone_name])
            return conn
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
    """Callers handle Django's exceptions (the consumer closes with 4503 or answers ``unavailable``)."""
    if isinstance(error, psycopg.IntegrityError):
        return IntegrityError(str(error))
    if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        return OperationalError(str(error))
    return DatabaseError(str(error))


pool = NativePool()


class PostgresStore(OrmStore):
    """The row store with connect, disconnect and lookup on native connections."""

    async def add(self, channel_name: str, registration: Registration) -> list[str]:
        options = registry_settings()
        user_id = registration.user_id
        now = timezone.now()
        row = [user_id, channel_name, registration.server, registration.session, registration.transport, now, now]
        if options.MAX_CONNECTIONS_PER_USER is None:
            (had_rows,) = await pool.locked_row(user_id, pool.statements.insert, [*row, user_id])
            evicted = []
        else:
            cutoff = stale_cutoff()
            keep_newest = options.ON_LIMIT == "close_oldest"
            params = [user_id, *row, keep_newest, cutoff, options.MAX_CONNECTIONS_PER_USER]
            had_rows, inserted, names, seen = await pool.locked_row(user_id, pool.statements.insert_limited, params)
            if not inserted:
                raise ConnectionLimitExceeded(f"user {user_id} is at its connection limit")
            evicted = limit_outcome(user_id, live_names(zip(names, seen, strict=True), cutoff))
        if not had_rows:
            await announce(user_online, [user_id])
        return evicted

    async def remove(self, user_id, channel_name: str) -> None:
        params = [channel_name, user_id, user_id, channel_name]
        deleted, has_others = await pool.locked_row(user_id, pool.statements.delete, params)
        if deleted and not has_others:
            await announce(user_offline, [user_id])

    async def live_channels(self, user_ids) -> dict:
        """One prepared-shape query, one array parameter."""
        return live_by_user(await pool.fetch_all(pool.statements.user_rows, [list(user_ids)]))

    async def recipient_channels(self, user_id) -> list[str] | None:
        if pool.statements.recipient_rows is None:
            return await super().recipient_channels(user_id)
        return recipient_names(await pool.fetch_all(pool.statements.recipient_rows, [user_id]))


native = PostgresStore()
