"""Deleting rows that crashed or restarted server processes left behind.

Rows go in batches of ``PRUNE_BATCH_SIZE`` so a million stale rows never hold
long locks; each batch re-checks ``last_seen`` so a row refreshed by a heartbeat
between the SELECT and the DELETE survives.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.db import transaction

from .conf import registry_settings
from .models import UserChannel, stale_cutoff
from .signals import send_presence, user_offline


def count_stale(older_than: float | None = None) -> int:
    return UserChannel.objects.stale(older_than).count()


def _prune_batch(doomed, size: int) -> tuple[int, int, list]:
    """Delete up to ``size`` rows of ``doomed``: (rows seen, rows deleted, users now without rows).

    ``doomed`` is filtered again by the DELETE, so a row a heartbeat refreshed
    between the SELECT and the DELETE survives.
    """
    with transaction.atomic():
        rows = list(doomed.values_list("pk", "user_id")[:size])
        if not rows:
            return 0, 0, []
        user_ids = sorted({user_id for _, user_id in rows})
        # Same lock as connect/disconnect, in pk order: presence signals stay exact.
        list(get_user_model().objects.select_for_update().filter(pk__in=user_ids).order_by("pk").values_list("pk"))
        deleted, _ = doomed.filter(pk__in=[pk for pk, _ in rows]).delete()
        still_connected = set(UserChannel.objects.filter(user_id__in=user_ids).values_list("user_id", flat=True))
    return len(rows), deleted, [u for u in user_ids if u not in still_connected]


def _prune(doomed) -> int:
    size = registry_settings().PRUNE_BATCH_SIZE
    total = 0
    while True:
        seen, deleted, offline = _prune_batch(doomed, size)
        total += deleted
        for user_id in offline:
            send_presence(user_offline, user_id)
        if seen < size:
            return total


def prune_stale(older_than: float | None = None) -> int:
    """Delete rows not refreshed for ``older_than`` seconds (default ``STALE_AFTER``).

    Returns the number of rows deleted and sends ``user_offline`` for every user
    left without any row.
    """
    return _prune(UserChannel.objects.stale(older_than))


def prune_dead_servers(full_channels: list[str]) -> int:
    """Delete every row of the processes behind ``full_channels`` that missed heartbeats.

    With channels_redis all channels of a process share one queue and one
    capacity: a dead process's queue fills up and every send to any of its
    channels fails as full. When such a process has also missed two heartbeats
    it is treated as dead, and all its rows go at once instead of each turning
    stale on its own.
    """
    late = stale_cutoff(2 * registry_settings().HEARTBEAT_INTERVAL)
    servers = set(
        UserChannel.objects.filter(channel_name__in=full_channels, last_seen__lt=late).values_list("server", flat=True)
    )
    if not servers:
        return 0
    return _prune(UserChannel.objects.filter(server__in=servers, last_seen__lt=late))


aprune_stale = database_sync_to_async(prune_stale)
