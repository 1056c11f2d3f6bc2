"""What keeps the registry true over time: heartbeat, forced disconnects, limits, dead processes, outages."""

import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from channel_registry import ChannelLayerUnavailable, asend_to_user
from channel_registry.layers import redis_layer
from channel_registry.models import UserChannel
from channel_registry.registry.liveness import beat, forget_process, process

from .backends import GroupBackend, MappingBackend
from .conftest import at, rows
from .processes import await_until
from .redis_servers import RedisServer

pytestmark = pytest.mark.django_db(transaction=True)

EVENT = {"type": "registry.notify", "data": "x"}


async def closed_with(socket, code) -> bool:
    """Whether the consumer closed the socket with ``code``; then finish the close handshake as daphne would."""
    closed = await socket.receive_output(timeout=3) == {"type": "websocket.close", "code": code}
    await socket.send_input({"type": "websocket.disconnect", "code": code})
    await socket.wait(timeout=2)
    return closed


def signed_in(user) -> tuple[Client, str]:
    """A test client logged in as ``user`` and its session key: one browser."""
    client = Client()
    client.force_login(user)
    return client, client.session.session_key


class ClosingContract:
    """Forced closes reach every tab they should, whatever the strategy: a subclass per strategy
    declares what it can do."""

    async def test_disconnect_user_closes_every_tab(self, connect, alice, bob):
        tabs = [await connect(alice, consumer=self.consumer) for _ in range(3)]
        other = await connect(bob, consumer=self.consumer)

        reached = await self.dispatcher.adisconnect_user(alice, code=4403)

        assert reached == (3 if self.counts_tabs else None)
        for tab in tabs:
            assert await closed_with(tab, 4403)
        assert await other.receive_nothing()

    async def test_logout_closes_the_tabs_of_that_session_only(self, connect, alice):
        (laptop, laptop_key), (_, phone_key) = [await sync_to_async(signed_in)(alice) for _ in range(2)]
        laptop_tabs = [await connect(alice, session_key=laptop_key, consumer=self.consumer) for _ in range(2)]
        phone_tab = await connect(alice, session_key=phone_key, consumer=self.consumer)

        await sync_to_async(laptop.logout)()

        for tab in laptop_tabs:
            assert await closed_with(tab, 4410)
        assert await phone_tab.receive_nothing()
        assert [r.channel_name for r in await rows(user=alice)] == ([phone_tab.channel_name] if self.keeps_rows else [])


class TestMappingConsumer(MappingBackend, ClosingContract):
    """``RegistryConsumer`` tabs, closed through ``channel_registry.adisconnect_user``."""


class TestGroupConsumer(GroupBackend, ClosingContract):
    """``GroupConsumer`` tabs, closed through ``channel_registry.groups.adisconnect_user``."""


@pytest.mark.parametrize(("option", "phone_closed"), [("user", True), (None, False)])
async def test_close_on_logout_option(connect, alice, settings, option, phone_closed):
    settings.CHANNEL_REGISTRY = {"CLOSE_ON_LOGOUT": option}
    (laptop, laptop_key), (_, phone_key) = [await sync_to_async(signed_in)(alice) for _ in range(2)]
    laptop_tab = await connect(alice, session_key=laptop_key)
    phone_tab = await connect(alice, session_key=phone_key)
    await sync_to_async(laptop.logout)()
    if phone_closed:
        assert await closed_with(laptop_tab, 4410) and await closed_with(phone_tab, 4410)
    else:
        assert await laptop_tab.receive_nothing() and await phone_tab.receive_nothing()


def change_password(user) -> None:
    user.set_password("new password")
    user.save()


def deactivate(user) -> None:
    user.is_active = False
    user.save(update_fields=["is_active"])


@pytest.mark.parametrize(("change", "code"), [(change_password, 4409), (deactivate, 4410)])
async def test_credentials_change_closes_every_tab(connect, alice, bob, change, code):
    tabs = [await connect(alice, session_key=(await sync_to_async(signed_in)(alice))[1]) for _ in range(2)]
    other = await connect(bob)
    await sync_to_async(change)(alice)
    for tab in tabs:
        assert await closed_with(tab, code)
    assert await other.receive_nothing()


async def test_other_saves_of_a_user_close_nothing(connect, alice, settings):
    tab = await connect(alice)
    alice.first_name = "Alice"
    await sync_to_async(alice.save)()
    settings.CHANNEL_REGISTRY = {"CLOSE_ON_PASSWORD_CHANGE": False, "CLOSE_ON_DEACTIVATION": False}
    await sync_to_async(change_password)(alice)
    await sync_to_async(deactivate)(alice)
    assert await tab.receive_nothing()


async def test_connection_limit_refuses_the_newest_with_4429(connect, alice, settings):
    settings.CHANNEL_REGISTRY = {"MAX_CONNECTIONS_PER_USER": 2}
    first, second = await connect(alice), await connect(alice)
    third = await connect(alice)
    assert await closed_with(third, 4429)
    assert {r.channel_name for r in await rows(user=alice)} == {first.channel_name, second.channel_name}
    assert await first.receive_nothing()


async def test_connection_limit_close_oldest_keeps_the_newest(connect, alice, settings):
    settings.CHANNEL_REGISTRY = {"MAX_CONNECTIONS_PER_USER": 1, "ON_LIMIT": "close_oldest"}
    old = await connect(alice)
    new = await connect(alice)
    assert await closed_with(old, 4429)
    assert [r.channel_name for r in await rows(user=alice)] == [new.channel_name]
    assert (await asend_to_user(alice, EVENT)).sent == 1
    assert await new.receive_json_from() == {"type": "notification", "data": "x", **at(new, 1)}


