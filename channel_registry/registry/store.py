"""The row store: every change to ``UserChannel`` goes through here.

Connect, disconnect, limit eviction, prune, heartbeat restore, process exit and
dead-process purge all take the same lock (the user's row in the user table),
change rows, and learn inside that transaction whether the user's row count
went from 0 to 1 or from 1 to 0. The presence signals are sent from here, after
the commit, and from nowhere else: that is what makes them alternate per user
on every path.

:class:`OrmStore` is the reference implementation for every database.
:class:`channel_registry.registry.postgres.PostgresStore` replaces its hot, async paths
(connect, disconnect, lookup) with native connections on PostgreSQL; the
housekeeping paths are shared. ``tests/test_store.py`` runs one contract suite
over both.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from ..conf import registry_settings
from ..exceptions import ConnectionLimitExceeded
from ..models import Transport, UserChannel, active_users, stale_cutoff
from ..signals import send_presence, user_offline, user_online

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """One connection as a row records it."""

    user_id: object
    server: str
    #: ``session_digest()`` of the session that opened it, or "".
    session: str = ""
    transport: str = Transport.SOCKET

    def row(self, channel_name: str) -> UserChannel:
        return UserChannel(
            user_id=self.user_id,
            channel_name=channel_name,
            server=self.server,
            session=self.session,
            transport=self.transport,
        )


def lock_users(user_ids: Iterable) -> set:
    """Lock the users' rows until the transaction ends, in primary key order (no deadlock); those that exist.

    The lock serialises every change of one user's rows, so each 0↔1 transition
    is seen by exactly one transaction. Rows are counted in later statements: a
    count in the locking statement would see the table as it was before the lock
    was granted, missing a row another transaction committed meanwhile.
    """
    pks = sorted(set(user_ids))
    locked = get_user_model().objects.select_for_update().filter(pk__in=pks).order_by("pk")
    return set(locked.values_list("pk", flat=True))


def users_with_rows(user_ids: Collection) -> set:
    return set(UserChannel.objects.filter(user_id__in=user_ids).values_list("user_id", flat=True).distinct())


def recipient_names(rows: list[tuple[Any, Any]]) -> list[str] | None:
    """The live channel names of a recipient's LEFT JOIN rows; ``None`` when no user matched."""
    return None if not rows else live_names(row for row in rows if row[0] is not None)


def live_names(rows: Iterable[tuple[str, datetime]], cutoff: datetime | None = None) -> list[str]:
    """Channel names of the rows seen within ``STALE_AFTER``.

    Filtered here rather than in SQL: heartbeats keep moving ``last_seen`` past
    the planner's statistics, and a ``last_seen >= cutoff`` condition then
    tempts PostgreSQL into scanning the ``last_seen`` index over every live row
    (3 ms instead of 0.06 ms at 50,000 rows). Stale rows are few; reading them costs nothing.
    """
    cutoff = cutoff or stale_cutoff()
    return [name for name, last_seen in rows if last_seen >= cutoff]


def live_by_user(rows: Iterable[tuple[Any, str, datetime]]) -> dict[Any, list[str]]:
    """``live_names`` per user, for ``(user_id, channel_name, last_seen)`` rows; users with none left out."""
    by_user: dict[Any, list[tuple[str, datetime]]] = defaultdict(list)
    for user_id, name, last_seen in rows:
        by_user[user_id].append((name, last_seen))
    cutoff = stale_cutoff()
    return {user_id: names for user_id, user_rows in by_user.items() if (names := live_names(user_rows, cutoff))}


def limit_outcome(user_id, live: list[str]) -> list[str]:
    """Live channels (oldest first) to close so one more connection fits.

    Raises ``ConnectionLimitExceeded`` when the policy refuses the newcomer.
    Counted from the registry, so the limit holds across every server process.
    """
    options = registry_settings()
    excess = len(live) + 1 - (options.MAX_CONNECTIONS_PER_USER or 0)
    if options.MAX_CONNECTIONS_PER_USER is None or excess <= 0:
        return []
    if options.ON_LIMIT != "close_oldest":
        raise ConnectionLimitExceeded(f"user {user_id} already has {len(live)} live connections")
    return live[:excess]


async def announce(signal, user_ids: Iterable) -> None:
    """Send presence signals from a sync context, as documented; skip the thread hop if nobody listens."""
    user_ids = list(user_ids)
    if user_ids and signal.has_listeners(UserChannel):
        await database_sync_to_async(send_all)(signal, user_ids)


def send_all(signal, user_ids: Iterable) -> None:
    for user_id in user_ids:
        send_presence(signal, user_id)


