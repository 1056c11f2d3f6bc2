"""The per-user history and the cursor: one contract over the Redis and in-memory histories.

The Redis history runs against the real Redis (and two private servers for
sharding); the in-memory one is what the demo's embedded default uses.
"""

from __future__ import annotations

import asyncio

import pytest
from django.test import override_settings

from channel_registry.delivery.fanout import send_batches
from channel_registry.exceptions import ChannelLayerUnavailable
from channel_registry.history.cursor import Cursor
from channel_registry.history.log import (
    HEAD_TTL,
    RESET_EPOCH,
    RESET_EXPIRED,
    RESET_INVALID,
    RESET_TOO_MANY,
    MemoryHistory,
    Position,
    Recovery,
    RedisHistory,
    history_for,
    position_for,
    stamped,
)
from channel_registry.protocol import POSITION_KEY, PROTOCOL_VERSION

from . import test_delivery
from .backends import GroupBackend, MappingBackend
from .processes import await_until
from .test_delivery import host

make_layer = test_delivery.make_layer
two_servers = test_delivery.two_servers

EVENT = {"type": "registry.notify", "data": "x"}


@pytest.fixture(params=["redis", "memory"])
def history(request, make_layer):
    return RedisHistory(make_layer()) if request.param == "redis" else MemoryHistory()


async def send(history, user, count: int) -> list[Position]:
    return [(await history.append([user], {**EVENT, "n": n}))[user] for n in range(count)]


async def test_sequence_is_gap_free_per_user_within_one_epoch(history):
    alice = await send(history, 1, 3)
    bob = await send(history, 2, 2)
    assert [p.seq for p in alice] == [1, 2, 3] and [p.seq for p in bob] == [1, 2]
    assert len({p.epoch for p in alice}) == 1
    assert (await history.read(1, None)).head == alice[-1]


async def test_a_new_user_has_a_position_before_any_event(history):
    head = (await history.read(7, None)).head
    assert head.seq == 0
    assert (await history.read(7, None)).head == head  # the epoch is kept, not drawn again
    assert (await history.append([7], EVENT))[7] == Position(head.epoch, 1)


async def test_reading_after_a_position_returns_the_missed_events_in_order_with_their_positions(history):
    positions = await send(history, 1, 5)
    recovery = await history.read(1, positions[1])
    assert recovery.reset is None and recovery.head == positions[-1]
    assert [e["n"] for e in recovery.events] == [2, 3, 4]
    assert [e[POSITION_KEY] for e in recovery.events] == [[p.epoch, p.seq] for p in positions[2:]]
    assert (await history.read(1, positions[-1])).events == []


async def test_one_append_serves_many_users_each_with_its_own_position(history):
    await send(history, 1, 2)
    positions = await history.append([1, 2, 3], EVENT)
    assert {user: p.seq for user, p in positions.items()} == {1: 3, 2: 1, 3: 1}


@pytest.mark.parametrize("case", ["foreign epoch", "ahead", "too many", "older than kept", "expired"])
async def test_positions_that_cannot_be_honoured_say_why(history, case):
    options = {"HISTORY_SIZE": 5, "RECOVERY_LIMIT": 5, "HISTORY_TTL": 600}
    if case == "too many":
        options["HISTORY_SIZE"] = 10
    if case == "expired":
        options["HISTORY_TTL"] = 0.3
    with override_settings(CHANNEL_REGISTRY=options):
        positions = await send(history, 1, 4)
        head = positions[-1]
        since, reason = {
            "foreign epoch": (Position("f00d", 2), RESET_EPOCH),
            "ahead": (Position(head.epoch, 9), RESET_INVALID),
            "too many": (Position(head.epoch, 0), None),  # 4 behind: within the limit
            "older than kept": (Position(head.epoch, 0), None),
            "expired": (Position(head.epoch, 1), RESET_EXPIRED),
        }[case]
        if case == "too many":
            await send(history, 1, 2)  # now 6 behind a limit of 5, all 6 kept
            reason = RESET_TOO_MANY
        if case == "older than kept":
            await send(history, 1, 2)  # 6 behind, 5 kept: the one after it is gone
            reason = RESET_EXPIRED
        if case == "expired":
            await asyncio.sleep(0.4)  # past HISTORY_TTL
        recovery = await history.read(1, since)
    assert recovery.reset == reason
    assert recovery.events == []
    assert recovery.head.seq == (await history.read(1, None)).head.seq


