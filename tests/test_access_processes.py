"""Access that ends outside Django's auth functions, against real daphne (and uvicorn) processes, Redis and PostgreSQL.

The processes, database and clients are the fault tests' (``tests/test_faults.py``):
daphne serving ``demo_site``, real sessions, the ``websockets`` client; this
process changes users and sessions in the same database, as another server
process (an admin action, a cron job, a data migration) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.db import connection, transaction
from django.utils import timezone
from websockets.exceptions import ConnectionClosed

from channel_registry.models import UserChannel

from . import test_faults
from .processes import SERVERS, HandshakeRefused, Tab, await_until, real_services_only
from .test_abuse import converse, p99

# The fault tests' fixtures: a throw-away database for the module, and a stack per test.
demo_database = test_faults.demo_database
stack = test_faults.stack

pytestmark = [
    pytest.mark.faults,
    real_services_only,
]

HEARTBEAT = 1.0
User = get_user_model()


class EventStream:
    """``GET /events/`` with a session cookie over a raw connection: the events it receives, and when it ended."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict] = []
        self.ended = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int, session: str) -> EventStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /events/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
            f"Sec-Fetch-Site: same-origin\r\nConnection: close\r\nCookie: sessionid={session}\r\n\r\n".encode()
        )
        status = await asyncio.wait_for(reader.readline(), 10)
        assert b" 200 " in status, status
        while await reader.readline() not in (b"\r\n", b""):
            pass  # the response head
        stream = cls(reader, writer)
        await stream.wait_for("position")
        return stream

    async def _read(self) -> None:
        name = None
        try:
            while line := await self.reader.readline():
                text = line.decode().strip()
                if text.startswith("event: "):
                    name = text[len("event: "):]
                elif text.startswith("data: ") and name:
                    self.events.append({"event": name, "data": json.loads(text[len("data: "):])})
        finally:
            self.ended.set()

    async def wait_for(self, name: str, within: float = 10) -> dict:
        async def found():
            return next((event for event in self.events if event["event"] == name), None)

        return await await_until(found, within)

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def deactivate(user) -> None:
    User.objects.filter(pk=user.pk).update(is_active=False)


def delete_user(user) -> None:
    """What ``user.delete()`` does to the demo's tables (this process also has the admin's
    log table installed, which the demo's database lacks)."""
    with transaction.atomic():
        UserChannel.objects.filter(user_id=user.pk).delete()
        Session.objects.filter(session_key=user.session).delete()
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {User._meta.db_table} WHERE id = %s", [user.pk])


def delete_session(user) -> None:
    Session.objects.filter(session_key=user.session).delete()


def expire_session(user) -> None:
    Session.objects.filter(session_key=user.session).update(expire_date=timezone.now() - timedelta(seconds=1))


def update_password(user) -> None:
    User.objects.filter(pk=user.pk).update(password="md5$changed$0")


def save_password(user) -> None:
    user.set_password("changed")
    user.save()


#: (how access ends, the close code every connection of the user gets)
ENDINGS = [
    (deactivate, 4410),
    (delete_user, 4410),
    (delete_session, 4409),
    (expire_session, 4409),
    (update_password, 4409),
    (save_password, 4409),
]


async def closed_at(connection) -> float:
    """When ``connection`` (a socket or an event stream) was closed by the server, on the monotonic clock."""
    await (connection.closed if isinstance(connection, Tab) else connection.ended).wait()
    return time.monotonic()


@pytest.mark.parametrize("server", SERVERS)
async def test_every_way_access_ends_closes_the_users_connections_within_two_heartbeats(stack, server):
    """Each user has a mapping socket on one process, a group socket and an event stream on the
    other; each user's access ends a different way, none through the auth API but the last. A
    bystander's row pruned meanwhile comes back although a deleted user's socket is still open."""
    stack.start_redis()
    stack.configure(heartbeat=HEARTBEAT, stale_after=4 * HEARTBEAT)
    first, second = stack.daphnes(2, kind=server)
    users = await stack.users(*[ending.__name__ for ending, _ in ENDINGS], "bystander")
    *victims, bystander = users
    connections = {}
    for user in victims:
        connections[user.pk] = [
            await stack.open_tab(first, user),
            await stack.open_tab(second, user, path="/ws/groups/"),
            await EventStream.open(second.port, user.session),
        ]
    bystander_tabs = [
        await stack.open_tab(first, bystander),
        await stack.open_tab(second, bystander, path="/ws/groups/"),
    ]
    [bystander_row] = await stack.rows(user=bystander)

    # Watching from now on: each close is timed when it happens, not when the test looks.
    closes = {pk: [asyncio.ensure_future(closed_at(c)) for c in user_connections]
              for pk, user_connections in connections.items()}  # fmt: skip
    try:
        changed_at = {}
        for (ending, _), user in zip(ENDINGS, victims, strict=True):
            changed_at[user.pk] = time.monotonic()  # timed from the start of the change: never flattering
            await sync_to_async(ending)(user)
        # Pruned as if its process had stalled: the next beat must insert it again.
        await sync_to_async(UserChannel.objects.filter(pk=bystander_row.pk).delete)()

        deadline = 2 * HEARTBEAT
        for (ending, code), user in zip(ENDINGS, victims, strict=True):
            mapping_tab, group_tab, event_stream = connections[user.pk]
            delays = [await asyncio.wait_for(close, deadline + 1) - changed_at[user.pk] for close in closes[user.pk]]
            if os.environ.get("CR_REPORT"):
                print(f"\n{ending.__name__}: closed after {', '.join(f'{delay:.2f}' for delay in delays)} s")
            assert max(delays) <= deadline, (ending.__name__, delays)
            assert [mapping_tab.close_code, group_tab.close_code] == [code, code], ending.__name__
            assert [event["data"] for event in event_stream.events if event["event"] == "disconnect"] == [
                {"type": "disconnect", "code": code}
            ], ending.__name__

        # The deleted user's socket cannot send any more: it is closed.
        deleted_tab = connections[victims[1].pk][0]
        with pytest.raises(ConnectionClosed):
            await deleted_tab.ws.send(json.dumps({"type": "ping"}))

        # The heartbeat restored the bystander's row next to the deleted user's open socket.
        await await_until(lambda: stack.rows(channel_name=bystander_row.channel_name), 2 * HEARTBEAT)
        await await_until(lambda: test_faults.row_count(expect=1), 2 * HEARTBEAT)
        assert all(tab.is_open for tab in bystander_tabs)
        assert [server.errors() for server in (first, second)] == [[], []]
    finally:
        for user_connections in connections.values():
            await user_connections[2].close()
        for close in (close for user_closes in closes.values() for close in user_closes):
            close.cancel()


