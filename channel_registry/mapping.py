"""The mapping strategy: a ``UserChannel`` row per connection, ``send`` to each live channel."""

from __future__ import annotations

from collections.abc import Collection

from channels.db import database_sync_to_async

from . import postgres
from .cleanup import prune_dead_servers
from .conf import registry_settings
from .delivery import send_many
from .exceptions import ConnectionLimitExceeded
from .liveness import heartbeat, process
from .models import UserChannel, session_digest
from .protocol import CLOSE_TOO_MANY, DISCONNECT_EVENT
from .store import OrmStore, live_names, orm
from .strategy import Delivery, DeliveryStrategy, channel_layer


def row_store() -> OrmStore:
    """The native PostgreSQL store where it may run (see ``postgres.enabled``), else the ORM one."""
    return postgres.native if postgres.enabled() else orm


def session_rows(digest: str) -> list[tuple]:
    return list(UserChannel.objects.filter(session=digest).values_list("channel_name", "last_seen"))


class MappingStrategy(DeliveryStrategy):
    """Explicit mapping: one row per connection, ``send`` to each live channel."""

    async def register(self, user_id, channel_name: str, session_key: str | None = None) -> None:
        registration = process.registration(user_id, session_digest(session_key))
        try:
            evicted = await row_store().add(channel_name, registration)
        except ConnectionLimitExceeded:
            raise  # refused before anything was written
        except BaseException:
            # Cut short (cancelled, or the answer lost) after it may have committed: the heartbeat makes sure.
            process.closing[channel_name] = user_id
            heartbeat.ensure_running()
            raise
        process.open[channel_name] = registration
        heartbeat.ensure_running()
        if evicted:
            await self.send(evicted, {"type": DISCONNECT_EVENT, "code": CLOSE_TOO_MANY})

    async def unregister(self, user_id, channel_name: str, session_key: str | None = None) -> None:
        if process.open.pop(channel_name, None) is None:
            return
        # Until the DELETE is known to be done, the heartbeat treats the row as one to delete.
        process.closing[channel_name] = user_id
        await row_store().remove(user_id, channel_name)
        process.closing.pop(channel_name, None)
        heartbeat.stop_if_idle()

    async def deliver(self, user_ids: Collection, event: dict) -> Delivery:
        return await self.send_to_channels(await row_store().live_channels(user_ids), event)

    async def deliver_to_recipient(self, user_id, event: dict) -> Delivery | None:
        """The recipient check and the channel lookup in one statement (see ``OrmStore.recipient_channels``)."""
        names = await row_store().recipient_channels(user_id)
        return None if names is None else await self.send_to_channels(names, event)

    async def deliver_to_session(self, session_key: str, event: dict) -> Delivery:
        rows = await database_sync_to_async(session_rows)(session_digest(session_key))
        return await self.send_to_channels(live_names(rows), event)

    async def send_to_channels(self, names: list[str], event: dict) -> Delivery:
        if not names:
            return Delivery(channels=0, sent=0, failed=[])
        failed = await self.send(names, event)
        if failed:
            await database_sync_to_async(prune_dead_servers)(failed)
        return Delivery(channels=len(names), sent=len(names) - len(failed), failed=failed)

    async def send(self, names: list[str], event: dict) -> list[str]:
        return await send_many(channel_layer(), names, event, concurrency=registry_settings().SEND_CONCURRENCY)
