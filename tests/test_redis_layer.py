"""BatchedRedisChannelLayer against real Redis: the semantics of channels_redis, many messages per round trip."""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import pytest
from channels.exceptions import ChannelFull
from channels_redis import core
from channels_redis.core import RedisChannelLayer
from redis.exceptions import ConnectionError as RedisConnectionError

from channel_registry.delivery.fanout import send_many
from channel_registry.layers import redis_layer
from channel_registry.redis.layer import BatchedRedisChannelLayer
from tests.processes import await_until
from tests.redis_servers import RedisServer

SHARED_REDIS = "redis://127.0.0.1:6379"


def host(url: str = SHARED_REDIS) -> dict:
    return {"address": url, "socket_timeout": 10, "max_connections": 500}


@pytest.fixture
def make_layer(redis_layers):
    """``make(cls=BatchedRedisChannelLayer, hosts=None, **options)``: layers sharing one fresh prefix."""

    def make(cls=BatchedRedisChannelLayer, hosts=None, **options):
        return redis_layers(cls, hosts or [host()], **options)

    return make


async def receive_in_order(layer, channel: str, count: int, within: float = 5) -> list[int]:
    return [(await asyncio.wait_for(layer.receive(channel), within))["n"] for _ in range(count)]


def blocking_pops(layer, channel: str, monkeypatch) -> list:
    """The ``BZPOPMIN`` calls the reader feeding ``channel`` makes from now on: with one, it waits in Redis."""
    client = layer.connection(layer.consistent_hash(layer.non_local_name(channel)))
    pop = client.bzpopmin
    calls: list = []
    monkeypatch.setattr(client, "bzpopmin", lambda *args, **kwargs: calls.append(args) or pop(*args, **kwargs))
    return calls


