"""The registry core: rows follow connections, dispatch reaches every live one."""

import asyncio
from datetime import timedelta
from unittest.mock import ANY

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from channel_registry import (
    Delivery,
    anotify_user,
    asend_to_user,
    asend_to_users,
    is_online,
    online_user_ids,
    prune_stale,
    send_to_user,
    send_to_users,
)
from channel_registry.consumers import RegistryConsumer
from channel_registry.models import UserChannel
from channel_registry.protocol import POSITION_KEY
from channel_registry.registry.liveness import process
from channel_registry.signals import user_offline, user_online

from .conftest import at, rows

pytestmark = pytest.mark.django_db(transaction=True)

EVENT = {"type": "registry.notify", "data": {"text": "hello"}}


async def test_connect_writes_a_row_for_the_user(connect, alice):
    socket = await connect(alice)
    [row] = await rows(user=alice)
    assert row.server == process.server
    assert row.channel_name in process.open
    await socket.send_json_to({"type": "ping"})
    assert await socket.receive_json_from() == {"type": "pong"}


async def test_two_tabs_both_receive_one_send(connect, alice, bob):
    tabs = [await connect(alice), await connect(alice)]
    other = await connect(bob)
    assert len(await rows(user=alice)) == 2

    delivery = await asend_to_user(alice, EVENT)

    assert delivery == Delivery(channels=2, sent=2, failed=[])
    for tab in tabs:
        assert await tab.receive_json_from() == {"type": "notification", "data": {"text": "hello"}, **at(tab, 1)}
    assert await other.receive_nothing()


async def test_user_may_be_given_by_primary_key(connect, alice):
    tab = await connect(alice)
    assert (await anotify_user(alice.pk, [1, 2])).sent == 1
    assert await tab.receive_json_from() == {"type": "notification", "data": [1, 2], **at(tab, 1)}


async def test_clean_close_deletes_the_row(connect, alice):
    socket = await connect(alice)
    await socket.disconnect(code=1000)
    assert await rows(user=alice) == []
    assert process.open == {}


async def test_dropped_connection_deletes_the_row(connect, alice):
    socket = await connect(alice)
    await socket.send_input({"type": "websocket.disconnect", "code": 1006})
    await socket.wait(timeout=2)
    assert await rows(user=alice) == []


class Exploding(RegistryConsumer):
    async def receive_ping(self, payload):
        raise RuntimeError("a bug in a subclass")


async def test_exception_in_consumer_deletes_the_row(connect, alice):
    socket = await connect(alice, consumer=Exploding)
    await socket.send_json_to({"type": "ping"})
    with pytest.raises(RuntimeError):
        await socket.wait(timeout=2)
    assert await rows(user=alice) == []


async def test_anonymous_is_refused_with_4401_and_writes_nothing(connect):
    socket = await connect(None)
    assert await socket.receive_output() == {"type": "websocket.close", "code": 4401}
    assert await rows() == []


async def test_database_down_at_connect_closes_4503_and_leaves_nothing(connect, alice, database_unreachable):
    async with database_unreachable():
        socket = await connect(alice)
        assert await socket.receive_output(timeout=10) == {"type": "websocket.close", "code": 4503}
    assert await rows() == []
    assert process.open == {}
    # And the next connection, with the database back, works.
    await connect(alice)
    assert len(await rows(user=alice)) == 1


async def test_offline_user_gets_an_empty_delivery(alice):
    assert await asend_to_user(alice, EVENT) == Delivery(channels=0, sent=0, failed=[])
    assert await asend_to_users([], EVENT) == Delivery(channels=0, sent=0, failed=[])


def make_stale(**filters):
    return UserChannel.objects.filter(**filters).update(last_seen=timezone.now() - timedelta(hours=1))


async def test_stale_row_is_skipped_by_dispatch_and_pruned(connect, alice):
    live = await connect(alice)
    dead = await connect(alice)
    await sync_to_async(make_stale)(channel_name=dead.channel_name)

    assert (await asend_to_user(alice, EVENT)).channels == 1
    assert await live.receive_json_from()
    assert await dead.receive_nothing()
    assert await sync_to_async(prune_stale)() == 1
    assert [r.channel_name for r in await rows(user=alice)] == [live.channel_name]


def test_prune_command_and_dry_run(make_user, capsys):
    user = make_user()
    UserChannel.objects.create(user=user, channel_name="specific.a!1", server="dead")
    UserChannel.objects.create(user=user, channel_name="specific.a!2", server="dead")
    make_stale()
    UserChannel.objects.create(user=user, channel_name="specific.a!3", server="alive")

    call_command("prune_channels", "--dry-run")
    assert "2 stale channel(s) would be deleted" in capsys.readouterr().out
    assert UserChannel.objects.count() == 3

    call_command("prune_channels")
    assert "Deleted 2 stale channel(s)" in capsys.readouterr().out
    assert list(UserChannel.objects.values_list("channel_name", flat=True)) == ["specific.a!3"]