async def test_redis_history_is_bounded_in_length_and_time(make_layer):
    layer = make_layer()
    history = RedisHistory(layer)
    with override_settings(CHANNEL_REGISTRY={"HISTORY_SIZE": 5, "RECOVERY_LIMIT": 5, "HISTORY_TTL": 60}):
        await send(history, 1, 7)
    shard, head_key, stream_key = history.keys(1)
    connection = layer.connection(shard)
    assert await connection.xlen(stream_key) == 5
    assert 0 < await connection.ttl(stream_key) <= 60
    assert await connection.ttl(head_key) > 3600  # the epoch outlives the events


async def test_memory_history_forgets_as_redis_expires(monkeypatch):
    """Issue 17, item 8: ``MemoryHistory`` kept every user it ever saw. Now the events go
    ``HISTORY_TTL`` after the newest one (the bulk: 1,000 users x 20 events here), and the
    user's epoch and seq ``HEAD_TTL`` after their history was last used, like Redis's keys."""
    clock = [1_000_000.0]
    monkeypatch.setattr("channel_registry.history.log.time.time", lambda: clock[0])
    history = MemoryHistory()
    with override_settings(CHANNEL_REGISTRY={"HISTORY_TTL": 600}):
        for _ in range(20):
            await history.append(range(1000), EVENT)
        quiet = Position(history.users[0].epoch, 20)

        clock[0] += 599  # user 1 keeps receiving
        await history.append([1], EVENT)
        assert sum(len(user.events) for user in history.users.values()) == 20 * 1000 + 1

        # More than 600 s after the 20 events, by the next pass: only user 1's are kept.
        clock[0] += MemoryHistory.PRUNE_EVERY + 1
        await history.read(0, None)
        assert [len(history.users[n].events) for n in range(3)] == [0, 21, 0]
        assert sum(len(user.events) for user in history.users.values()) == 21
        # A quiet tab still resumes in its epoch: nothing it missed, so no reset.
        assert (await history.read(0, quiet)) == Recovery(Position(quiet.epoch, 20))

        clock[0] += HEAD_TTL + 1
        await history.read(0, None)
        assert list(history.users) == [0]  # everyone else forgotten; user 0 was just read


async def test_a_lost_redis_history_starts_a_new_epoch(make_layer):
    layer = make_layer()
    history = RedisHistory(layer)
    before = await send(history, 1, 3)
    await layer.flush()  # what a Redis restart without persistence, or FLUSHALL, does
    after = (await history.append([1], EVENT))[1]
    assert after.epoch != before[-1].epoch and after.seq == 1
    assert (await history.read(1, before[-1])).reset == RESET_EPOCH


async def test_sharded_layer_keeps_each_history_on_the_shard_of_its_user(two_servers, make_layer):
    layer = make_layer(hosts=[host(server.url) for server in two_servers])
    history = RedisHistory(layer)
    users = list(range(1, 21))
    positions = await history.append(users, EVENT)
    assert all(p.seq == 1 for p in positions.values())
    shards = {history.keys(user)[0] for user in users}
    assert shards == {0, 1}
    for user in users:
        assert len((await history.read(user, Position(positions[user].epoch, 0))).events) == 1


async def test_unreachable_redis_raises_channel_layer_unavailable(make_layer):
    history = RedisHistory(make_layer(hosts=[host("redis://127.0.0.1:1", socket_connect_timeout=0.5)]))
    with pytest.raises(ChannelLayerUnavailable):
        await history.append([1], EVENT)