def fill(layer, channel) -> None:
    async def until_full():
        for _ in range(10_000):
            try:
                await layer.send(channel, {"type": "filler"})
            except ChannelFull:
                return
        raise AssertionError("the layer never reported the channel full")

    async_to_sync(until_full)()


def test_full_channel_of_a_silent_process_removes_that_process(make_user, layer, settings):
    settings.CHANNEL_REGISTRY = {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 60}
    user, other = make_user(), make_user()
    dead = async_to_sync(layer.new_channel)()
    # A second layer instance stands for a second process: its own queue and capacity.
    alive = async_to_sync(channel_layers.make_backend(DEFAULT_CHANNEL_LAYER).new_channel)()
    late = timezone.now() - timedelta(seconds=25)  # two heartbeats missed, not yet stale
    UserChannel.objects.create(user=user, channel_name=dead, server="dead", last_seen=late)
    UserChannel.objects.create(user=other, channel_name="specific.gone!1", server="dead", last_seen=late)
    UserChannel.objects.create(user=user, channel_name=alive, server="alive")
    fill(layer, dead)

    delivery = async_to_sync(asend_to_user)(user, EVENT)

    assert delivery.channels == 2 and delivery.sent == 1 and delivery.failed == [dead]
    assert list(UserChannel.objects.values_list("server", flat=True)) == ["alive"]


def test_full_channel_of_a_live_process_is_reported_not_deleted(make_user, layer):
    user = make_user()
    name = async_to_sync(layer.new_channel)()
    UserChannel.objects.create(user=user, channel_name=name, server="busy")
    fill(layer, name)
    assert async_to_sync(asend_to_user)(user, EVENT).failed == [name]
    assert UserChannel.objects.count() == 1


@pytest.fixture
def local_channels(make_user):
    """Rows that this process claims to serve, as its consumers would leave them."""

    def make(count):
        user = make_user()
        names = [f"specific.local!{i}" for i in range(count)]
        old = timezone.now() - timedelta(seconds=200)
        UserChannel.objects.bulk_create(
            UserChannel(user=user, channel_name=n, server=process.server, last_seen=old) for n in names
        )
        process.open.update(dict.fromkeys(names, process.registration(user.pk, "")))
        return names

    yield make
    process.open.clear()


@pytest.mark.parametrize("count", [10, 2000])
def test_heartbeat_is_one_statement_whatever_the_connection_count(local_channels, count):
    local_channels(count)
    UserChannel.objects.create(
        user_id=UserChannel.objects.first().user_id,
        channel_name="other!1",
        server="other",
        last_seen=timezone.now() - timedelta(seconds=200),
    )
    with CaptureQueriesContext(connection) as queries:
        assert beat() == count
    assert len(queries) == 1
    assert UserChannel.objects.live().count() == count  # the other process's row was not refreshed


def test_heartbeat_restores_rows_pruned_while_the_process_stalled(local_channels):
    names = local_channels(3)
    UserChannel.objects.filter(channel_name=names[0]).delete()
    beat()
    assert set(UserChannel.objects.live().channel_names()) == set(names)


def test_forget_process_deletes_only_this_process_rows(local_channels):
    local_channels(4)
    UserChannel.objects.create(user_id=UserChannel.objects.first().user_id, channel_name="other!1", server="other")
    assert forget_process() == 4
    assert list(UserChannel.objects.values_list("server", flat=True)) == ["other"]


async def test_heartbeat_task_refreshes_rows_of_open_sockets(connect, alice, settings):
    settings.CHANNEL_REGISTRY = {"HEARTBEAT_INTERVAL": 0.2, "STALE_AFTER": 5}
    socket = await connect(alice)
    old = timezone.now() - timedelta(seconds=60)
    await UserChannel.objects.filter(channel_name=socket.channel_name).aupdate(last_seen=old)

    async def refreshed() -> bool:
        [row] = await rows(channel_name=socket.channel_name)
        return row.last_seen > old + timedelta(seconds=50)

    await await_until(refreshed, within=5, message="no heartbeat refreshed the row")


async def test_open_socket_survives_a_database_outage(connect, alice, layer, database_unreachable):
    socket = await connect(alice)
    async with database_unreachable():
        await socket.send_json_to({"type": "direct", "to": alice.pk + 1000, "message": "hi", "id": 1})
        reply = await socket.receive_json_from(timeout=10)
        assert reply["code"] == "unavailable" and reply["id"] == 1
        await layer.send(socket.channel_name, EVENT)
        assert await socket.receive_json_from() == {"type": "notification", "data": "x"}


@pytest.mark.faults
async def test_redis_outage_raises_one_error_and_delivery_resumes(connect, alice, bob, settings):
    with RedisServer() as redis:
        settings.CHANNEL_LAYERS = {"default": redis_layer(redis.url, prefix="outage")}
        sender, receiver = await connect(alice), await connect(bob)
        redis.stop()

        started = time.monotonic()
        with pytest.raises(ChannelLayerUnavailable):
            await asend_to_user(bob, EVENT)
        assert time.monotonic() - started < 5
        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "during", "id": "a"})
        assert (await sender.receive_json_from(timeout=10))["code"] == "unavailable"

        redis.start()
        await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "after", "id": "b"})
        assert await sender.receive_json_from(timeout=10) == {"type": "ack", "id": "b", "delivered": 1}
        # The restart emptied Redis, the history with it: the open socket is told before the message.
        reset = await receiver.receive_json_from(timeout=15)
        assert (reset["type"], reset["reason"], reset["seq"]) == ("reset", "epoch", 0)
        assert reset["epoch"] != receiver.position["epoch"]
        frame = await receiver.receive_json_from(timeout=15)
        assert frame["message"] == "after" and frame["from"] == alice.pk and frame["seq"] == 1
