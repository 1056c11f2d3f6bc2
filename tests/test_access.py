"""Access that ends by any path closes the connections it let in (``sessions.ended``, ``liveness.revalidate``).

In process: each path against sockets of both strategies and event streams, a
handshake that loaded its session before the change, what a check costs, and
the session engines. ``test_access_processes.py`` does the same against real
daphne processes.
"""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.core import checks
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from channel_registry.checks import check_session_engine
from channel_registry.registry.liveness import process, revalidate
from channel_registry.registry.sessions import Access, ended, live_sessions
from channel_registry.views import EventStreamView

from .backends import GroupBackend, MappingBackend
from .conftest import rows
from .test_lifecycle import closed_with
from .test_sse import open_stream  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)
User = get_user_model()


def signed_in(user) -> str:
    """A real database session for ``user``, as a login leaves it; its key."""
    client = Client()
    client.force_login(user)
    return client.session.session_key


def deactivate(user, session_key):
    User.objects.filter(pk=user.pk).update(is_active=False)


def delete_user(user, session_key):
    User.objects.filter(pk=user.pk).delete()


def delete_session(user, session_key):
    Session.objects.filter(session_key=session_key).delete()


def expire_session(user, session_key):
    Session.objects.filter(session_key=session_key).update(expire_date=timezone.now() - timedelta(seconds=1))


def update_password(user, session_key):
    User.objects.filter(pk=user.pk).update(password="md5$changed$0")


#: Every way access ends without a signal, and the code it closes with.
ENDINGS = [
    (deactivate, 4410),
    (delete_user, 4410),
    (delete_session, 4409),
    (expire_session, 4409),
    (update_password, 4409),
]
ENDING_IDS = [ending.__name__ for ending, _ in ENDINGS]


class AccessContract:
    """Sockets of every strategy close when their access ends: a subclass per strategy declares what it can do."""

    @pytest.mark.parametrize(("ending", "code"), ENDINGS, ids=ENDING_IDS)
    async def test_the_next_check_closes_a_socket_whose_access_ended(self, connect, alice, bob, ending, code):
        key, bob_key = await sync_to_async(signed_in)(alice), await sync_to_async(signed_in)(bob)
        tabs = [await connect(alice, session_key=key, consumer=self.consumer) for _ in range(2)]
        other = await connect(bob, session_key=bob_key, consumer=self.consumer)

        assert await revalidate() == {}  # nothing ended yet
        await sync_to_async(ending)(alice, key)
        closed = await revalidate()

        assert sorted(closed.values()) == [code, code]
        for tab in tabs:
            assert await closed_with(tab, code)
        assert await other.receive_nothing()
        assert [row.user_id for row in await rows()] == ([bob.pk] if self.keeps_rows else [])
        assert list(process.watched.values()) == [Access.of(bob, bob_key)]

    @pytest.mark.parametrize(("ending", "code"), ENDINGS, ids=ENDING_IDS)
    async def test_a_handshake_that_loaded_its_session_before_the_change_is_refused(
        self, connect, make_user, ending, code
    ):
        """The middleware loaded the user and session, then the access ended, then the consumer
        registered: a close sent at the change found no connection to close. No heartbeat runs here."""
        alice = await sync_to_async(make_user)()
        key = await sync_to_async(signed_in)(alice)
        await sync_to_async(ending)(alice, key)

        socket = await connect(alice, session_key=key, consumer=self.consumer)

        if ending is delete_user and self.keeps_rows:
            code = 4503  # the row of a user that is gone cannot be written: retried, it gets 4401
        assert await closed_with(socket, code)
        assert await rows() == [] and process.watched == {}


class TestMappingConsumer(MappingBackend, AccessContract):
    """``RegistryConsumer`` sockets: their rows go with them."""


class TestGroupConsumer(GroupBackend, AccessContract):
    """``GroupConsumer`` sockets: no rows to remove."""