def test_history_is_off_when_disabled_or_the_layer_keeps_none(make_layer):
    from channels_redis.pubsub import RedisPubSubChannelLayer

    assert history_for(RedisPubSubChannelLayer(hosts=[host()])) is None
    with override_settings(CHANNEL_REGISTRY={"HISTORY": False}):
        assert history_for(make_layer()) is None


# The cursor: what one connection passes on --------------------------------------------


def positions(events) -> list:
    return [e.get(POSITION_KEY, [None, None])[1] if POSITION_KEY in e else e["type"] for e in events]


async def test_cursor_drops_duplicates_and_fills_a_gap_from_the_history(history):
    cursor = Cursor(history, 1)
    assert await cursor.start(None) == [
        {"type": "registry.position", "epoch": cursor.position.epoch, "seq": 0, "protocol": PROTOCOL_VERSION}
    ]
    stamped = []
    for n in range(4):
        position = (await history.append([1], {**EVENT, "n": n}))[1]
        stamped.append({**EVENT, "n": n, POSITION_KEY: {"1": [position.epoch, position.seq], "2": ["other", 9]}})
    assert positions(await cursor.admit(stamped[0])) == [1]
    assert await cursor.admit(stamped[0]) == []  # already passed
    # 4 arrives before 2 and 3 (another sender's): they come from the history, in order.
    assert positions(await cursor.admit(stamped[3])) == [2, 3, 4]
    assert await cursor.admit(stamped[1]) == [] and await cursor.admit(stamped[2]) == []
    assert await cursor.admit({"type": "demo.presence"}) == [{"type": "demo.presence"}]  # not recoverable


async def test_cursor_resumes_after_the_clients_position_then_says_how_many(history):
    sent = await send(history, 1, 5)
    cursor = Cursor(history, 1)
    first = await cursor.start(str(sent[1]))
    assert positions(first) == [3, 4, 5, "registry.recovered"]
    head = {"epoch": sent[0].epoch, "seq": 5, "protocol": PROTOCOL_VERSION}
    assert first[-1] == {"type": "registry.recovered", "count": 3, **head}
    assert await cursor.start(str(sent[-1])) == [{"type": "registry.recovered", "count": 0, **head}]


@pytest.mark.parametrize("since", ["garbage", "abc:", ":4", "abc:-1", "x" * 70 + ":1"])
async def test_cursor_answers_a_malformed_position_with_a_reset(history, since):
    await send(history, 1, 2)
    [reset] = await Cursor(history, 1).start(since)
    assert reset["type"] == "registry.reset" and reset["reason"] == RESET_INVALID and reset["seq"] == 2


async def test_cursor_reports_a_history_lost_while_connected(make_layer):
    layer = make_layer()
    history = RedisHistory(layer)
    cursor = Cursor(history, 1)
    await cursor.start(None)
    await send(history, 1, 1)
    await layer.flush()
    new = await send(history, 1, 2)
    out = await cursor.admit({**EVENT, POSITION_KEY: {"1": [new[1].epoch, 2]}})
    # Only the frame a connection starts with announces the protocol version.
    assert out[0] == {"type": "registry.reset", "epoch": new[0].epoch, "seq": 0, "reason": RESET_EPOCH}
    assert positions(out[1:]) == [1, 2]


# Sending one event per user with its own position ---------------------------------------


async def test_send_batches_gives_each_user_their_own_message_on_one_process_key(make_layer):
    layer = make_layer()
    a, b = await layer.new_channel(), await layer.new_channel()  # one process: one Redis key
    assert await send_batches(layer, [({"type": "t", "seq": 1}, [a]), ({"type": "t", "seq": 9}, [b])]) == []
    assert await layer.receive(a) == {"type": "t", "seq": 1}
    assert await layer.receive(b) == {"type": "t", "seq": 9}


# Through the consumers: the same history serves both strategies ------------------------


