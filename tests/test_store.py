"""The row store's contract, run over every implementation; presence on every path that changes rows."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import UserManager
from django.db import IntegrityError, connection
from django.utils import timezone

from channel_registry.cleanup import prune_dead_servers, prune_stale
from channel_registry.consumers import RegistryConsumer
from channel_registry.exceptions import ConnectionLimitExceeded
from channel_registry.models import UserChannel
from channel_registry.registry import postgres
from channel_registry.registry.liveness import beat, forget_process, process
from channel_registry.registry.store import Registration, orm

from .conftest import rows
from .processes import await_until

pytestmark = pytest.mark.django_db(transaction=True)

STORES = {"orm": orm, "native": postgres.native}


@pytest.fixture(params=list(STORES))
def store(request):
    if request.param == "native" and connection.vendor != "postgresql":
        pytest.skip("the native store needs PostgreSQL (CR_TEST_STACK=real runs it)")
    return STORES[request.param]


def reg(user, server="s1", session=""):
    return Registration(user_id=user.pk, server=server, session=session)


async def test_first_and_last_row_are_the_transitions(store, alice, presence_events):
    await store.add("specific.a!1", reg(alice, session="d1"))
    await store.add("specific.a!2", reg(alice))
    await store.remove(alice.pk, "specific.a!1")
    assert presence_events == [("online", alice.pk)]
    await store.remove(alice.pk, "specific.a!2")
    assert presence_events == [("online", alice.pk), ("offline", alice.pk)]
    assert await rows() == []


async def test_unknown_wrong_owner_and_double_delete_change_nothing(store, alice, bob, presence_events):
    await store.add("specific.a!1", reg(alice))
    await store.remove(alice.pk, "specific.nobody!1")
    await store.remove(bob.pk, "specific.a!1")  # not bob's row
    assert [r.channel_name for r in await rows()] == ["specific.a!1"]
    await store.remove(alice.pk, "specific.a!1")
    await store.remove(alice.pk, "specific.a!1")
    assert presence_events == [("online", alice.pk), ("offline", alice.pk)]


async def test_duplicate_channel_is_refused_without_a_signal(store, alice, bob, presence_events):
    await store.add("specific.a!1", reg(alice))
    with pytest.raises(IntegrityError):
        await store.add("specific.a!1", reg(bob))
    assert presence_events == [("online", alice.pk)]
    assert [r.user_id for r in await rows()] == [alice.pk]


async def test_rows_keep_server_and_session(store, alice):
    await store.add("specific.a!1", reg(alice, server="host:1", session="d" * 64))
    [row] = await rows()
    assert (row.server, row.session) == ("host:1", "d" * 64)


async def test_stale_rows_are_not_live(store, alice, bob):
    await store.add("specific.a!1", reg(alice))
    await store.add("specific.a!2", reg(alice))
    await store.add("specific.b!1", reg(bob))
    old = timezone.now() - timedelta(hours=1)
    await UserChannel.objects.filter(channel_name="specific.a!2").aupdate(last_seen=old)
    assert await store.live_channels([alice.pk, bob.pk]) == {alice.pk: ["specific.a!1"], bob.pk: ["specific.b!1"]}


async def test_recipient_channels_answer_the_recipient_check_and_the_lookup_at_once(store, alice, bob, carol):
    """A direct message's recipient: ``None`` unless an active user, else their live channels."""
    await store.add("specific.a!1", reg(alice))
    await store.add("specific.a!2", reg(alice))
    await UserChannel.objects.filter(channel_name="specific.a!2").aupdate(last_seen=timezone.now() - timedelta(hours=1))
    await store.add("specific.c!1", reg(carol))
    carol.is_active = False
    await carol.asave(update_fields=["is_active"])

    assert await store.recipient_channels(alice.pk) == ["specific.a!1"]  # the stale row is not live
    assert await store.recipient_channels(bob.pk) == []  # active, offline
    assert await store.recipient_channels(carol.pk) is None  # deactivated, even with a row left
    assert await store.recipient_channels(10**9) is None  # no such user
    assert await store.recipient_channels(2**53 - 1) is None  # the protocol's largest id: no error


