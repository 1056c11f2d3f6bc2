"""Per-user send budgets: one contract over both implementations.

``LocalBuckets`` (any layer but channels_redis) is driven with an explicit clock;
the Redis script runs against the real server with Redis's own clock, so its
tests use short periods and two layer instances standing for two processes.
"""

import asyncio
import os

import pytest
from channels.layers import InMemoryChannelLayer

from channel_registry.delivery.budget import LocalBuckets, Spend, spend
from channel_registry.layers import redis_layer

REAL = os.environ.get("CR_TEST_STACK", "real") == "real"


def test_a_burst_of_rate_then_refusal_with_the_wait():
    buckets = LocalBuckets()
    messages = [Spend("messages", 3, 6)]  # a token every 2 s
    assert [buckets.spend(1, messages, 100.0).allowed for _ in range(3)] == [True, True, True]
    refused = buckets.spend(1, messages, 100.0)
    assert not refused.allowed and refused.retry_after == pytest.approx(2)
    assert buckets.spend(1, messages, 101.9).allowed is False
    assert buckets.spend(1, messages, 102.0).allowed
    assert buckets.spend(2, messages, 102.0).allowed  # another user has a budget of their own


def test_a_cost_can_take_a_bucket_into_debt_that_later_spends_wait_out():
    buckets = LocalBuckets()
    copies = Spend("copies", 10, 10)
    assert buckets.spend(1, [Spend("copies", 10, 10, cost=0)], 0.0).allowed
    assert buckets.spend(1, [Spend("copies", 10, 10, cost=30, need=0)], 0.0).allowed  # 10 - 30 = -20
    waiting = buckets.spend(1, [copies], 0.0)
    assert waiting.retry_after == pytest.approx(21)  # from -20 back to 1, a token a second
    assert not buckets.spend(1, [copies], 20.9).allowed
    assert buckets.spend(1, [copies], 21.0).allowed


def test_spends_are_all_or_nothing():
    buckets = LocalBuckets()
    both = [Spend("messages", 5, 5), Spend("copies", 1, 10, cost=1)]
    assert buckets.spend(1, both, 0.0).allowed
    assert not buckets.spend(1, both, 0.0).allowed  # copies empty: messages untouched
    assert [buckets.spend(1, [Spend("messages", 5, 5)], 0.0).allowed for _ in range(5)] == [True] * 4 + [False]


def test_full_buckets_are_forgotten_when_many_are_held(monkeypatch):
    monkeypatch.setattr(LocalBuckets, "PRUNE_AT", 3)
    buckets = LocalBuckets()
    item = [Spend("messages", 1, 1)]
    for user in range(3):
        buckets.spend(user, item, 0.0)
    buckets.spend(99, item, 5.0)  # the first three refilled long ago
    assert list(buckets.levels) == [(99, "messages")]


async def test_the_in_memory_layer_keeps_one_budget_per_layer():
    first, second = InMemoryChannelLayer(), InMemoryChannelLayer()
    item = [Spend("messages", 1, 60)]
    assert (await spend(first, 1, item)).allowed
    assert not (await spend(first, 1, item)).allowed
    assert (await spend(second, 1, item)).allowed


@pytest.mark.skipif(not REAL, reason="the Redis script needs the real Redis (CR_TEST_STACK=real)")
async def test_redis_budget_is_shared_by_every_process_and_refills():
    from channels_redis.core import RedisChannelLayer

    config = redis_layer(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), prefix=f"crbudget{os.getpid()}")
    processes = [RedisChannelLayer(**config["CONFIG"]) for _ in range(2)]
    item = [Spend("messages", 4, 0.4)]  # a token every 0.1 s
    try:
        verdicts = [await spend(processes[i % 2], "u1", item) for i in range(5)]
        assert [v.allowed for v in verdicts] == [True] * 4 + [False]
        assert 0 < verdicts[-1].retry_after <= 0.1
        assert (await spend(processes[0], "u2", item)).allowed
        await asyncio.sleep(verdicts[-1].retry_after + 0.02)
        assert (await spend(processes[1], "u1", item)).allowed

        debt = [Spend("copies", 10, 1, cost=25, need=0)]
        assert (await spend(processes[0], "u3", debt)).allowed
        waiting = await spend(processes[1], "u3", [Spend("copies", 10, 1, cost=0)])
        assert not waiting.allowed and 1.5 <= waiting.retry_after <= 1.61  # -15 back to 1
        key = f"crbudget{os.getpid()}registry.budget.u3.copies"
        ttl = await processes[0].connection(0).pttl(key)
        assert 3000 < ttl <= 3500  # the key goes once the bucket would be full again (+1 s)
    finally:
        for layer in processes:
            await layer.flush()
            await layer.close_pools()


@pytest.mark.skipif(not REAL, reason="the Redis script needs the real Redis (CR_TEST_STACK=real)")
async def test_a_refusal_is_answered_in_the_process_until_its_wait_is_over_and_never_longer():
    """A flooding connection's frames are refused by ``RATE_LIMIT`` without a Redis round trip each."""
    from channels_redis.core import RedisChannelLayer

    config = redis_layer(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), prefix=f"crrefused{os.getpid()}")
    process, other = RedisChannelLayer(**config["CONFIG"]), RedisChannelLayer(**config["CONFIG"])
    asked = []
    connection = process.connection
    process.connection = lambda index: asked.append(index) or connection(index)
    item = [Spend("messages", 2, 0.6)]  # a token every 0.3 s
    try:
        assert [(await spend(process, "u1", item)).allowed for _ in range(2)] == [True, True]
        first = await spend(process, "u1", item)
        again = [await spend(process, "u1", item) for _ in range(20)]
        assert len(asked) == 3, "the refusals after the first were answered without Redis"
        assert not any(verdict.allowed for verdict in [first, *again])
        assert all(0 < verdict.retry_after <= first.retry_after for verdict in again)
        # Another spend (other needs, another user) still asks Redis.
        assert (await spend(process, "u2", item)).allowed and len(asked) == 4
        assert not (await spend(process, "u1", [Spend("messages", 2, 0.6, need=2)])).allowed and len(asked) == 5
        # Its wait over, the same spend succeeds, on this process and on any other.
        await asyncio.sleep(again[-1].retry_after + 0.02)
        assert (await spend(process, "u1", item)).allowed
        await asyncio.sleep(0.3)  # one more token
        assert (await spend(other, "u1", item)).allowed
    finally:
        for layer in (process, other):
            await layer.flush()
            await layer.close_pools()