@pytest.mark.timing  # it measures bystanders' latency: run alone
@pytest.mark.parametrize("change", [save_password, update_password])
async def test_no_socket_survives_a_password_change_raced_by_eight_looping_handshakes(stack, change):
    """A cookie thief reconnects as fast as it can on two processes, to both strategies, while the
    victim changes their password: after the change and two heartbeats, none of its sockets is open.
    Bystanders chatting across the two processes meanwhile get every message, as fast as when quiet."""
    stack.start_redis()
    stack.configure(heartbeat=HEARTBEAT, stale_after=4 * HEARTBEAT)
    servers = stack.daphnes(2)
    victim, *bystanders = await stack.users("victim", *(f"bystander{n}" for n in range(4)))
    people = [(await stack.open_tab(servers[n % 2], user), user) for n, user in enumerate(bystanders)]
    pairs = list(zip(people[::2], people[1::2], strict=True))
    quiet, acks = await converse(pairs, 12, "q.", gap=0.2)
    changed = asyncio.Event()
    stop = asyncio.Event()
    handshakes: list[tuple[float, int | None]] = []  # (when it was answered, its close code: None while open)
    kept: list[Tab] = []
    rng = random.Random(17)

    async def loop(index: int) -> None:
        server = servers[index % 2]
        path = "/ws/registry/" if index % 4 < 2 else "/ws/groups/"
        while not stop.is_set():
            try:
                tab = await Tab.open(server.port, victim.session, path=path, label=f"thief{index}")
            except (OSError, HandshakeRefused):
                await asyncio.sleep(0.01)
                continue
            await tab.more_than(0, 5)  # the position frame, or the close
            handshakes.append((time.monotonic(), tab.close_code))
            if not changed.is_set():
                await asyncio.sleep(rng.uniform(0, 0.05))
            if changed.is_set() and tab.is_open:
                kept.append(tab)  # open at or after the change: kept, to see whether the server closes it
                await tab.closed.wait()
            else:
                await tab.close()

    async def race() -> float:
        await asyncio.sleep(1.5)  # the change comes mid-conversation, every loop reconnecting by then
        await sync_to_async(change)(victim)
        changed_at = time.monotonic()
        changed.set()
        await asyncio.sleep(2 * HEARTBEAT)  # the handshakes race on for the two heartbeats the server has
        return changed_at

    loops = [asyncio.ensure_future(loop(i)) for i in range(8)]
    try:
        (loud, more_acks), changed_at = await asyncio.gather(converse(pairs, 12, "l.", gap=0.2), race())

        survivors = [tab.label for tab in kept if tab.is_open]
        racing = [code for at, code in handshakes if changed_at - 0.5 <= at <= changed_at + 0.5]
        if os.environ.get("CR_REPORT"):
            print(f"\n{change.__name__}: {len(handshakes)} handshakes, {len(racing)} within 0.5 s of the change, "
                  f"{len(kept)} open at or after it, {len(survivors)} open 2 heartbeats later; "
                  f"bystanders' p99 quiet {p99(quiet):.0f} ms, racing {p99(loud):.0f} ms")
        assert survivors == [], survivors
        assert [ack.get("delivered") for ack in acks + more_acks] == [1] * 48
        assert p99(loud) <= max(250, 3 * p99(quiet)), (sorted(quiet), sorted(loud))
        assert len(racing) >= 8, f"only {len(racing)} handshakes within 0.5 s of the change"
        assert handshakes[-1][1] == 4401  # the session is no longer accepted
        await await_until(lambda: test_faults.row_count(expect=0, user=victim), 2 * HEARTBEAT)
    finally:
        stop.set()
        for tab in kept:
            await tab.close()
        await asyncio.gather(*loops, return_exceptions=True)
        for task in loops:
            task.cancel()
    assert [server.errors() for server in servers] == [[], []]