def test_the_native_recipient_statement_leaves_to_the_orm_what_only_it_can_say(monkeypatch):
    """``active_users()`` is whatever the user model's default manager returns: where that is
    not "the user table, is_active", the native store asks the ORM instead."""
    user_model = get_user_model()
    assert postgres.active_users_condition(connection.ops.quote_name) == ' AND u."is_active" = TRUE'

    class SoftDeleting(UserManager):
        def get_queryset(self):
            return super().get_queryset().filter(is_staff=False)

    manager = SoftDeleting()
    manager.model = user_model
    monkeypatch.setattr(user_model._meta, "default_manager", manager)
    assert postgres.active_users_condition(connection.ops.quote_name) is None
    monkeypatch.undo()
    # is_active inherited from a parent table (multi-table inheritance): not on the user's own table.
    monkeypatch.setattr(postgres, "active_field", lambda: UserChannel._meta.get_field("server"))
    assert postgres.active_users_condition(connection.ops.quote_name) is None


async def test_without_a_native_recipient_statement_the_orm_answers(alice, bob, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("the native store needs PostgreSQL (CR_TEST_STACK=real runs it)")
    await postgres.native.add("specific.a!1", reg(alice))
    monkeypatch.setattr(postgres.pool.statements, "recipient_rows", None)
    assert await postgres.native.recipient_channels(alice.pk) == ["specific.a!1"]
    assert await postgres.native.recipient_channels(10**9) is None


async def test_concurrent_tabs_give_one_transition_each_way(store, alice, presence_events):
    names = [f"specific.a!{i}" for i in range(12)]
    await asyncio.gather(*(store.add(name, reg(alice)) for name in names))
    await asyncio.gather(*(store.remove(alice.pk, name) for name in names))
    assert presence_events == [("online", alice.pk), ("offline", alice.pk)]


async def test_limit_close_newest_refuses_and_writes_nothing(store, alice, settings):
    settings.CHANNEL_REGISTRY = {"MAX_CONNECTIONS_PER_USER": 2}
    for i in range(2):
        assert await store.add(f"specific.a!{i}", reg(alice)) == []
    with pytest.raises(ConnectionLimitExceeded):
        await store.add("specific.a!9", reg(alice))
    assert len(await rows()) == 2


async def test_limit_close_oldest_evicts_the_oldest_live_ones(store, alice, settings):
    settings.CHANNEL_REGISTRY = {"MAX_CONNECTIONS_PER_USER": 2, "ON_LIMIT": "close_oldest"}
    for i in range(2):
        await store.add(f"specific.a!{i}", reg(alice))
    # A stale row does not count and is not evicted.
    await UserChannel.objects.filter(channel_name="specific.a!1").aupdate(last_seen=timezone.now() - timedelta(hours=1))
    assert await store.add("specific.a!2", reg(alice)) == []
    assert await store.add("specific.a!3", reg(alice)) == ["specific.a!0"]


async def test_native_store_reads_rows_right_on_a_server_in_another_time_zone(alice):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only")
    name = connection.settings_dict["NAME"]

    def set_zone(zone):
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER DATABASE {connection.ops.quote_name(name)} SET timezone TO %s", [zone])

    await sync_to_async(set_zone)("America/Chicago")
    try:
        postgres.pool._loops.clear()  # new native connections see the new default
        await postgres.native.add("specific.a!1", reg(alice))
        assert await postgres.native.live_channels([alice.pk]) == {alice.pk: ["specific.a!1"]}
    finally:
        await sync_to_async(set_zone)("UTC")


def test_signals_alternate_on_every_path(alice, presence_events):
    """connect, prune, heartbeat restore, close, dead-process purge, process exit: on, off, on, off …"""
    me = process.registration(alice.pk, "")
    orm.add_sync("specific.a!1", me)  # connect
    process.open["specific.a!1"] = me
    UserChannel.objects.update(last_seen=timezone.now() - timedelta(hours=1))
    prune_stale()  # the process stalled; its row was pruned
    beat()  # …and the heartbeat restores it
    process.open.pop("specific.a!1")
    orm.remove_sync(alice.pk, "specific.a!1")  # close
    orm.add_sync("specific.dead!1", reg(alice, server="dead"))
    UserChannel.objects.update(last_seen=timezone.now() - timedelta(minutes=5))
    prune_dead_servers(["specific.dead!1"])  # a full queue behind a silent process
    orm.add_sync("specific.a!2", me)
    process.open["specific.a!2"] = me
    forget_process()  # exit
    assert presence_events == [("online", alice.pk), ("offline", alice.pk)] * 4
    assert UserChannel.objects.count() == 0


def test_the_heartbeat_never_restores_a_connection_that_closed(alice, presence_events):
    me = process.registration(alice.pk, "")
    process.open.update({"specific.a!1": me, "specific.a!2": me})
    orm.add_sync("specific.a!2", me)
    # specific.a!1 closed between the heartbeat's snapshot and its restore: its row was deleted
    # and it left the open set; the restore asks again under the lock.
    snapshot = dict(process.open)
    process.open.pop("specific.a!1")
    assert orm.restore(snapshot, still_open=process.open.__contains__) == 0
    assert list(UserChannel.objects.values_list("channel_name", flat=True)) == ["specific.a!2"]
    assert presence_events == [("online", alice.pk)]


def test_a_deleted_users_open_socket_never_stops_the_heartbeat_restoring_the_others(store, alice, bob, presence_events):
    """Deleting a user deletes their rows (CASCADE), but not their open socket: the restore
    inserted a row for it, the foreign key refused it and the whole batch rolled back, every beat."""
    async_to_sync(store.add)("specific.a!1", reg(alice))
    async_to_sync(store.add)("specific.b!1", reg(bob))
    open_channels = {"specific.a!1": reg(alice), "specific.b!1": reg(bob)}
    UserChannel.objects.filter(channel_name="specific.b!1").delete()  # pruned while the process stalled
    alice.delete()

    assert store.restore(open_channels, still_open=open_channels.__contains__) == 1
    assert list(UserChannel.objects.values_list("channel_name", flat=True)) == ["specific.b!1"]
    assert presence_events[-1] == ("online", bob.pk)


def test_the_heartbeat_restores_rows_next_to_a_deleted_users_socket(alice, bob):
    """The same through ``beat()``, this process's own open set."""
    for user, name in ((alice, "specific.a!1"), (bob, "specific.b!1")):
        me = process.registration(user.pk, "")
        orm.add_sync(name, me)
        process.open[name] = me
    UserChannel.objects.filter(channel_name="specific.b!1").delete()
    alice.delete()
    beat()
    assert list(UserChannel.objects.values_list("channel_name", flat=True)) == ["specific.b!1"]


class LosesItsCancellation(RegistryConsumer):
    """A layer receive that swallows its first cancellation, as redis-py's can on Python 3.11 (gh-86296)."""

    async def _receive_until_reachable(self):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3)  # the lost cancellation: it goes on reading
        return {"type": "registry.notify", "data": "late"}


