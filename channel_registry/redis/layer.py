"""``BatchedRedisChannelLayer``: channels_redis with a receive path that takes many messages per round trip.

channels_redis keeps every process-local channel of a process ("specific.<client
prefix>!<id>") in ONE sorted set per process, and its ``receive`` takes one
message off it per four serialised round trips (a clean-up EVAL, ``BZPOPMIN``, a
``ZADD`` to a backup queue, a later ``ZPOPMIN``): about 1,500 messages/s for a
whole server process, whatever its CPU. This layer takes up to ``batch_size``
messages per EVAL and hands them to the waiting consumers' buffers at once.

Everything else is channels_redis's: the keys, the message format
(``__asgi_channel__`` naming the process-local channel, or listing several as
``group_send`` writes it), ``capacity`` (per process for its local channels),
``expiry``, groups, general channels. Processes running this layer and processes
running the stock one send to each other in both directions (``capacity`` is
checked by the *sender*, with its own setting).

As in channels_redis, a message fetched for a channel whose consumer is busy
waits in that channel's in-process buffer; a buffer holds ``buffer_capacity``
messages and then drops its oldest. Batching only moves messages out of Redis
sooner, so the per-process ``capacity`` in Redis is hit only when the process
cannot keep up at all: 5,000 by default instead of 100.

Cancellation safety, as channels_redis promises it and a bit more:

* A batch moves from the channel key to a backup key inside the same script that
  pops it, tagged with a batch id. The next fetch puts a batch the process never
  got (the reply was lost with its connection, or the reader was stopped) back in
  front of the queue, and drops one it did get, in the same atomic script. A
  batch reaches the buffers without an ``await`` in between, so "got" is exactly
  what the process knows.
* All Redis reads of the process run in ONE reader task that no consumer owns
  or cancels (it stops when no receive waits); a receive only waits on its
  channel's in-process buffer. Cancelling a consumer therefore never interrupts
  a read, and Python 3.11's lost cancellations in redis-py's ``wait_for``
  (CPython gh-86296) cannot hit a consumer's receive.

One extra fix: ``send`` to a process-local channel picks the shard of the
non-local name, where ``receive`` reads, so it is correct on several hosts
(stock ``send`` hashes the full name and loses about half: channels_redis#221).
It is one EVAL instead of four commands.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import time
from typing import Any

from channels.exceptions import ChannelFull
from channels_redis.core import BoundedQueue, RedisChannelLayer

from .. import metrics
from ..delivery.fanout import SEND_SCRIPT

#: Messages per fetch: one EVAL returns at most this many.
BATCH_SIZE = 200
#: Per server process (all its sockets share one Redis key): room for a burst of
#: ~5 messages per socket of a 1,000-socket process before ``ChannelFull``.
CAPACITY = 5000
#: Messages one channel's in-process buffer holds before it drops its oldest
#: (channels_redis uses ``capacity`` for both; a stuck consumer then holds at most this).
BUFFER_CAPACITY = 100

#: KEYS: channel key, backup key, backup tag key. ARGV: count, new batch id,
#: id of the last batch the process delivered, expiry.
#: A backup whose tag is not the delivered id never reached the process: it goes
#: back in front of the queue (scores kept); a delivered one is dropped. Then up
#: to ``count`` messages move from the queue to the backup, tagged with the new id.
FETCH_SCRIPT = """
local tag = redis.call('GET', KEYS[3])
if tag and tag ~= ARGV[3] then
    local backed_up = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #backed_up, 2 do
        redis.call('ZADD', KEYS[1], backed_up[i + 1], backed_up[i])
    end
end
redis.call('DEL', KEYS[2], KEYS[3])
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
if #popped > 0 then
    for i = 1, #popped, 2 do
        redis.call('ZADD', KEYS[2], popped[i + 1], popped[i])
    end
    redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[4])
    redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return popped