@pytest.mark.parametrize(("ending", "code"), ENDINGS, ids=ENDING_IDS)
async def test_the_next_check_ends_an_event_stream_whose_access_ended(open_stream, alice, ending, code):  # noqa: F811
    stream = await open_stream(alice)
    [access] = process.watched.values()
    await sync_to_async(ending)(alice, access.session_key)

    await revalidate()

    assert (await stream.read_event())["data"] == {"type": "disconnect", "code": code}
    assert await stream.app.receive_output(3) == {"type": "http.response.body"}
    assert await rows() == [] and process.watched == {}


async def test_an_event_stream_registered_after_the_change_ends_at_once(alice):
    key = await sync_to_async(signed_in)(alice)
    access = Access.of(alice, key)  # what the request loaded
    await sync_to_async(update_password)(alice, key)

    chunks = [chunk async for chunk in EventStreamView().stream(access)]

    assert chunks[1] == 'event: disconnect\ndata: {"type":"disconnect","code":4409}\n\n'
    assert await rows() == [] and process.watched == {}


async def test_password_changed_through_the_model_closes_the_racing_handshake_too(connect, alice):
    key = await sync_to_async(signed_in)(alice)
    stale = await sync_to_async(User.objects.get)(pk=alice.pk)  # the user the middleware loaded
    alice.set_password("new")
    await alice.asave()
    assert await closed_with(await connect(stale, session_key=key), 4409)


@pytest.mark.parametrize("count", [1, 100])
def test_a_check_is_two_queries_whatever_the_number_of_connections(make_user, count):
    users = [make_user() for _ in range(min(count, 10))]
    accesses = {
        f"specific.x!{i}": Access.of(users[i % len(users)], signed_in(users[i % len(users)])) for i in range(count)
    }
    with CaptureQueriesContext(connection) as queries:
        assert ended(accesses) == {}
    assert len(queries) == 2, [query["sql"] for query in queries]


def test_options_that_turn_a_close_off_also_turn_its_check_off(alice, settings):
    key = signed_in(alice)
    access = {"specific.a!1": Access.of(alice, key)}
    settings.CHANNEL_REGISTRY = {"CLOSE_ON_PASSWORD_CHANGE": False, "CLOSE_ON_DEACTIVATION": False,
                                 "CLOSE_ON_LOGOUT": None}  # fmt: skip
    update_password(alice, key)
    deactivate(alice, key)
    delete_session(alice, key)
    assert ended(access) == {}
    delete_user(alice, key)
    assert ended(access) == {"specific.a!1": 4410}  # a user that is gone is gone


def test_a_connection_without_a_session_is_checked_on_its_user_only(alice):
    access = {"specific.a!1": Access.of(alice, None)}
    assert ended(access) == {}
    update_password(alice, "")
    assert ended(access) == {"specific.a!1": 4409}


@pytest.mark.parametrize(
    "engine", ["django.contrib.sessions.backends.cache", "django.contrib.sessions.backends.signed_cookies"]
)
def test_sessions_outside_the_database_are_checked_too(alice, engine):
    with override_settings(SESSION_ENGINE=engine):
        client = Client()
        client.force_login(alice)
        key = client.session.session_key
        assert live_sessions([key, "x" * 32]) == {key}
        client.logout()
        if engine.endswith("cache"):
            assert live_sessions([key]) == set()  # a signed cookie cannot be ended on the server


def test_a_session_engine_that_cannot_be_asked_is_reported(settings):
    assert check_session_engine() == []
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.file"
    [warning] = check_session_engine()
    assert warning.id == "channel_registry.W030" and warning.level == checks.WARNING
    settings.CHANNEL_REGISTRY = {"CLOSE_ON_LOGOUT": None}
    assert check_session_engine() == []


async def test_a_check_that_fails_never_stops_the_heartbeat(connect, alice, monkeypatch):
    """A session cache that is down raises its own errors, not the database's: logged, checked again next beat."""
    socket = await connect(alice, session_key=await sync_to_async(signed_in)(alice))

    def cache_down(keys):
        raise ConnectionError("session cache unreachable")

    monkeypatch.setattr("channel_registry.registry.sessions.live_sessions", cache_down)
    assert await revalidate() == {}
    assert await socket.receive_nothing()
    monkeypatch.undo()
    await sync_to_async(delete_session)(alice, process.watched[socket.channel_name].session_key)
    assert await revalidate() == {socket.channel_name: 4409}