async def test_row_goes_at_the_clients_close_even_when_the_layer_receive_is_stuck(connect, alice):
    socket = await connect(alice, consumer=LosesItsCancellation)
    await socket.send_input({"type": "websocket.disconnect", "code": 1001})

    async def row_gone() -> bool:
        return not await rows(user=alice)

    await await_until(row_gone, within=1, interval=0.02, message="the row outlived the close by 1 s")
    assert not socket.future.done(), "the consumer should still be waiting for its stuck receive"
    await socket.wait(timeout=5)


def test_exit_cleanup_leaves_alone_a_database_it_did_not_write_to(alice):
    """A test runner dropped the test database and pointed Django back at the real one."""
    me = process.registration(alice.pk, "")
    orm.add_sync("specific.a!1", me)
    process.open["specific.a!1"] = me
    process.database = "the_test_database_that_was_dropped"
    assert forget_process() == 0
    assert UserChannel.objects.count() == 1
    process.database = connection.settings_dict["NAME"]
    assert forget_process() == 1


def test_a_new_process_remembers_the_database_of_its_first_registration():
    from channel_registry.registry.liveness import ProcessChannels

    fresh = ProcessChannels()
    registration = fresh.registration(1, "")
    assert registration.server == fresh.server
    assert fresh.database == connection.settings_dict["NAME"]