"""

_batch_ids = itertools.count(1)


class BatchedRedisChannelLayer(RedisChannelLayer):
    """``RedisChannelLayer`` whose process-local receive fetches ``batch_size`` messages per EVAL."""

    #: A consumer's receive awaits only an in-process queue (the reader task talks to Redis),
    #: so its cancellation is never lost (``consumers.receive_may_lose_cancellation``).
    receive_keeps_cancellation = True

    def __init__(
        self,
        *args: Any,
        capacity: int = CAPACITY,
        batch_size: int = BATCH_SIZE,
        buffer_capacity: int = BUFFER_CAPACITY,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, capacity=capacity, **kwargs)
        if batch_size < 1 or buffer_capacity < 1:
            raise ValueError("batch_size and buffer_capacity must be at least 1")
        self.batch_size = batch_size
        self.buffer_capacity = buffer_capacity
        self.receive_buffer: collections.defaultdict[str, Any] = collections.defaultdict(
            functools.partial(BoundedQueue, buffer_capacity)
        )
        #: channel key -> id of the last batch this process put into its buffers.
        self._delivered: dict[str, int] = {}
        #: local channel -> receives waiting on it; the reader runs while any wait.
        self._waiting: collections.Counter[str] = collections.Counter()
        self._reader: asyncio.Task[None] | None = None

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """As channels_redis's ``send``, but on the shard ``receive`` reads, in one EVAL."""
        if "!" not in channel:
            return await super().send(channel, message)
        assert isinstance(message, dict), "message is not a dict"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        assert "__asgi_channel__" not in message
        name = self.non_local_name(channel)
        connection = self.connection(self.consistent_hash(name))
        now = time.time()
        full = await connection.register_script(SEND_SCRIPT)(
            keys=[self.prefix + name],
            args=[
                self.serialize({**message, "__asgi_channel__": channel}),
                self.get_capacity(channel),
                int(now) - int(self.expiry),
                now,
                int(self.expiry),
            ],
        )
        if full:
            raise ChannelFull()

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message of ``channel``; process-local channels are fed by the process's reader.

        A receive only waits on its channel's buffer, so cancelling it touches no
        Redis state and never loses a message: what arrives stays in the buffer
        for the next receive (channels_redis drops the buffer of a cancelled receive).
        """
        if "!" not in channel:
            return await super().receive(channel)
        assert self.require_valid_channel_name(channel)
        process_channel = self.non_local_name(channel)
        assert process_channel.endswith(self.client_prefix + "!"), "Wrong client prefix"
        buffer = self.receive_buffer[channel]
        self._waiting[channel] += 1
        try:
            if buffer.empty():
                self._start_reader(process_channel)
            message = await buffer.get()
        finally:
            self._waiting[channel] -= 1
            if not self._waiting[channel]:
                del self._waiting[channel]
                if buffer.empty() and self.receive_buffer.get(channel) is buffer:
                    del self.receive_buffer[channel]
        if isinstance(message, _ReaderFailed):
            raise message.error
        return message

    def local_channels(self, channels: list[str]) -> list[str]:
        """Those of ``channels`` that this process's reader feeds in the running event loop.

        A copy for one of them can skip Redis (``put_local``): the reader would
        only fetch it back into the same buffer. Empty when the reader runs in
        another event loop (a buffer is not thread-safe) or not at all (no receive
        waits: the copy goes through Redis, where the next reader finds it).
        """
        reader = self._reader
        if reader is None or reader.done() or reader.get_loop() is not asyncio.get_running_loop():
            return []
        own = self.client_prefix + "!"
        return [channel for channel in channels if "!" in channel and self.non_local_name(channel).endswith(own)]

    def put_local(self, channels: list[str], message: dict[str, Any]) -> list[str]:
        """Put ``message`` into the buffers of ``channels`` (from ``local_channels``); those that were full.

        What the receiving consumers get is what a trip through Redis gives them:
        the message goes through the layer's serializer (its own copy, the same
        types; all channels share it, as in ``_buffer``). A full buffer refuses the
        copy, as a full Redis key refuses a send (``ChannelFull``), where the
        reader would drop the buffer's oldest message. ``expiry`` has nothing to
        trim: the copy is in the buffer at once, as a fetched one is.
        """
        copy = self.deserialize(self.serialize(message))
        full = []
        for channel in channels:
            buffer = self.receive_buffer[channel]
            if buffer.full():
                full.append(channel)
            else:
                buffer.put_nowait(copy)
        metrics.local_copies(self, len(channels) - len(full))
        return full

    def _start_reader(self, process_channel: str) -> None:
        loop = asyncio.get_running_loop()
        reader = self._reader
        if reader is not None and not reader.done():
            if reader.get_loop() is loop:
                return
            if not reader.get_loop().is_closed():
                raise RuntimeError("Two event loops are trying to receive() on one channel layer at once!")
        self._reader = asyncio.ensure_future(self._read(process_channel))
        self._reader.add_done_callback(self._reader_done)

    async def _read(self, process_channel: str) -> None:
        """Move batches from Redis to the buffers while any local receive waits.

        No consumer owns this task, so none cancels it mid-fetch; a reply lost
        with its connection is covered by the backup (see ``FETCH_SCRIPT``).
        """
        key = self.prefix + process_channel
        connection = self.connection(self.consistent_hash(process_channel))
        drained = False
        while self._waiting:
            fetched = 0
            if drained:  # the last batch emptied the queue: block until a message comes (BZPOPMIN pops it)
                popped_one = await connection.bzpopmin(key, timeout=self.brpop_timeout)
                if popped_one is not None:
                    self._buffer(process_channel, popped_one[1])
                    fetched = 1
            batch_id = next(_batch_ids)
            popped = await connection.eval(
                FETCH_SCRIPT, 3, key, *self._backup_keys(key),
                self.batch_size, batch_id, self._delivered.get(key, 0), int(self.expiry),
            )  # fmt: skip
            # No await from here on: the whole batch reaches the buffers.
            self._delivered[key] = batch_id
            for content in popped[::2]:
                self._buffer(process_channel, content)
            metrics.receive_batch(self, fetched + len(popped) // 2)
            drained = len(popped) < 2 * self.batch_size

    def _reader_done(self, reader: asyncio.Task[None]) -> None:
        """A failed or stopped reader fails every waiting receive; the next receive starts a new reader.

        Failed: Redis is unreachable. Stopped: ``close_pools()`` closed its
        connection. Either way the waiters get a transport error to retry on
        (``RegistryConsumer`` does) instead of waiting for a reader that is gone.
        """
        if reader.cancelled():
            error: BaseException = ConnectionError("the channel layer's connections were closed")
        elif reader.exception() is None:
            return
        else:
            error = reader.exception()  # type: ignore[assignment]
        failure = _ReaderFailed(error)
        for channel in self._waiting:
            if self.receive_buffer[channel].empty():
                self.receive_buffer[channel].put_nowait(failure)

    def _backup_keys(self, key: str) -> tuple[str, str]:
        backup = self._backup_channel_name(key)
        return backup, backup + ":batch"

    def _buffer(self, process_channel: str, content: bytes) -> None:
        """Into the buffer of each channel the message names, as ``RedisChannelLayer.receive`` does."""
        message = self.deserialize(content)
        target = message.pop("__asgi_channel__", process_channel)
        for name in target if isinstance(target, list) else [target]:
            self.receive_buffer[name].put_nowait(message)

    async def close_pools(self) -> None:
        """Stop the reader first: it holds a connection of the pools being closed."""
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done() and reader.get_loop() is asyncio.get_running_loop():
            reader.cancel()
            await asyncio.wait([reader])
        await super().close_pools()


class _ReaderFailed:
    """Put into a waiting receive's buffer when the reader failed: that receive raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