class ResumeContract:
    """The same history serves every strategy: a subclass per strategy names its consumer and dispatcher."""

    @pytest.mark.django_db(transaction=True)
    async def test_both_consumers_resume_from_the_same_history(self, connect, alice):
        tab = await connect(alice, consumer=self.consumer)
        epoch = tab.position["epoch"]
        await tab.disconnect()
        for n in range(3):
            await self.dispatcher.anotify_user(alice, n)
        await self.dispatcher.asend_to_user(alice, {"type": "registry.notify", "data": "typing"}, recover=False)

        back = await connect(alice, consumer=self.consumer, since=f"{epoch}:1")
        frames = [await back.receive_json_from() for _ in range(3)]
        assert frames == [
            {"type": "notification", "data": 1, "epoch": epoch, "seq": 2},
            {"type": "notification", "data": 2, "epoch": epoch, "seq": 3},
            {"type": "recovered", "count": 2, "epoch": epoch, "seq": 3, "protocol": PROTOCOL_VERSION},
        ]
        await self.dispatcher.anotify_user(alice, "live")
        assert await back.receive_json_from() == {"type": "notification", "data": "live", "epoch": epoch, "seq": 4}
        assert await back.receive_nothing()


class TestMappingConsumer(MappingBackend, ResumeContract):
    """``RegistryConsumer``, sent to through ``dispatch.mapping``."""


class TestGroupConsumer(GroupBackend, ResumeContract):
    """``GroupConsumer``, sent to through ``groups.groups``."""


async def direct_to(sender, recipient, n: int) -> dict:
    """Send direct message ``n`` through ``sender``'s socket; its ack."""
    await sender.send_json_to({"type": "direct", "to": recipient.pk, "message": f"m{n}", "id": n})
    return await sender.receive_json_from(5)


@pytest.mark.django_db(transaction=True)
async def test_a_tab_that_joins_between_the_lookup_and_the_append_gets_the_message_live_once(
    connect, alice, bob, monkeypatch
):
    """The rare interleaving of ``cursor.py``, made deterministic: bob's second tab registers
    and reads its history right after the sender's lookup (which cannot have found it) and
    before the append, so neither the lookup nor its history read has the message. The
    history's ``joins`` moved: the send looks the channels up again and the tab gets it live."""
    from channel_registry.delivery.mapping import MappingStrategy

    sender, first = await connect(alice), await connect(bob)
    assert (await direct_to(sender, bob, 0))["delivered"] == 1  # the sender's process has seen bob's head
    assert (await first.receive_json_from(5))["message"] == "m0"
    lookup, late = MappingStrategy.resolve, []

    async def lookup_then_a_tab_joins(self, user_id):
        found = await lookup(self, user_id)
        late.append(await connect(bob))  # registered and read its history: position at m0
        return found

    monkeypatch.setattr(MappingStrategy, "resolve", lookup_then_a_tab_joins)
    assert (await direct_to(sender, bob, 1))["delivered"] == 2
    (tab,) = late
    assert tab.position["seq"] == 1
    for socket in (first, tab):
        frame = await socket.receive_json_from(5)
        assert (frame["message"], frame["seq"]) == ("m1", 2)
        assert await socket.receive_nothing()


@pytest.mark.django_db(transaction=True)
async def test_a_head_moved_by_another_process_costs_a_call_never_a_wrong_position(connect, alice, bob):
    """The script sends only the position it hands out: after another process appended to bob's
    history, this process's guess is one short; the message goes out with its own number, and
    the tab fills the gap from the history first."""
    from channel_registry.delivery.strategy import channel_layer

    layer = channel_layer()
    if not isinstance(history_for(layer), RedisHistory):
        pytest.skip("one process's in-memory history cannot be appended to by another")
    sender, tab = await connect(alice), await connect(bob)
    assert (await direct_to(sender, bob, 0))["delivered"] == 1
    assert (await tab.receive_json_from(5))["seq"] == 1
    await RedisHistory(layer).append([bob.pk], {"type": "registry.notify", "data": "elsewhere"})

    assert (await direct_to(sender, bob, 1))["delivered"] == 1
    gap, frame = await tab.receive_json_from(5), await tab.receive_json_from(5)
    assert (gap["data"], gap["seq"]) == ("elsewhere", 2)
    assert (frame["message"], frame["seq"]) == ("m1", 3)
    assert await tab.receive_nothing()


