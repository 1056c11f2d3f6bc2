"""Deleting rows that crashed or restarted server processes left behind.

The deleting itself is the row store's (batched, under the users' locks, with
``user_offline`` for every user left without a row); this module decides which rows.
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from . import metrics
from .conf import registry_settings
from .models import UserChannel, stale_cutoff
from .registry.store import orm


def count_stale(older_than: float | None = None) -> int:
    return UserChannel.objects.stale(older_than).count()


def prune_stale(older_than: float | None = None) -> int:
    """Delete rows not refreshed for ``older_than`` seconds (default ``STALE_AFTER``).

    Returns the number of rows deleted and sends ``user_offline`` for every user
    left without any row.
    """
    return metrics.rows_pruned(orm.delete(UserChannel.objects.stale(older_than)))


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
    return metrics.rows_pruned(orm.delete(UserChannel.objects.filter(server__in=servers, last_seen__lt=late)))


aprune_stale = database_sync_to_async(prune_stale)