async def nothing_arrives(layer, channel: str, within: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(layer.receive(channel), within)
    except TimeoutError:
        return True
    return False


def test_the_channels_redis_internals_it_relies_on_are_unchanged():
    """The layer reuses channels_redis's keys, message format, buffers and receive contract.

    A new channels_redis may change any of them: review ``redis/layer.py``
    against its ``core.py`` (``send``'s steps are in ``delivery.SEND_SCRIPT`` too),
    run this file, then record the new fingerprint here.
    """
    relied_on = [getattr(core.RedisChannelLayer, name) for name in (
        "__init__", "send", "receive", "receive_single", "_brpop_with_clean", "group_send",
        "_map_channel_keys_to_connection", "new_channel", "flush", "close_pools", "connection", "consistent_hash",
    )] + [core.BoundedQueue]  # fmt: skip
    digest = hashlib.sha256()
    for item in relied_on:
        digest.update(inspect.getsource(item).encode())
    assert digest.hexdigest()[:16] == "996f3a53349a7002", "channels_redis's core.py changed: see the docstring"


def test_redis_layer_selects_it_with_a_per_process_capacity():
    entry = redis_layer(SHARED_REDIS)
    assert entry["BACKEND"] == "channel_registry.redis.layer.BatchedRedisChannelLayer"
    layer = BatchedRedisChannelLayer(**entry["CONFIG"])
    assert (layer.capacity, layer.buffer_capacity, layer.batch_size) == (5000, 100, 200)
    assert redis_layer(SHARED_REDIS, backend="channels_redis.core.RedisChannelLayer")["BACKEND"].startswith("channels_")


@pytest.mark.asyncio
async def test_order_per_channel_across_batches_and_senders(make_layer):
    receiver = make_layer(batch_size=7)
    stock_sender = make_layer(RedisChannelLayer, capacity=1000)  # capacity is the sender's setting
    channels = [await receiver.new_channel() for _ in range(3)]
    for n in range(60):
        for channel in channels:  # interleaved: every batch mixes the three channels
            sender = stock_sender if n % 2 else receiver
            await sender.send(channel, {"type": "t", "n": n})
    received = await asyncio.gather(*(receive_in_order(receiver, ch, 60) for ch in channels))
    assert received == [list(range(60))] * 3
    assert await nothing_arrives(receiver, channels[0])


@pytest.mark.asyncio
async def test_capacity_is_per_process_and_refusals_are_reported(make_layer):
    receiver = make_layer(capacity=10)
    stock_sender = make_layer(RedisChannelLayer, capacity=10)
    channels = [await receiver.new_channel() for _ in range(12)]
    for n, channel in enumerate(channels[:5]):
        await receiver.send(channel, {"type": "t", "n": n})
    for n, channel in enumerate(channels[5:10], start=5):
        await stock_sender.send(channel, {"type": "t", "n": n})
    with pytest.raises(ChannelFull):
        await receiver.send(channels[10], {"type": "t", "n": 10})
    with pytest.raises(ChannelFull):
        await stock_sender.send(channels[10], {"type": "t", "n": 10})
    assert await send_many(receiver, channels[10:], {"type": "t", "n": 11}) == channels[10:]

    # Receiving frees the process's key: the same sends are accepted again.
    assert [await receive_in_order(receiver, ch, 1) for ch in channels[:10]] == [[n] for n in range(10)]
    await receiver.send(channels[10], {"type": "t", "n": 10})
    assert await receive_in_order(receiver, channels[10], 1) == [10]


@pytest.mark.asyncio
async def test_local_copies_reach_only_this_process_s_buffers_and_a_full_buffer_refuses_them(make_layer):
    """What ``put_local`` takes is what a send through Redis would have put there (a copy of the
    message, in order), for the process's own channels while its reader serves this loop."""
    layer, other_process = make_layer(buffer_capacity=2), make_layer()
    waiting, busy, elsewhere = await layer.new_channel(), await layer.new_channel(), await other_process.new_channel()
    assert layer.local_channels([waiting, busy]) == []  # no reader yet: through Redis
    receive = asyncio.ensure_future(layer.receive(waiting))
    await asyncio.wait_for(layer.send(waiting, {"type": "t", "n": 0}), 5)
    assert (await asyncio.wait_for(receive, 5))["n"] == 0
    receive = asyncio.ensure_future(layer.receive(waiting))  # waits on its buffer
    assert layer.local_channels([waiting, elsewhere, busy, "general"]) == [waiting, busy]

    message = {"type": "t", "n": 1, "items": (1, 2)}
    assert layer.put_local([waiting, busy], message) == []
    got = await asyncio.wait_for(receive, 5)
    assert got == {"type": "t", "n": 1, "items": [1, 2]} and got is not message  # as msgpack returns it
    assert layer.put_local([busy], {"type": "t", "n": 2}) == []
    assert layer.put_local([busy], {"type": "t", "n": 3}) == [busy]  # its buffer holds 2: refused, as ChannelFull
    assert await receive_in_order(layer, busy, 2) == [1, 2]
    assert await nothing_arrives(layer, busy)


@pytest.mark.asyncio
async def test_messages_older_than_expiry_are_not_delivered(make_layer):
    receiver = make_layer(expiry=1)
    channel = await receiver.new_channel()
    await receiver.send(channel, {"type": "t", "n": 1})
    await asyncio.sleep(2.1)  # past the expiry
    await receiver.send(channel, {"type": "t", "n": 2})  # trims what expired, as channels_redis's send does
    assert await receive_in_order(receiver, channel, 1) == [2]
    assert await nothing_arrives(receiver, channel)


@pytest.mark.asyncio
async def test_a_reply_lost_mid_batch_is_fetched_again_exactly_once(make_layer, monkeypatch):
    """The fetch ran in Redis but its reply never reached the process: nothing lost, nothing twice."""
    receiver = make_layer(batch_size=50)
    channels = [await receiver.new_channel() for _ in range(4)]
    for n in range(30):
        for channel in channels:
            await receiver.send(channel, {"type": "t", "n": n})
    connection = receiver.connection(receiver.consistent_hash(receiver.non_local_name(channels[0])))
    real_eval = connection.eval

    async def eval_then_lose_the_reply(*args):
        monkeypatch.setattr(connection, "eval", real_eval)
        await real_eval(*args)  # 50 messages moved to the backup...
        raise RedisConnectionError("connection lost")  # ...and the answer lost

    monkeypatch.setattr(connection, "eval", eval_then_lose_the_reply)
    with pytest.raises(RedisConnectionError):
        await receiver.receive(channels[0])
    received = await asyncio.gather(*(receive_in_order(receiver, ch, 30) for ch in channels))
    assert received == [list(range(30))] * 4
    assert await nothing_arrives(receiver, channels[0])


@pytest.mark.asyncio
async def test_receives_cancelled_at_random_points_lose_nothing(make_layer):
    """Consumers cancelled over and over (``wait_for`` timeouts) while batches of other channels arrive."""
    receiver = make_layer(batch_size=16)
    sender = make_layer()
    channels = [await receiver.new_channel() for _ in range(20)]
    got: dict[str, list[int]] = {channel: [] for channel in channels}

    async def impatient(channel: str) -> None:
        while len(got[channel]) < 50:
            try:
                got[channel].append((await asyncio.wait_for(receiver.receive(channel), 0.003))["n"])
            except TimeoutError:
                pass

    async def send() -> None:
        for n in range(50):
            await send_many(sender, channels, {"type": "t", "n": n})
            await asyncio.sleep(0.002)

    await asyncio.wait_for(asyncio.gather(send(), *(impatient(ch) for ch in channels)), 60)
    assert got == {channel: list(range(50)) for channel in channels}


@pytest.mark.asyncio
async def test_a_receive_cancelled_while_waiting_leaves_the_next_message_for_the_next_receive(make_layer, monkeypatch):
    receiver = make_layer()
    channel = await receiver.new_channel()
    pops = blocking_pops(receiver, channel, monkeypatch)
    waiting = asyncio.ensure_future(receiver.receive(channel))
    await await_until(lambda: pops, within=5)  # the reader is blocked in BZPOPMIN now
    waiting.cancel()
    # The cancellation is never swallowed (Python 3.11's wait_for, CPython gh-86296): a receive only awaits a queue.
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 1)
    await receiver.send(channel, {"type": "t", "n": 1})
    # The reader, still blocked, takes it into the channel's buffer while no receive waits.
    await await_until(lambda: channel in receiver.receive_buffer and not receiver.receive_buffer[channel].empty(), 5)
    assert await receive_in_order(receiver, channel, 1) == [1]