@pytest.mark.django_db(transaction=True)
async def test_a_copy_put_straight_into_a_local_buffer_overtakes_copies_still_in_redis_and_loses_none(
    connect, alice, bob, monkeypatch
):
    """A copy for a channel of the sender's own process skips Redis, so it can arrive before
    earlier events whose copies still travel through Redis: here another process's event
    (seq 2) and a send of this process that found the head moved and went through Redis
    (seq 3) are held in the reader until bob's tab has the local copy of seq 4. The tab
    fills the gap from the history, in order, and drops the late copies."""
    from channel_registry.delivery.mapping import MappingStrategy
    from channel_registry.delivery.strategy import channel_layer

    layer = channel_layer()
    if not hasattr(layer, "put_local"):
        pytest.skip("only a batched Redis layer puts copies into its own buffers")
    sender, tab = await connect(alice), await connect(bob)
    assert (await direct_to(sender, bob, 0))["delivered"] == 1
    assert (await tab.receive_json_from(5))["seq"] == 1
    held, two_held, fetched = [], asyncio.Event(), layer._buffer

    def hold(process_channel, content):
        held.append((process_channel, content))
        if len(held) == 2:
            two_held.set()

    monkeypatch.setattr(layer, "_buffer", hold)
    elsewhere = {"type": "registry.notify", "data": "elsewhere"}
    positions = await RedisHistory(layer).append([bob.pk], elsewhere)  # another process: seq 2, sent...
    await MappingStrategy().route([bob.pk], elsewhere, positions)  # ...through Redis
    assert (await direct_to(sender, bob, 1))["delivered"] == 1  # seq 3: the head moved, sent through Redis
    await asyncio.wait_for(two_held.wait(), 5)
    assert (await direct_to(sender, bob, 2))["delivered"] == 1  # seq 4: straight into the tab's buffer

    frames = [await tab.receive_json_from(5) for _ in range(3)]
    assert [(frame.get("data") or frame["message"], frame["seq"]) for frame in frames] == [
        ("elsewhere", 2),
        ("m1", 3),
        ("m2", 4),
    ]
    assert len(held) == 2  # seq 4 never went through the reader
    for process_channel, content in held:
        fetched(process_channel, content)
    assert await tab.receive_nothing()


@pytest.mark.django_db(transaction=True)
async def test_a_fan_out_with_history_is_still_one_message_per_server_process(make_user, layer):
    """Each user's position rides in the process's one message; each connection reads its own."""
    from asgiref.sync import sync_to_async
    from channels_redis.core import RedisChannelLayer

    from channel_registry import asend_to_users
    from channel_registry.models import UserChannel

    users = [await sync_to_async(make_user)() for _ in range(30)]
    channels = {}
    for user in users:
        channels[user.pk] = await layer.new_channel()  # all of this process: one Redis key
        await UserChannel.objects.acreate(user=user, channel_name=channels[user.pk], server="test")
    await asend_to_users(users[:10], EVENT)  # the first ten are one event ahead

    delivery = await asend_to_users(users, EVENT)

    assert delivery.sent == 30 and delivery.failed == []
    if isinstance(layer, RedisChannelLayer):
        key = layer.prefix + layer.non_local_name(channels[users[0].pk])
        assert await layer.connection(0).zcard(key) == 2  # two fan-outs, one message each (one Redis host)
    for user in users:
        received = [await layer.receive(channels[user.pk]) for _ in range(2 if user in users[:10] else 1)]
        assert position_for(received[-1], user.pk).seq == (2 if user in users[:10] else 1)


# Bytes: what one event, one user's history and one sender may hold (issue 17) ----------

BYTES = {"HISTORY_MAX_BYTES": 10_000, "HISTORY_SIZE": 100, "RECOVERY_LIMIT": 100, "HISTORY_EVENT_MAX_BYTES": 2_000}


def sized(n: int, size: int = 900) -> dict:
    return {**EVENT, "n": n, "data": "x" * size}


