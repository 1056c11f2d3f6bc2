"""The admin that operates: who is online, each process's heartbeat, and actions an operator takes.

Acting needs staff with the model's change permission; every action leaves a ``LogEntry``.
Disconnects go to real consumers through the configured channel layer.
"""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from channel_registry.models import Transport, UserChannel
from channel_registry.protocol import CLOSE_SESSION_ENDED

ONLINE = "/admin/channel_registry/userchannel/online/"
DISCONNECT = ONLINE + "disconnect/"
PRUNE = ONLINE + "prune/"
CHANGELIST = "/admin/channel_registry/userchannel/"


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def person(make_user):
    """``person(staff, *codenames)``: a client signed in as a user with those permissions on ``UserChannel``."""

    def make(staff: bool, *codenames: str):
        user = make_user(is_staff=staff)
        permissions = Permission.objects.filter(content_type__app_label="channel_registry", codename__in=codenames)
        user.user_permissions.set(permissions)
        return client_for(user)

    return make


def row(user, name: str, server: str = "s1", transport: str = Transport.SOCKET, age: float = 0) -> UserChannel:
    created = UserChannel.objects.create(user=user, channel_name=name, server=server, transport=transport)
    if age:
        at = timezone.now() - timedelta(seconds=age)
        UserChannel.objects.filter(pk=created.pk).update(last_seen=at, connected_at=at)
    return created


def test_online_now_shows_each_user_with_live_connections_and_each_process_with_its_heartbeat(make_user, person):
    bob, carol, dave = make_user("bob"), make_user("carol"), make_user("dave")
    row(bob, "specific.a!1", server="host:1")
    row(bob, "specific.b!2", server="host:2", transport=Transport.STREAM)
    row(carol, "specific.a!3", server="host:1")
    row(dave, "specific.c!4", server="host:dead", age=3600)  # a process that stopped beating 1 h ago

    page = person(True, "view_userchannel").get(ONLINE)

    assert page.status_code == 200
    processes = {p["server"]: (p["connections"], p["sockets"], p["streams"], p["users"], p["stopped"])
                 for p in page.context["processes"]}
    assert processes == {
        "host:1": (2, 2, 0, 2, False),
        "host:2": (1, 0, 1, 1, False),
        "host:dead": (1, 1, 0, 1, True),
    }
    users = {str(u["user"]): (u["connections"], u["processes"], u["sockets"], u["streams"])
             for u in page.context["page"]}
    assert users == {"bob": (2, 2, 1, 1), "carol": (1, 1, 1, 0)}  # dave's only row is stale: not online
    assert page.content.count(b"stopped beating</strong>") == 1
    assert page.context["stale_rows"] == 1
    assert b'name="users"' not in page.content  # view permission only: nothing to act with


def test_online_now_costs_the_same_queries_for_3_users_or_30(make_user, person):
    client = person(True, "view_userchannel", "change_userchannel")

    def queries_with(users: int) -> int:
        for _ in range(users):
            user = make_user()
            row(user, f"specific.a!{user.pk}", server=f"host:{user.pk % 4}")
            row(user, f"specific.b!{user.pk}", transport=Transport.STREAM)
        with CaptureQueriesContext(connection) as captured:
            assert client.get(ONLINE).status_code == 200
        return len(captured)

    assert queries_with(3) == queries_with(27)


def test_only_staff_with_the_change_permission_may_act(make_user, person):
    bob = make_user("bob")
    row(bob, "specific.a!1")
    stale = row(bob, "specific.a!old", age=3600)
    outsider = person(False, "view_userchannel", "change_userchannel")
    viewer = person(True, "view_userchannel")
    stranger = person(True)

    assert outsider.get(ONLINE).status_code == 302  # to the admin's login: not staff
    assert b"bob" not in outsider.get(ONLINE, follow=True).content
    assert stranger.get(ONLINE).status_code == 403
    for client, refusal in ((outsider, 302), (viewer, 403), (stranger, 403)):
        assert client.post(DISCONNECT, {"users": [bob.pk], "code": 4403}).status_code == refusal
        assert client.post(PRUNE).status_code == refusal
        client.post(CHANGELIST, {"action": "prune_stale_rows", "_selected_action": [stale.pk], "code": 4403})
    assert UserChannel.objects.count() == 2
    assert not LogEntry.objects.exists()


async def test_disconnecting_users_from_the_admin_closes_every_tab_with_the_code_and_logs_it(
    connect, make_user, person
):
    bob, carol = await sync_to_async(make_user)("bob"), await sync_to_async(make_user)("carol")
    tabs = [await connect(bob), await connect(bob)]
    carols = await connect(carol)
    operator = await sync_to_async(person)(True, "view_userchannel", "change_userchannel")

    response = await sync_to_async(operator.post)(DISCONNECT, {"users": [bob.pk], "code": CLOSE_SESSION_ENDED})

    assert response.status_code == 302
    for tab in tabs:
        assert await tab.receive_output(2) == {"type": "websocket.close", "code": CLOSE_SESSION_ENDED}
    assert await carols.receive_nothing(0.2)
    entry = await LogEntry.objects.select_related("content_type").aget()
    assert (entry.action_flag, entry.object_id, entry.content_type.model) == (CHANGE, str(bob.pk), "user")
    assert entry.get_change_message() == "Disconnected with 4410 from the admin: 2 connection(s)."


async def test_ending_one_connection_from_the_table_leaves_the_users_other_tabs_open(connect, make_user, person):
    bob = await sync_to_async(make_user)("bob")
    ended, kept = await connect(bob), await connect(bob)
    operator = await sync_to_async(person)(True, "view_userchannel", "change_userchannel")
    target = await UserChannel.objects.aget(channel_name=ended.channel_name)
    assert target.transport == Transport.SOCKET

    data = {"action": "end_connections", "_selected_action": [target.pk], "code": CLOSE_SESSION_ENDED}
    response = await sync_to_async(operator.post)(CHANGELIST, data, follow=True)

    assert b"Sent 4410 to 1 of 1 connection(s)." in response.content
    assert await ended.receive_output(2) == {"type": "websocket.close", "code": CLOSE_SESSION_ENDED}
    assert await kept.receive_nothing(0.2)
    entry = await LogEntry.objects.aget()
    assert (entry.action_flag, entry.object_id) == (CHANGE, str(target.pk))


def test_prune_now_deletes_stale_rows_only_and_logs_it(make_user, person):
    bob = make_user("bob")
    row(bob, "specific.a!fresh")
    row(bob, "specific.a!old", age=3600)
    operator = person(True, "view_userchannel", "change_userchannel")

    page = operator.post(PRUNE, follow=True)

    assert b"Deleted 1 stale channel(s)." in page.content
    assert list(UserChannel.objects.values_list("channel_name", flat=True)) == ["specific.a!fresh"]
    entry = LogEntry.objects.get()
    assert (entry.action_flag, entry.object_id, entry.change_message) == (
        DELETION, None, "Pruned 1 stale row(s) from the admin."
    )