@pytest.mark.asyncio
async def test_closing_the_pools_fails_waiting_receives_and_the_next_receive_reads_again(make_layer, monkeypatch):
    receiver = make_layer()
    channel = await receiver.new_channel()
    pops = blocking_pops(receiver, channel, monkeypatch)
    waiting = asyncio.ensure_future(receiver.receive(channel))
    await await_until(lambda: pops, within=5)  # the reader is blocked in BZPOPMIN
    await receiver.close_pools()
    with pytest.raises(ConnectionError):  # a transport error RegistryConsumer retries on, not a hang
        await asyncio.wait_for(waiting, 2)
    await receiver.send(channel, {"type": "t", "n": 1})
    assert await receive_in_order(receiver, channel, 1) == [1]


@pytest.mark.asyncio
async def test_every_connection_pooled_before_a_redis_restart_works_after_it(make_layer):
    """redis-py 8.1's RESP3 pool sends on connections the server closed (redis/redis-py#4252)."""
    with RedisServer() as server:
        layer = make_layer(hosts=redis_layer(server.url)["CONFIG"]["hosts"])
        channels = [await layer.new_channel() for _ in range(10)]
        # Ten commands at once: the pool now holds ten connections.
        await asyncio.gather(*(layer.send(channel, {"type": "t", "n": 1}) for channel in channels))
        server.restart()  # same port, empty data set
        pool = layer.connection(0).connection_pool
        await await_until(  # the loop has seen every pooled socket's EOF
            lambda: all(not pooled.is_connected or pooled._reader.at_eof() for pooled in pool._available_connections),
            within=5,
        )

        await asyncio.gather(*(layer.send(channel, {"type": "t", "n": 2}) for channel in channels))
        assert await send_many(layer, channels, {"type": "t", "n": 3}) == []
        received = await asyncio.gather(*(receive_in_order(layer, channel, 2) for channel in channels))
        assert received == [[2, 3]] * 10


@pytest.mark.asyncio
async def test_interop_with_the_stock_layer_both_ways(make_layer):
    ours = make_layer()
    stock = make_layer(RedisChannelLayer)
    our_channel, stock_channel = await ours.new_channel(), await stock.new_channel()
    for layer in (ours, stock):
        await layer.group_add("both", our_channel)
        await layer.group_add("both", stock_channel)

    await stock.send(our_channel, {"type": "t", "n": 1})
    await ours.send(stock_channel, {"type": "t", "n": 1})
    await stock.group_send("both", {"type": "t", "n": 2})
    await ours.group_send("both", {"type": "t", "n": 3})
    assert await send_many(ours, [our_channel, stock_channel], {"type": "t", "n": 4}) == []
    assert await send_many(stock, [our_channel, stock_channel], {"type": "t", "n": 5}) == []

    assert await receive_in_order(ours, our_channel, 5) == [1, 2, 3, 4, 5]
    assert await receive_in_order(stock, stock_channel, 5) == [1, 2, 3, 4, 5]
    # General (non-local) channels keep channels_redis's own path.
    await stock.send("jobs", {"type": "t", "n": 6})
    assert (await asyncio.wait_for(ours.receive("jobs"), 5))["n"] == 6


@pytest.mark.asyncio
async def test_two_shards_every_send_path_delivers(make_layer):
    with RedisServer() as first, RedisServer() as second:
        hosts = [host(first.url), host(second.url)]
        receivers = [make_layer(hosts=hosts) for _ in range(4)]
        while len({r.consistent_hash(f"specific.{r.client_prefix}!") for r in receivers}) < 2:
            receivers[-1] = make_layer(hosts=hosts)  # both shards must hold some process's key
        sender = make_layer(hosts=hosts)
        pairs = [(r, await r.new_channel()) for r in receivers for _ in range(5)]
        for _, channel in pairs:
            await sender.group_add("all", channel)

        for _, channel in pairs:
            await sender.send(channel, {"type": "t", "n": 1})  # stock send loses ~half here (channels_redis#221)
        assert await send_many(sender, [ch for _, ch in pairs], {"type": "t", "n": 2}) == []
        await sender.group_send("all", {"type": "t", "n": 3})

        received = await asyncio.gather(*(receive_in_order(r, ch, 3) for r, ch in pairs))
        assert received == [[1, 2, 3]] * len(pairs)