async def test_a_history_keeps_at_most_its_bytes_and_drops_the_oldest_first(history):
    with override_settings(CHANNEL_REGISTRY=BYTES):
        sent = [(await history.append([1], sized(n)))[1] for n in range(20)]  # ~18 KB into a 10 KB window
        assert (await history.read(1, Position(sent[0].epoch, 0))).reset == RESET_EXPIRED
        kept = (await history.read(1, sent[9])).events
    assert [e["n"] for e in kept] == list(range(10, 20))  # ten of ~950 bytes fit; the rest went first


async def test_an_event_too_large_to_keep_keeps_its_number_and_a_resume_across_it_resets(history):
    with override_settings(CHANNEL_REGISTRY=BYTES):
        before = (await history.append([1], sized(0)))[1]
        huge = (await history.append([1], sized(1, 5_000)))[1]
        after = (await history.append([1], sized(2)))[1]
        assert huge.seq == before.seq + 1 and after.seq == huge.seq + 1
        assert (await history.read(1, before)).reset == RESET_EXPIRED  # never a silent gap
        assert [e["n"] for e in (await history.read(1, huge)).events] == [2]


async def test_a_resume_past_the_replay_bytes_is_a_too_many_reset(history):
    with override_settings(CHANNEL_REGISTRY={**BYTES, "RECOVERY_MAX_BYTES": 3_000}):
        sent = [(await history.append([1], sized(n)))[1] for n in range(5)]
        assert (await history.read(1, sent[0])).reset == RESET_TOO_MANY  # 4 x ~950 bytes
        assert [e["n"] for e in (await history.read(1, sent[1])).events] == [2, 3, 4]


async def test_a_sender_holds_at_most_its_share_of_a_history_and_others_keep_theirs(history):
    with override_settings(CHANNEL_REGISTRY={**BYTES, "HISTORY_SENDER_SHARE": 0.25}):
        start = (await history.read(1, None)).head
        flood = [await history.append([1], sized(n), sender="mallory") for n in range(6)]
        # 2,500 bytes: two events of ~950, and a third over the share, refused for this user only.
        assert [bool(positions) for positions in flood] == [True, True, False, False, False, False]
        assert set(await history.append([1, 2], sized(6), sender="mallory")) == {2}
        for n in range(7):  # everyone else still fills the window
            assert await history.append([1], sized(100 + n), sender=f"friend{n}")
        # Tiny messages count against the event window: each weighs at least 10,000 / 100 bytes.
        assert len([1 for n in range(40) if await history.append([3], {**EVENT, "n": n}, sender="mallory")]) == 25
        replay = (await history.read(1, start)).events
    assert [e["n"] for e in replay] == [0, 1, *range(100, 107)]


async def test_a_stream_that_expired_frees_every_senders_share(make_layer):
    layer = make_layer()
    history = RedisHistory(layer)
    with override_settings(CHANNEL_REGISTRY={**BYTES, "HISTORY_SENDER_SHARE": 0.25}):
        while await history.append([1], sized(0), sender="mallory"):
            pass
        shard, _, stream_key = history.keys(1)
        await layer.connection(shard).delete(stream_key)  # what HISTORY_TTL after the last event does
        assert await history.append([1], sized(1), sender="mallory")


async def test_an_event_is_stored_at_about_the_size_of_its_json(make_layer):
    """msgpack spends 9 bytes on a float that JSON writes as ``0.0``: a frame of floats was 2.25x."""
    import json

    layer = make_layer()
    history = RedisHistory(layer)
    frame = {"type": "direct", "from": 1, "message": [0.0] * 3_000, "id": "x"}
    await history.append([1], {"type": "registry.direct", "frame": frame})
    shard, _, stream_key = history.keys(1)
    [(_, fields)] = await layer.connection(shard).xrange(stream_key)
    assert len(fields[b"e"]) <= len(json.dumps(frame, separators=(",", ":"))) + 100
    [replayed] = (await history.read(1, Position((await history.read(1, None)).head.epoch, 0))).events
    assert replayed["frame"] == frame


