"""Who is online, from the registry (the group strategy cannot answer this)."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from .models import UserChannel


def is_online(user: Any) -> bool:
    """Whether ``user`` (instance or pk) has at least one live connection."""
    return UserChannel.objects.live().for_user(user).exists()


def online_user_ids() -> set[Any]:
    """Primary keys of every user with a live connection, on any server process."""
    return set(UserChannel.objects.live().values_list("user_id", flat=True).distinct())


async def ais_online(user: Any) -> bool:
    return await database_sync_to_async(is_online)(user)


async def aonline_user_ids() -> set[Any]:
    return await database_sync_to_async(online_user_ids)()
