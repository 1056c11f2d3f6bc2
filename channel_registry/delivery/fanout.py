"""Getting one event onto many channels fast, per channel layer type.

``send_many`` picks the cheapest correct way for the layer it is given:

* ``channels_redis.core.RedisChannelLayer``: one Lua script per Redis shard (in
  chunks of ``CHUNK_KEYS`` keys) doing exactly what the layer's own ``send`` does
  for each key, with process-local channels coalesced the way ``group_send`` does.
* Anything else, ``RedisPubSubChannelLayer`` included: the layer's own ``send``
  per channel, with a bounded number in flight (see ``_send_each``).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from channels.exceptions import ChannelFull

from ..conf import registry_settings
from ..exceptions import layer_unavailable

try:  # channels_redis is optional: the generic path serves every other layer.
    from channels_redis.core import RedisChannelLayer
except ImportError:  # pragma: no cover
    RedisChannelLayer = None

T = TypeVar("T")

#: Keys per EVAL: bounds how long one script holds Redis and its argument list.
CHUNK_KEYS = 1000

#: ``send(keys, args)``, per key the same steps as ``RedisChannelLayer.send``: trim expired
#: messages, refuse when at capacity, else add with the current time and refresh the TTL.
#: keys: n channel keys. args: n messages, n capacities, trim_before, now, expiry.
#: Returns the 1-based positions of the keys that were full. A Lua function, so that
#: ``pipeline.FOLD_SCRIPT`` runs the same steps as the script of its own.
SEND_FUNCTION = """
local function send(keys, args)
    local n = #keys
    local trim_before, now, expiry = args[2 * n + 1], args[2 * n + 2], args[2 * n + 3]
    local full = {}
    for i = 1, n do
        redis.call('ZREMRANGEBYSCORE', keys[i], 0, trim_before)
        if redis.call('ZCOUNT', keys[i], '-inf', '+inf') >= tonumber(args[n + i]) then
            full[#full + 1] = i
        else
            redis.call('ZADD', keys[i], now, args[i])
            redis.call('EXPIRE', keys[i], expiry)
        end
    end
    return full
end
"""

#: KEYS: n channel keys. ARGV: n messages, n capacities, trim_before, now, expiry (see ``SEND_FUNCTION``).
SEND_SCRIPT = SEND_FUNCTION + "return send(KEYS, ARGV)\n"

#: One message and the channels it goes to.
Batch = tuple[dict[str, Any], Sequence[str]]

#: One key of a Redis send: the key, the serialized message, its capacity, the channels it reaches.
Entry = tuple[str, bytes, int, list[str]]


async def send_many(
    layer: Any, channel_names: Sequence[str], message: dict[str, Any], *, concurrency: int = 50
) -> list[str]:
    """Send ``message`` to every channel in ``channel_names``.

    Returns the names the layer refused as full (``ChannelFull``), in input
    order. A name given twice is sent once. At most ``concurrency`` layer
    commands are in flight: redis-py 8's pool refuses the 101st instead of
    waiting, and the rest of the process shares that pool.

    Raises ``ChannelLayerUnavailable`` (chained) when the layer cannot be reached.
    """
    return await send_batches(layer, [(message, channel_names)], concurrency=concurrency)


async def send_batches(layer: Any, batches: Sequence[Batch], *, concurrency: int = 50) -> list[str]:
    """``send_many`` for several messages at once (each user's own position, say), in one pass per shard."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if any("__asgi_channel__" in message for message, _ in batches):
        raise ValueError("'__asgi_channel__' is reserved by the channel layer")
    batches = [(message, list(dict.fromkeys(names))) for message, names in batches]
    if is_redis_layer(layer):
        sender = _send_batched
    else:
        sender = _send_each
    with layer_unavailable(layer):
        full = await sender(layer, batches, concurrency)
    return [channel for _, names in batches for channel in names if channel in full]


def is_redis_layer(layer: Any) -> bool:
    """Whether ``layer`` is channels_redis's ``RedisChannelLayer`` (its keys and scripts are reachable)."""
    return RedisChannelLayer is not None and isinstance(layer, RedisChannelLayer)


class PerLayer(Generic[T]):
    """One ``T`` per channel layer instance, made on first use: a new layer (a test, a reloaded
    configuration) starts afresh, and a layer's state goes with it (weak keys)."""

    def __init__(self, make: Callable[[Any], T]) -> None:
        self.make = make
        self.values: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()

    def __call__(self, layer: Any) -> T:
        value = self.values.get(layer)
        if value is None:
            value = self.values[layer] = self.make(layer)
        return value


async def _send_each(layer: Any, batches: Sequence[Batch], concurrency: int) -> set[str]:
    """Generic path: the layer's own ``send``, ``concurrency`` at a time.

    ``RedisPubSubChannelLayer`` takes this path on purpose. Its ``send`` is one
    PUBLISH on the shard of the full channel name (where ``new_channel``
    subscribed, so it is correct on several hosts) and each shard serialises
    publishes behind its own lock, so the bound never threatens the pool.
    Pipelining would mean reaching into four private names of its per-loop
    shard objects for a fire-and-forget command that can never report full.
    """
    full = set()

    async def send_one(pair: tuple[str, dict[str, Any]]) -> None:
        channel, message = pair
        try:
            await layer.send(channel, message)
        except ChannelFull:
            full.add(channel)

    pairs = [(channel, message) for message, names in batches for channel in names]
    await run_bounded(pairs, send_one, concurrency)
    return full


async def _send_batched(layer: Any, batches: Sequence[Batch], concurrency: int) -> set[str]:
    """Redis fast path: one EVAL per chunk of keys per shard.

    Process-local channels ("specific.<client_prefix>!<id>") share one key per
    process, ``prefix + non_local_name``; that key gets ONE message per batch
    listing its channels in ``__asgi_channel__``, exactly as ``group_send``
    writes it, so a full key reports every channel in it. The shard is
    ``consistent_hash`` of the non-local name, which is where ``receive`` reads
    (plain ``send`` hashes the full name and misses it on several hosts:
    channels_redis#221). General channels get their own key, the message as
    ``send`` writes it, and the shard of their name (``receive`` polls every
    shard in turn for them). A key may appear once per batch in one script.
    """
    entries_by_shard: dict[int, list[Entry]] = defaultdict(list)
    for shard, entry in process_entries(layer, batches):
        entries_by_shard[shard].append(entry)
    tail = send_tail(layer)
    full: set[str] = set()

    async def send_chunk(chunk: tuple[int, list[Entry]]) -> None:
        shard, entries = chunk
        script = layer.connection(shard).register_script(SEND_SCRIPT)
        args = [entry[1] for entry in entries] + [entry[2] for entry in entries]
        for position in await script(keys=[entry[0] for entry in entries], args=args + tail):
            full.update(entries[position - 1][3])

    chunks = [
        (shard, entries[start : start + CHUNK_KEYS])
        for shard, entries in entries_by_shard.items()
        for start in range(0, len(entries), CHUNK_KEYS)
    ]
    await run_bounded(chunks, send_chunk, concurrency)
    return full


def process_entries(layer: Any, batches: Sequence[Batch]) -> list[tuple[int, Entry]]:
    """Each batch as ``RedisChannelLayer`` keys them, with the shard of each key (see ``_send_batched``)."""
    entries = []
    for message, channels in batches:
        by_name: dict[str, list[str]] = defaultdict(list)
        for channel in channels:
            layer.require_valid_channel_name(channel)
            by_name[layer.non_local_name(channel)].append(channel)
        for name, targets in by_name.items():
            body = {**message, "__asgi_channel__": targets} if "!" in name else message
            entry = (layer.prefix + name, layer.serialize(body), layer.get_capacity(targets[0]), targets)
            entries.append((int(layer.consistent_hash(name)), entry))
    return entries


def send_tail(layer: Any) -> list[Any]:
    """``SEND_FUNCTION``'s last arguments: trim before, now, expiry."""
    now = time.time()
    return [int(now) - int(layer.expiry), now, int(layer.expiry)]


def layer_slots() -> asyncio.Semaphore:
    """The process's budget of layer commands in flight (``SEND_CONCURRENCY``), one per event loop.

    Bounding each fan-out is not enough: 200 consumers sending at once would
    still exhaust redis-py 8's pool, which refuses the 101st concurrent command
    instead of waiting. Every command the library sends takes a slot here.
    """
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(registry_settings().SEND_CONCURRENCY)
    return slots


_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


async def run_bounded(items: Sequence[T], work: Callable[[T], Awaitable[None]], limit: int) -> None:
    """Run ``work`` over ``items`` with at most ``limit`` calls in flight, each holding a layer slot.

    ``limit`` workers share one iterator, so a large fan-out costs ``limit``
    tasks, not one per item. The first error cancels the other workers and is
    raised, so nothing keeps sending after the caller has been told it failed.
    """
    slots = layer_slots()

    async def bounded(item: T) -> None:
        async with slots:
            await work(item)

    if len(items) == 1:  # the common single-tab send: no worker task to set up
        await bounded(items[0])
        return
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await bounded(item)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