class OrmStore:
    """The row store over Django's ORM; works on every database Django supports."""

    # ------------------------------------------------------------------ hot paths (async)

    async def add(self, channel_name: str, registration: Registration) -> list[str]:
        """Record a connection; returns the channels the connection limit evicts.

        Sends ``user_online`` if it is the user's first row. Raises
        ``ConnectionLimitExceeded`` (nothing written) when the limit refuses it,
        ``IntegrityError`` for a channel name that already has a row.
        """
        return await database_sync_to_async(self.add_sync)(channel_name, registration)

    async def remove(self, user_id, channel_name: str) -> None:
        """Delete the user's row for ``channel_name``, if it has one; ``user_offline`` if it was the last."""
        await database_sync_to_async(self.remove_sync)(user_id, channel_name)

    async def live_channels(self, user_ids: Collection) -> dict[Any, list[str]]:
        """Per user, the channel names of their rows that are not stale."""
        return live_by_user(await database_sync_to_async(self.rows_sync)(user_ids))

    async def recipient_channels(self, user_id: Any) -> list[str] | None:
        """The live channels of ``user_id`` if it is an active user, else ``None``: one query."""
        return await database_sync_to_async(self.recipient_channels_sync)(user_id)

    def add_sync(self, channel_name: str, registration: Registration) -> list[str]:
        user_id = registration.user_id
        with transaction.atomic():
            lock_users([user_id])
            mine = UserChannel.objects.for_user(user_id).order_by("connected_at")
            rows = list(mine.values_list("channel_name", "last_seen"))
            evicted = limit_outcome(user_id, live_names(rows))
            registration.row(channel_name).save(force_insert=True)
        if not rows:
            send_presence(user_online, user_id)
        return evicted

    def remove_sync(self, user_id, channel_name: str) -> None:
        with transaction.atomic():
            lock_users([user_id])
            deleted, _ = UserChannel.objects.filter(user_id=user_id, channel_name=channel_name).delete()
            last = bool(deleted) and not UserChannel.objects.for_user(user_id).exists()
        if last:
            send_presence(user_offline, user_id)

    def recipient_channels_sync(self, user_id: Any) -> list[str] | None:
        # The user LEFT JOIN their rows: one (None, None) row for an active user without any.
        rows = active_users().filter(pk=user_id).values_list("live_channels__channel_name", "live_channels__last_seen")
        return recipient_names(list(rows))

    def rows_sync(self, user_ids: Collection) -> list[tuple[Any, str, datetime]]:
        rows = UserChannel.objects.for_users(user_ids).order_by()
        return list(rows.values_list("user_id", "channel_name", "last_seen"))

    # ------------------------------------------------------------------ housekeeping (sync)

    def refresh(self, server: str) -> int:
        """Move ``last_seen`` of every row of ``server`` to now: one statement."""
        return UserChannel.objects.filter(server=server).update(last_seen=timezone.now())

    def restore(self, open_channels: dict[str, Registration], still_open: Callable[[str], bool]) -> int:
        """Insert rows for open connections that have none (a prune removed them); how many.

        ``still_open`` is asked again under the users' lock: a connection whose
        close began meanwhile has left the process's open set before its own
        DELETE waits for that lock, so it is never brought back. Only users that
        exist get rows: one deleted while its socket stayed open would fail the
        whole INSERT, every beat, for every connection (the access check closes it).
        """
        present = set(
            UserChannel.objects.filter(channel_name__in=list(open_channels)).values_list("channel_name", flat=True)
        )
        missing = {name: reg for name, reg in open_channels.items() if name not in present}
        if not missing:
            return 0
        user_ids = {reg.user_id for reg in missing.values()}
        with transaction.atomic():
            existing = lock_users(user_ids)
            had_rows = users_with_rows(user_ids)
            rows = [reg.row(name) for name, reg in missing.items() if reg.user_id in existing and still_open(name)]
            UserChannel.objects.bulk_create(rows, ignore_conflicts=True)
        send_all(user_online, sorted({row.user_id for row in rows} - had_rows, key=str))
        return len(rows)

    def delete(self, doomed: QuerySet) -> int:
        """Delete the rows of ``doomed`` in batches of ``PRUNE_BATCH_SIZE``; how many.

        Sends ``user_offline`` for every user left without a row. ``doomed`` is
        evaluated again by each DELETE, so a row it no longer matches (a
        heartbeat refreshed it meanwhile) survives.
        """
        size = registry_settings().PRUNE_BATCH_SIZE
        total = 0
        while True:
            seen, deleted, offline = self._delete_batch(doomed, size)
            total += deleted
            send_all(user_offline, offline)
            if seen < size:
                return total

    def _delete_batch(self, doomed: QuerySet, size: int) -> tuple[int, int, list]:
        """(rows seen, rows deleted, users now without rows) for one batch."""
        with transaction.atomic():
            rows = list(doomed.values_list("pk", "user_id")[:size])
            if not rows:
                return 0, 0, []
            lock_users({user_id for _, user_id in rows})
            # Read again under the lock: another transaction may have deleted some meanwhile,
            # and only users whose rows this one deletes may go offline here.
            victims = list(doomed.filter(pk__in=[pk for pk, _ in rows]).values_list("pk", "user_id"))
            deleted, _ = doomed.filter(pk__in=[pk for pk, _ in victims]).delete()
            user_ids = {user_id for _, user_id in victims}
            remaining = users_with_rows(user_ids)
        return len(rows), deleted, sorted(user_ids - remaining, key=str)


orm = OrmStore()
