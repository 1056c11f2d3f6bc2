"""Connection slots for the group strategy: ``MAX_CONNECTIONS_PER_USER`` without registry rows.

Groups cannot be counted, so each connection of the group strategy also holds a
slot: a member of its user's sorted set in Redis (under the layer's ``prefix``),
``<registered at, ms>:<channel name>``, scored by when it expires. One Lua script
drops the expired members, applies ``ON_LIMIT`` and adds the newcomer, so the
limit holds across processes. Each process refreshes its members' expiry every
``HEARTBEAT_INTERVAL`` (one command per user it serves); a process that dies
stops refreshing, and its slots are free again ``STALE_AFTER`` seconds later.
With any other layer (the in-memory one serves one process) the slots are a dict
of this process.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections import defaultdict
from typing import Any

from ..cancellation import cancellable
from ..conf import registry_settings
from ..delivery.fanout import is_redis_layer, layer_slots
from ..exceptions import ChannelLayerUnavailable, ConnectionLimitExceeded, layer_unavailable

logger = logging.getLogger(__name__)

#: KEYS: the user's set. ARGV: channel name, limit, ms a slot lives unrefreshed, "1" to evict the oldest.
#: Returns {0} when refused, else {1, the new member, the evicted members...}. Redis's own clock.
CLAIM_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local excess = #members + 1 - tonumber(ARGV[2])
local result = {1, string.format('%015d:%s', now, ARGV[1])}
if excess > 0 then
    if ARGV[4] ~= '1' then
        return {0}
    end
    table.sort(members)
    for i = 1, excess do
        redis.call('ZREM', KEYS[1], members[i])
        result[#result + 1] = members[i]
    end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), result[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return result
"""

#: KEYS: one user's set. ARGV: ms a slot lives unrefreshed, then this process's members of it.
#: Only members still there (XX): an evicted or released slot stays gone.
REFRESH_SCRIPT = """
local clock = redis.call('TIME')
local expires = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
"""


def channel_of(member: str) -> str:
    return member.partition(":")[2]


def _key(layer: Any, user_id: Any) -> tuple[str, str]:
    base = f"registry.slots.{user_id}"
    return base, f"{layer.prefix}{base}"


async def _script(layer: Any, user_id: Any, script: str, args: list[Any]) -> Any:
    base, key = _key(layer, user_id)
    with layer_unavailable(layer):
        async with layer_slots():
            connection = layer.connection(layer.consistent_hash(base))
            return await connection.register_script(script)(keys=[key], args=args)


class Slots:
    """The slots this process holds, and the task that keeps them alive."""

    def __init__(self) -> None:
        #: Channel name → (user, member), for the connections of this process.
        self.held: dict[str, tuple[Any, str]] = {}
        #: The in-memory version, per layer: user → {member: None}, oldest first.
        self._local: weakref.WeakKeyDictionary[Any, dict[Any, dict[str, None]]] = weakref.WeakKeyDictionary()
        self._task: asyncio.Task[None] | None = None

    async def claim(self, layer: Any, user_id: Any, channel_name: str) -> list[str]:
        """Take a slot for ``channel_name``: the channels ``close_oldest`` evicts for it.

        Raises ``ConnectionLimitExceeded`` when the limit refuses it. No limit: nothing is held.
        """
        options = registry_settings()
        if options.MAX_CONNECTIONS_PER_USER is None:
            return []
        evict = options.ON_LIMIT == "close_oldest"
        if is_redis_layer(layer):
            args = [channel_name, options.MAX_CONNECTIONS_PER_USER, round(options.STALE_AFTER * 1000), int(evict)]
            taken, *members = await _script(layer, user_id, CLAIM_SCRIPT, args)
            members = [member.decode() for member in members]
        else:
            taken, members = self._claim_local(layer, user_id, channel_name, options.MAX_CONNECTIONS_PER_USER, evict)
        if not taken:
            raise ConnectionLimitExceeded(f"user {user_id} is at its connection limit")
        member, evicted = members[0], members[1:]
        self.held[channel_name] = (user_id, member)
        self._ensure_refreshing(layer)
        return [channel_of(name) for name in evicted]

    def _claim_local(
        self, layer: Any, user_id: Any, channel_name: str, limit: int, evict: bool
    ) -> tuple[bool, list[str]]:
        members = self._local.setdefault(layer, defaultdict(dict))[user_id]
        excess = len(members) + 1 - limit
        if excess > 0 and not evict:
            return False, []
        evicted = list(members)[: max(excess, 0)]
        for name in evicted:
            del members[name]
        member = f"{time.time_ns() // 1_000_000:015d}:{channel_name}"
        members[member] = None
        return True, [member, *evicted]

    async def release(self, layer: Any, channel_name: str) -> None:
        """Give the slot back; nothing to do for a channel that holds none."""
        held = self.held.pop(channel_name, None)
        if held is None:
            return
        user_id, member = held
        if is_redis_layer(layer):
            base, key = _key(layer, user_id)
            with layer_unavailable(layer):
                async with layer_slots():
                    await layer.connection(layer.consistent_hash(base)).zrem(key, member)
        else:
            self._local.get(layer, {}).get(user_id, {}).pop(member, None)

    async def refresh(self, layer: Any) -> None:
        """Push back the expiry of every slot this process holds: one script per user."""
        if not is_redis_layer(layer):
            return  # in-process slots end with their process
        by_user: dict[Any, list[str]] = defaultdict(list)
        for user_id, member in list(self.held.values()):
            by_user[user_id].append(member)
        lifetime = round(registry_settings().STALE_AFTER * 1000)
        for user_id, members in by_user.items():
            await _script(layer, user_id, REFRESH_SCRIPT, [lifetime, *members])

    def _ensure_refreshing(self, layer: Any) -> None:
        task = self._task
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            # A context of its own: not the one of the consumer that happened to start it.
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_while_held(layer), name="channel_registry slots", context=contextvars.Context()
            )

    async def _refresh_while_held(self, layer: Any) -> None:
        while self.held:
            await asyncio.sleep(registry_settings().HEARTBEAT_INTERVAL)
            try:
                # A cancellation lost in redis-py would have this loop outlive its event loop.
                await cancellable(self.refresh(layer))
            except ChannelLayerUnavailable:
                logger.warning("channel_registry: could not refresh connection slots; retrying next interval")


slots = Slots()