def test_prune_older_than_and_batches(make_user, settings):
    settings.CHANNEL_REGISTRY = {"PRUNE_BATCH_SIZE": 7}
    users = [make_user() for _ in range(5)]
    UserChannel.objects.bulk_create(
        UserChannel(user=users[i % 5], channel_name=f"specific.x!{i}", server="dead") for i in range(30)
    )
    UserChannel.objects.update(last_seen=timezone.now() - timedelta(seconds=20))
    assert prune_stale(older_than=60) == 0
    with CaptureQueriesContext(connection) as queries:
        assert prune_stale(older_than=10) == 30
    deletes = [q["sql"] for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 5  # ceil(30 / 7): bounded batches, never one huge statement
    assert UserChannel.objects.count() == 0


async def test_presence_signals_fire_once_per_transition(connect, alice, bob, presence_events):
    first = await connect(alice)
    second = await connect(alice)
    await connect(bob)
    assert presence_events == [("online", alice.pk), ("online", bob.pk)]

    await first.disconnect()
    assert presence_events[2:] == []
    await second.disconnect()
    assert presence_events[2:] == [("offline", alice.pk)]


async def test_prune_sends_offline_only_for_users_left_without_rows(connect, alice, bob, presence_events):
    await connect(alice)
    await connect(bob)
    tab = await connect(bob)
    await sync_to_async(make_stale)(user=alice)
    await sync_to_async(make_stale)(channel_name=tab.channel_name)
    presence_events.clear()

    assert await sync_to_async(prune_stale)() == 2
    assert presence_events == [("offline", alice.pk)]


@pytest.mark.parametrize("native", [True, False], ids=["native-postgres", "orm"])
async def test_concurrent_tabs_fire_exactly_one_online_and_one_offline(
    connect, alice, presence_events, settings, native
):
    settings.CHANNEL_REGISTRY = {"NATIVE_POSTGRES": native}
    tabs = await asyncio.gather(*(connect(alice) for _ in range(5)))
    assert presence_events == [("online", alice.pk)]
    await asyncio.gather(*(tab.disconnect() for tab in tabs))
    assert presence_events == [("online", alice.pk), ("offline", alice.pk)]


def test_send_to_users_uses_one_registry_query(make_user, layer):
    users = [make_user() for _ in range(4)]
    names = []
    for user in users:
        for _ in range(2):
            name = async_to_sync(layer.new_channel)()
            UserChannel.objects.create(user=user, channel_name=name, server="test")
            names.append(name)

    with CaptureQueriesContext(connection) as queries:
        delivery = send_to_users(users, EVENT)
    assert len(queries) == 1
    assert delivery == Delivery(channels=8, sent=8, failed=[])

    async def receive_all():
        return [await layer.receive(name) for name in names]

    received = async_to_sync(receive_all)()
    # One event, stamped with each user's own position in their history.
    assert [{**event, POSITION_KEY: None} for event in received] == [{**EVENT, POSITION_KEY: None}] * 8
    for user, event in zip([u for u in users for _ in range(2)], received, strict=True):
        assert event[POSITION_KEY][str(user.pk)][1] == 1


def test_sync_api_from_plain_code(make_user, layer):
    user = make_user()
    name = async_to_sync(layer.new_channel)()
    UserChannel.objects.create(user=user, channel_name=name, server="test")
    assert is_online(user) and online_user_ids() == {user.pk}
    assert send_to_user(user, {"type": "x.y", "n": 1}) == Delivery(channels=1, sent=1, failed=[])
    assert send_to_user(user, {"type": "x.y", "n": 2}, recover=False) == Delivery(channels=1, sent=1, failed=[])

    async def receive_two():  # in one event loop: channels_redis cleans up after a receive in the background
        return [await layer.receive(name), await layer.receive(name)]

    recoverable = {"type": "x.y", "n": 1, POSITION_KEY: {str(user.pk): [ANY, 1]}}
    assert async_to_sync(receive_two)() == [recoverable, {"type": "x.y", "n": 2}]
    make_stale()
    assert not is_online(user) and online_user_ids() == set()


@pytest.mark.parametrize(
    ("event", "error", "words"),
    [
        ("hello", TypeError, "must be a dict"),
        (["type", "x"], TypeError, "must be a dict"),
        ({"data": 1}, ValueError, "'type' key"),
        ({"type": ""}, ValueError, "'type' key"),
        ({"type": 3}, ValueError, "'type' key"),
        ({"type": "a.b", "__asgi_channel__": "x"}, ValueError, "reserved"),
    ],
)
async def test_bad_events_raise_documented_errors(alice, event, error, words):
    with pytest.raises(error, match=words):
        await asend_to_user(alice, event)


async def test_a_failing_presence_receiver_breaks_nothing(connect, alice, caplog):
    def broken(**kwargs):
        raise RuntimeError("receiver bug")

    user_online.connect(broken, weak=False)
    user_offline.connect(broken, weak=False)
    try:
        socket = await connect(alice)
        assert (await asend_to_user(alice, EVENT)).sent == 1
        await socket.disconnect()
    finally:
        user_online.disconnect(broken)
        user_offline.disconnect(broken)
    assert await rows() == []
    assert "presence receiver" in caplog.text