async def test_redis_out_of_memory_is_unavailable_never_a_crash(make_layer):
    """At ``maxmemory`` Redis refuses writes with ``OOM command not allowed``: an outage like any other."""
    from .redis_servers import RedisServer

    with RedisServer() as server:
        layer = make_layer(hosts=[host(server.url)])
        history = RedisHistory(layer)
        await history.append([1], EVENT)
        connection = layer.connection(0)
        await connection.config_set("maxmemory", 1)  # below what is used: every write is refused
        from channel_registry.delivery import budget

        writes = (history.append([1], EVENT), history.read(2, None), budget.spend(layer, 1, [budget.Spend("x", 5, 60)]))
        for write in writes:
            with pytest.raises(ChannelLayerUnavailable, match="out of memory"):
                await write
        await connection.config_set("maxmemory", 0)
        assert (await history.append([1], EVENT))[1].seq == 2


async def test_a_redis_restarted_from_a_snapshot_behind_the_last_appends_starts_a_new_epoch(make_layer):
    """The snapshot holds seq 5, the open connection passed seq 10: the next event must not be a second 6."""
    from .redis_servers import RedisServer

    with RedisServer() as server:
        layer = make_layer(hosts=[host(server.url, protocol=2)])
        history = RedisHistory(layer)
        cursor = Cursor(history, 1)
        await cursor.start(None)
        for n in range(10):
            if n == 5:
                await layer.connection(0).save()
            event = {**EVENT, "n": n}
            assert await cursor.admit(stamped(event, await history.append([1], event))) != []
        before = cursor.position
        server.restart()  # loads the snapshot: the head went back to seq 5, in the same epoch
        await layer.close_pools()
        assert await layer.connection(0).hget(history.keys(1)[1], "seq") == b"5"
        event = {**EVENT, "n": "after"}
        after = (await history.append([1], event))[1]
        assert after.epoch != before.epoch and after.seq == 1
        frames = await cursor.admit(stamped(event, {1: after}))
        assert [f.get("reason") for f in frames] == [RESET_EPOCH, None] and frames[1]["n"] == "after"


async def replicated(replica, head_key: str, seq: int) -> None:
    """Waits until the replica holds ``seq``. (``WAIT`` would not do: it counts the writes of the connection it is
    sent on, and the pool may send it on one that wrote nothing.)"""

    async def holds_seq() -> bool:
        return (await replica.hget(head_key, "seq") or b"0") == str(seq).encode()

    await await_until(holds_seq, within=10, interval=0.01, message=f"the replica never reached seq {seq}")


@pytest.mark.parametrize("replica_missed_writes", [True, False])
async def test_a_promoted_replica_never_continues_the_old_master_s_epoch(make_layer, replica_missed_writes):
    """A promoted replica's heads were written by another term; what it missed cannot be known, so every history
    starts again: a reconnecting client gets ``reset``, and no number of the old epoch is handed out twice."""
    from .redis_servers import RedisServer

    with RedisServer() as master, RedisServer() as replica:
        on_master = RedisHistory(make_layer(hosts=[host(master.url, protocol=2)]))
        on_replica = RedisHistory(make_layer(hosts=[host(replica.url, protocol=2)]))
        replica_connection = on_replica.layer.connection(0)
        await replica_connection.replicaof("127.0.0.1", master.port)
        head_key = on_replica.keys(1)[1]
        await send(on_master, 1, 5)
        await replicated(replica_connection, head_key, 5)
        if replica_missed_writes:
            await replica_connection.replicaof("NO", "ONE")  # promoted before the master's last five
            last = (await send(on_master, 1, 5))[-1]
            assert int(await replica_connection.hget(head_key, "seq")) == 5
        else:
            last = (await send(on_master, 1, 5))[-1]
            await replicated(replica_connection, head_key, 10)
            await replica_connection.replicaof("NO", "ONE")
        recovery = await on_replica.read(1, last)
        assert recovery.reset == RESET_EPOCH and recovery.head.epoch != last.epoch
        assert (await on_replica.append([1], EVENT))[1] == Position(recovery.head.epoch, 1)
