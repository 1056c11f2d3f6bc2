"""The mapping strategy: a ``UserChannel`` row per connection, ``send`` to each live channel."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from channels.db import database_sync_to_async

from ..cleanup import prune_dead_servers
from ..conf import registry_settings
from ..exceptions import ConnectionLimitExceeded
from ..history.log import Position, stamped
from ..models import Transport, UserChannel, session_digest
from ..protocol import CLOSE_TOO_MANY, DISCONNECT_EVENT
from ..registry import postgres
from ..registry.liveness import heartbeat, process
from ..registry.store import OrmStore, live_names, orm
from .fanout import send_batches
from .strategy import Delivery, DeliveryStrategy, channel_layer


def row_store() -> OrmStore:
    """The native PostgreSQL store where it may run (see ``postgres.enabled``), else the ORM one."""
    return postgres.native if postgres.enabled() else orm


def session_rows(digest: str) -> list[tuple]:
    return list(UserChannel.objects.filter(session=digest).values_list("channel_name", "last_seen"))


class MappingStrategy(DeliveryStrategy):
    """Explicit mapping: one row per connection, ``send`` to each live channel."""

    async def register(
        self, user_id, channel_name: str, session_key: str | None = None, transport: str = Transport.SOCKET
    ) -> None:
        registration = process.registration(user_id, session_digest(session_key), transport)
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
            await self.send_batches([({"type": DISCONNECT_EVENT, "code": CLOSE_TOO_MANY}, evicted)])

    async def unregister(self, user_id, channel_name: str, session_key: str | None = None) -> None:
        if process.open.pop(channel_name, None) is None:
            return
        # Until the DELETE is known to be done, the heartbeat treats the row as one to delete.
        process.closing[channel_name] = user_id
        await row_store().remove(user_id, channel_name)
        process.closing.pop(channel_name, None)
        heartbeat.stop_if_idle()

    async def route(self, user_ids: Collection, event: dict, positions: dict[Any, Position] | None = None) -> Delivery:
        live = await row_store().live_channels(user_ids)
        if positions is None:
            return await self.send_batches([(event, [name for names in live.values() for name in names])])
        # Still one message per server process (the key its channels share), not one per user:
        # it carries the position of each user it reaches there.
        layer = channel_layer()
        by_process: dict[str, tuple[dict[Any, Position], list[str]]] = {}
        for user_id, names in live.items():
            for name in names:
                users, channels = by_process.setdefault(layer.non_local_name(name), ({}, []))
                users[user_id] = positions[user_id]
                channels.append(name)
        return await self.send_batches([(stamped(event, users), channels) for users, channels in by_process.values()])

    async def resolve(self, user_id: Any) -> tuple[bool, list[str] | None]:
        names = await row_store().recipient_channels(user_id)
        return names is not None, names or []

    async def routes(self, user_id: Any) -> list[str]:
        return (await row_store().live_channels([user_id])).get(user_id, [])

    async def send_to(self, channels: list[str], event: dict) -> Delivery:
        return await self.send_batches([(event, channels)])

    async def deliver_to_session(self, session_key: str, event: dict) -> Delivery:
        rows = await database_sync_to_async(session_rows)(session_digest(session_key))
        return await self.send_batches([(event, live_names(rows))])

    async def send_batches(self, batches: list[tuple[dict, list[str]]]) -> Delivery:
        channels = sum(len(names) for _, names in batches)
        if not channels:
            return Delivery(channels=0, sent=0, failed=[])
        concurrency = registry_settings().SEND_CONCURRENCY
        return await self.account(channels, await send_batches(channel_layer(), batches, concurrency=concurrency))

    async def account(self, channels: int, failed: list[str]) -> Delivery:
        if failed:
            await database_sync_to_async(prune_dead_servers)(failed)
        return Delivery(channels=channels, sent=channels - len(failed), failed=failed)
