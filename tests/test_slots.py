"""Connection slots of the group strategy (``slots.py``): one contract over Redis and the in-memory layer.

Two ``Slots`` instances on two layer instances stand for two server processes
(Redis only: the in-memory layer serves one process by definition).
"""

import asyncio
import os

import pytest
from channels.layers import InMemoryChannelLayer

from channel_registry.exceptions import ConnectionLimitExceeded
from channel_registry.layers import redis_layer
from channel_registry.registry.slots import Slots

REAL = os.environ.get("CR_TEST_STACK", "real") == "real"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


@pytest.fixture(params=["redis", "memory"])
def processes(request, redis_layers):
    """Two (slots, layer) pairs: two processes on one Redis, or one process twice on the in-memory layer."""
    if request.param == "memory":
        layer = InMemoryChannelLayer()
        return [(Slots(), layer)] * 2
    if not REAL:
        pytest.skip("the Redis script needs the real Redis (CR_TEST_STACK=real)")
    from channels_redis.core import RedisChannelLayer

    config = redis_layer(REDIS_URL)["CONFIG"]
    config.pop("prefix", None)
    return [(Slots(), redis_layers(RedisChannelLayer, **config)) for _ in range(2)]


@pytest.fixture
def limit_of_three(settings):
    settings.CHANNEL_REGISTRY = {"MAX_CONNECTIONS_PER_USER": 3, "HEARTBEAT_INTERVAL": 0.2, "STALE_AFTER": 0.6}


async def claim(process, user_id, channel_name):
    slots, layer = process
    return await slots.claim(layer, user_id, channel_name)


async def test_the_limit_holds_over_every_process_and_a_released_slot_is_free_again(processes, limit_of_three):
    for n in range(3):
        assert await claim(processes[n % 2], "u1", f"c{n}") == []
    with pytest.raises(ConnectionLimitExceeded):
        await claim(processes[1], "u1", "c3")
    assert await claim(processes[1], "u2", "other") == []  # another user has slots of their own
    slots, layer = processes[0]
    await slots.release(layer, "c0")
    await slots.release(layer, "c0")  # twice is harmless
    assert await claim(processes[1], "u1", "c3") == []


async def test_close_oldest_evicts_the_oldest_connection_of_any_process(processes, limit_of_three, settings):
    settings.CHANNEL_REGISTRY = {**settings.CHANNEL_REGISTRY, "ON_LIMIT": "close_oldest"}
    for n in range(3):
        await claim(processes[n % 2], "u1", f"c{n}")
        await asyncio.sleep(0.002)  # registration times a millisecond apart at least
    assert await claim(processes[1], "u1", "c3") == ["c0"]
    assert await claim(processes[0], "u1", "c4") == ["c1"]


async def test_no_limit_holds_no_slot(processes, settings):
    settings.CHANNEL_REGISTRY = {"MAX_CONNECTIONS_PER_USER": None}
    slots, layer = processes[0]
    assert [await slots.claim(layer, "u1", f"c{n}") for n in range(100)] == [[]] * 100
    assert slots.held == {}


@pytest.mark.skipif(not REAL, reason="the Redis script needs the real Redis (CR_TEST_STACK=real)")
async def test_slots_of_a_process_that_died_are_free_after_stale_after_and_live_ones_are_kept(
    limit_of_three, redis_layers
):
    from channels_redis.core import RedisChannelLayer

    config = redis_layer(REDIS_URL)["CONFIG"]
    config.pop("prefix", None)
    (alive, alive_layer), (dead, dead_layer) = [(Slots(), redis_layers(RedisChannelLayer, **config)) for _ in range(2)]
    await alive.claim(alive_layer, "u1", "kept")
    await dead.claim(dead_layer, "u1", "lost.1")
    await dead.claim(dead_layer, "u1", "lost.2")
    dead._task.cancel()  # the process is gone: nobody refreshes its slots
    with pytest.raises(ConnectionLimitExceeded):
        await alive.claim(alive_layer, "u1", "new.1")

    await asyncio.sleep(1.0)  # STALE_AFTER 0.6 s, with margin; the live process refreshed every 0.2 s
    assert await alive.claim(alive_layer, "u1", "new.1") == []
    assert await alive.claim(alive_layer, "u1", "new.2") == []
    with pytest.raises(ConnectionLimitExceeded):  # "kept" still counts: 3 of 3
        await alive.claim(alive_layer, "u1", "new.3")


async def test_the_refresh_ends_when_cancelled_even_if_a_redis_call_loses_the_cancellation(limit_of_three):
    """On Python 3.11 redis-py may swallow a cancellation (CPython gh-86296): the refresh loop then
    carried on for ever, and closing the event loop hung (a 120 s test timeout in a full run)."""
    slots = Slots()
    slots.held = {"c1": ("u1", "c1")}
    refreshing = asyncio.Event()

    async def refresh_losing_the_cancellation(layer) -> None:
        refreshing.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass  # what redis-py's wait_for does when the reply and the cancellation arrive together

    slots.refresh = refresh_losing_the_cancellation
    task = asyncio.get_running_loop().create_task(slots._refresh_while_held(InMemoryChannelLayer()))
    await asyncio.wait_for(refreshing.wait(), 2)
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    slots.held = {}  # without the fix the loop carries on: this lets it end after the test failed
    assert task.cancelled()
