"""Fault tests: the demo site as real daphne processes, with servers stopped and killed under it.

Every test starts its own daphne processes (``tests.fault_settings``) and its
own Redis servers on free loopback ports. The tests that stop PostgreSQL (and
the time-zone one) run on a private cluster (``initdb`` in a temp directory,
its own port); the others share one throw-away database, ``crfaults_<pid>``,
created on the shared PostgreSQL for this module and dropped after it. The
shared Redis (6379) and PostgreSQL (5432) are never stopped or touched beyond that.

The test process itself plays "another server process": its default database
is pointed at the demo's database for the test (users, sessions, rows,
``prune_channels``) and its channel layer at the same Redis servers, so
``send_to_user`` here goes through the same registry and layer as daphne's.
WebSocket clients are real (the ``websockets`` package), authenticated with a
real session cookie and an allowed ``Origin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import os
import re
import secrets
import signal
import time
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection, connections
from django.utils import timezone

from channel_registry import ChannelLayerUnavailable, adisconnect_user, asend_to_user, asend_to_users, online_user_ids
from channel_registry import groups as group_dispatch
from channel_registry.layers import redis_layer
from channel_registry.models import UserChannel
from channel_registry.signals import user_offline

from .processes import (
    SERVERS,
    SHARED_POSTGRES,
    AsgiServer,
    HandshakeRefused,
    PostgresServer,
    Tab,
    await_until,
    close_all,
    drop_database,
    http_request,
    login,
    logout,
    migrated_database,
    real_services_only,
    session_for,
    settings_env,
    start_all,
)
from .redis_servers import RedisServer

pytestmark = [
    pytest.mark.faults,
    real_services_only,
]

HEARTBEAT = 0.5
STALE_AFTER = 2.0
NOTIFY = "registry.notify"
User = get_user_model()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_database(request):
    """``crfaults_<pid>_<module>`` on the shared PostgreSQL, migrated with the demo's apps; dropped after the module."""
    name = f"crfaults_{os.getpid()}_{request.module.__name__.rpartition('.')[2]}"
    url = migrated_database(SHARED_POSTGRES, name)
    try:
        yield url
    finally:
        drop_database(SHARED_POSTGRES, name)


def _database_fields(url: str) -> dict:
    from demo_site.settings import database_from_url

    entry = database_from_url(url)
    return {key: entry[key] for key in ("NAME", "USER", "PASSWORD", "HOST", "PORT")}


@contextlib.asynccontextmanager
async def this_process_on(url: str):
    """Point this process's default database at ``url`` (the way conftest's ``database_unreachable`` does)."""
    settings_dict = connections.settings["default"]
    saved = dict(settings_dict)
    settings_dict.update(_database_fields(url))
    # Only the database thread's connection: this process never queries from the event loop's thread.
    await sync_to_async(connections.close_all)()
    try:
        yield
    finally:
        settings_dict.clear()
        settings_dict.update(saved)
        await sync_to_async(connections.close_all)()


def _empty_tables() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE inbox_notification, channel_registry_userchannel, django_session, auth_user CASCADE"
        )


class Stack:
    """The processes of one test and this process's view of them."""

    def __init__(self, database_url: str, settings, test_name: str) -> None:
        self.database_url = database_url
        self.settings = settings
        #: Names the daphne logs: tests/artifacts/faults/<test>-A.log, -B.log.
        self.test_name = test_name
        self.redis: list[RedisServer] = []
        self.servers: list[AsgiServer] = []
        self.tabs: list[Tab] = []
        self.prefix = f"crf{secrets.token_hex(3)}"
        self.options: dict = {}

    # -- services

    def start_redis(self, count: int = 1) -> list[RedisServer]:
        for _ in range(count):
            server = RedisServer()
            server.start()
            self.redis.append(server)
        return self.redis

    @property
    def redis_urls(self) -> list[str]:
        return [server.url for server in self.redis]

    def configure(self, **options) -> None:
        """Registry and layer options shared by the daphne processes and this process."""
        self.options = {"heartbeat": HEARTBEAT, "stale_after": STALE_AFTER, **options}
        layer_options = {"prefix": self.prefix}
        if options.get("layer_expiry"):
            layer_options["expiry"] = int(options["layer_expiry"])
        self.settings.CHANNEL_LAYERS = {"default": redis_layer(*self.redis_urls, **layer_options)}
        registry = {"HEARTBEAT_INTERVAL": self.options["heartbeat"], "STALE_AFTER": self.options["stale_after"]}
        if options.get("history_size"):
            registry["HISTORY_SIZE"] = registry["RECOVERY_LIMIT"] = options["history_size"]
        if options.get("max_connections"):
            registry["MAX_CONNECTIONS_PER_USER"] = options["max_connections"]
            registry["ON_LIMIT"] = options.get("on_limit", "close_newest")
        self.settings.CHANNEL_REGISTRY = registry

    def daphnes(self, count: int, names: str = "AB", kind: str = "daphne") -> list[AsgiServer]:
        """Start ``count`` server processes (daphne, or ``kind``) in parallel on this stack's database and Redis."""
        if not self.options:
            self.configure()
        env = settings_env(
            self.database_url, self.redis_urls, redis_prefix=self.prefix,
            secret_key=self.settings.SECRET_KEY, **self.options,
        )  # fmt: skip
        started = [SERVERS[kind](env, name=f"{self.test_name}-{names[i]}") for i in range(count)]
        self.servers.extend(started)
        start_all(*started)
        return started

    # -- users, sessions and sockets

    async def users(self, *names: str) -> list:
        def make():
            made = []
            for name in names:
                user = User.objects.create_user(username=name, password="pw")
                user.session = session_for(user)
                made.append(user)
            return made

        return await sync_to_async(make)()

    async def tab(self, server: AsgiServer, user, path: str = "/ws/registry/", **kwargs) -> Tab:
        """Open a socket as ``user`` (a user with a ``session``, or a raw session key)."""
        session = getattr(user, "session", user)
        label = f"{getattr(user, 'username', 'key')}@{server.name}"
        tab = await Tab.open(server.port, session, path=path, label=label, **kwargs)
        self.tabs.append(tab)
        return tab

    async def open_tab(self, server: AsgiServer, user, **kwargs) -> Tab:
        """A tab that must stay open; registered when this returns (the consumer accepts after the INSERT)."""
        tab = await self.tab(server, user, **kwargs)
        with contextlib.suppress(TimeoutError):
            code = await tab.closed_with(0.05)
            raise AssertionError(f"{tab.label} was closed with {code} right after opening")
        return tab

    async def reconnect(self) -> None:
        """After a database restart: drop this process's broken connections (a request boundary would)."""
        await sync_to_async(connections.close_all)()

    async def rows(self, **filters) -> list[UserChannel]:
        return [row async for row in UserChannel.objects.filter(**filters)]

    async def rows_of(self, server: AsgiServer) -> list[UserChannel]:
        return await self.rows(server__startswith=server.server_prefix)

    async def teardown(self) -> None:
        await close_all(self.tabs)
        for server in self.servers:
            server.stop()
        for server in self.redis:
            server.__exit__(None, None, None)


@contextlib.asynccontextmanager
async def stack_on(database_url: str, request, settings, django_db_blocker):
    with django_db_blocker.unblock():
        async with this_process_on(database_url):
            await sync_to_async(_empty_tables)()
            stack = Stack(database_url, settings, request.node.name.replace("[", "-").rstrip("]"))
            try:
                yield stack
            finally:
                await stack.teardown()


@pytest.fixture
async def stack(request, demo_database, settings, django_db_blocker):
    """Daphne processes, Redis servers and sockets of one test on ``crfaults_<pid>``; all gone afterwards."""
    async with stack_on(demo_database, request, settings, django_db_blocker) as stack:
        yield stack


@pytest.fixture(scope="module")
def private_postgres():
    """A private PostgreSQL cluster with the demo's database migrated: (server, database URL)."""
    with PostgresServer() as server:
        yield server, migrated_database(server.url, "demo")


@pytest.fixture
async def pg_stack(request, private_postgres, settings, django_db_blocker):
    """Like ``stack``, on the private cluster, which this test may stop (it is running again afterwards)."""
    server, url = private_postgres
    if not server.running:
        server.start()
    async with stack_on(url, request, settings, django_db_blocker) as stack:
        stack.postgres = server
        try:
            yield stack
        finally:
            if not server.running:
                server.start()


@pytest.fixture(autouse=True)
def collect_garbage_after_the_loop_closed():
    """Finalise what each test left behind once its event loop is closed, here and now.

    Collected later, in the middle of pytest rendering a failure, an async
    resource of a closed loop reports an error whose formatting re-enters
    ``ast.parse``, and CPython 3.11 then fails pytest's own ``ast.parse`` with
    "SystemError: AST constructor recursion depth mismatch" (an INTERNALERROR).
    """
    yield
    gc.collect()


@pytest.fixture
def offline_events():
    """User ids for which ``user_offline`` fired in this process, in order."""
    events = []

    def receiver(user_id, **kwargs):
        events.append(user_id)

    user_offline.connect(receiver, weak=False)
    yield events
    user_offline.disconnect(receiver)


async def row_count(expect: int, **filters) -> bool:
    """Whether exactly ``expect`` registry rows match ``filters`` (a predicate for ``await_until``)."""
    return await UserChannel.objects.filter(**filters).acount() == expect


def direct(to, message, frame_id) -> dict:
    return {"type": "direct", "to": getattr(to, "pk", to), "message": message, "id": frame_id}


async def bounded(coroutines, limit: int = 20) -> list:
    """``gather`` with at most ``limit`` running at once (a burst has its own test)."""
    slots = asyncio.Semaphore(limit)

    async def run(coroutine):
        async with slots:
            return await coroutine

    return await asyncio.gather(*(run(c) for c in coroutines))


# --------------------------------------------------------------------------- delivery across processes


@pytest.mark.parametrize("shards", [1, 2], ids=["one-redis", "sharded"])
async def test_every_tab_on_every_process_gets_every_message(stack, shards):
    """Sharded, a send must go to the shard its receiver reads: channels_redis's own ``send``
    hashes the whole channel name and misses about half the time (channels_redis#221), which
    15 messages to 4 tabs would show whichever shard each process reads."""
    stack.start_redis(shards)
    first, second = stack.daphnes(2)
    alice, bob, carol = await stack.users("alice", "bob", "carol")
    sender = await stack.open_tab(first, alice)
    bob_tabs = [await stack.open_tab(server, bob) for server in (first, first, second, second)]
    bystanders = [await stack.open_tab(first, carol), await stack.open_tab(second, carol)]

    # Sent back to back, as a chatty user would: under the default rate limit of 20 per 10 s.
    ids = [f"m{i}" for i in range(15)]
    for frame_id in ids:
        await sender.send(direct(bob, {"n": frame_id}, frame_id))
    acks = [await sender.wait_for(lambda f, i=i: f.get("id") == i, 10) for i in ids]
    assert [ack["type"] for ack in acks] == ["ack"] * len(ids), acks
    assert {ack["delivered"] for ack in acks} == {4}

    for tab in bob_tabs:
        received = [await tab.next_direct(10) for _ in ids]
        assert sorted(frame["id"] for frame in received) == sorted(ids), tab.label
        assert {frame["from"] for frame in received} == {alice.pk}

    # And back, from the second process to the first, and from this process to all of them.
    reply = await bob_tabs[3].request(direct(alice, "hi alice", "r1"))
    assert reply == {"type": "ack", "id": "r1", "delivered": 1}
    assert (await sender.next_direct(10))["message"] == "hi alice"
    delivery = await asend_to_user(bob, {"type": NOTIFY, "data": "from the test process"})
    assert (delivery.channels, delivery.sent, delivery.failed) == (4, 4, [])
    for tab in bob_tabs:
        frame = await tab.wait_for(lambda f: f.get("type") == "notification", 10)
        assert frame["data"] == "from the test process"

    assert all(tab.frames_of("direct") == [] for tab in bystanders)
    assert all(tab.is_open for tab in [sender, *bob_tabs, *bystanders])


# --------------------------------------------------------------------------- a process dies


def _process_key(stack: Stack, channel_name: str) -> str:
    """channels_redis's one key for every channel of the process that owns ``channel_name``."""
    return f"{stack.prefix}{channel_name.split('!', 1)[0]}!"


@pytest.mark.long
@pytest.mark.parametrize("server", SERVERS)
async def test_kill_9_process_with_100_sockets(stack, offline_events, server):
    import redis

    [redis_server] = stack.start_redis()
    stack.configure(layer_expiry=5)
    doomed, survivor = stack.daphnes(2, kind=server)
    # 30 users with three tabs, all on the doomed process; 10 with one tab on each process.
    solo = await stack.users(*[f"solo{i}" for i in range(30)])
    mixed = await stack.users(*[f"mixed{i}" for i in range(10)])
    [bystander] = await stack.users("bystander")
    await bounded(stack.tab(doomed, user) for user in solo for _ in range(3))
    await bounded(stack.tab(doomed, user) for user in mixed)
    survivor_tabs = await bounded(stack.tab(survivor, user) for user in [*mixed, bystander])
    everyone = [*solo, *mixed]

    doomed_rows = await stack.rows_of(doomed)
    survivor_rows = {row.channel_name for row in await stack.rows_of(survivor)}
    assert len(doomed_rows) == 100 and len(survivor_rows) == 11
    [dead_key] = {_process_key(stack, row.channel_name) for row in doomed_rows}
    assert (await asend_to_users(everyone, {"type": NOTIFY, "data": "before"})).channels == 110
    # Killed while idle: its queue drained (the demo's presence broadcasts included),
    # so the probes below cannot fill it and let the dispatcher prune it early.
    client = redis.Redis.from_url(redis_server.url)
    await await_until(lambda: client.zcard(dead_key) == 0, 10, interval=0.1)

    doomed.kill()
    killed_at = time.monotonic()

    # Within STALE_AFTER the dispatcher stops targeting the dead process's channels
    # (one message per probe lands in its queue: far below the capacity of 100).
    sent = {"before": 1, "probe": 0, "after": 0}

    async def only_survivor_targeted():
        sent["probe"] += 1
        delivery = await asend_to_users(everyone, {"type": NOTIFY, "data": "probe"})
        assert delivery.failed == []
        return delivery.channels == 10

    await await_until(only_survivor_targeted, STALE_AFTER + 2, interval=0.1)
    assert time.monotonic() - killed_at < STALE_AFTER + 1  # the margin covers the polling, not the registry
    assert offline_events == []  # nothing pruned yet: the rows are only stale

    # prune_channels, as cron would run it, with this process's receiver connected.
    out = io.StringIO()
    await sync_to_async(call_command)("prune_channels", stdout=out)
    assert out.getvalue().strip() == "Deleted 100 stale channel(s)."
    assert await stack.rows_of(doomed) == []
    assert {row.channel_name for row in await stack.rows_of(survivor)} == survivor_rows
    assert sorted(offline_events) == sorted(user.pk for user in solo)

    # Nobody writes to the dead process's queue any more: it stops growing and expires.
    size = client.zcard(dead_key)
    ends = time.monotonic() + 3
    while time.monotonic() < ends:
        sent["after"] += 1
        delivery = await asend_to_users(everyone, {"type": NOTIFY, "data": "after"})
        assert (delivery.channels, delivery.sent) == (10, 10)
        assert client.zcard(dead_key) <= size
        await asyncio.sleep(0.1)
    await await_until(lambda: not client.exists(dead_key), 6, interval=0.2,
                      message=f"{dead_key} still exists past the layer's 5 s expiry")  # fmt: skip
    dead_prefix = dead_key.removeprefix(stack.prefix).removeprefix("specific.").rstrip("!")
    assert list(client.scan_iter(match=f"*{dead_prefix}*")) == []

    # The survivor's tabs got every message meant for them, in order, throughout.
    expected = [label for label in ("before", "probe", "after") for _ in range(sent[label])]
    for tab in survivor_tabs[:-1]:
        await await_until(lambda t=tab: len(t.frames_of("notification")) >= len(expected), 5)
        assert [f["data"] for f in tab.frames_of("notification")] == expected, tab.label
    assert all(tab.is_open for tab in survivor_tabs)


@pytest.mark.parametrize("server", SERVERS)
async def test_sigterm_deletes_the_process_rows_before_it_exits(stack, server):
    stack.start_redis()
    stopping, staying = stack.daphnes(2, kind=server)
    users = await stack.users(*[f"user{i}" for i in range(50)])
    tabs = await bounded(stack.tab(stopping, user) for user in users for _ in range(2))
    await bounded(stack.tab(staying, user) for user in users[:3])
    assert len(await stack.rows_of(stopping)) == 100
    staying_rows = {row.channel_name for row in await stack.rows_of(staying)}
    # A process that has been serving for a while, not one caught during its first
    # second: some traffic, and two heartbeats over every row.
    reply = await tabs[0].request(direct(users[1], "hello", "h1"))
    assert reply.get("delivered") == 3, reply
    opened = timezone.now()
    await await_until(lambda: row_count(last_seen__lt=opened + timedelta(seconds=2 * HEARTBEAT), expect=0), 5)

    status = await asyncio.to_thread(stopping.terminate)

    codes = {await tab.closed_with(5) for tab in tabs}
    if server == "uvicorn":
        # uvicorn sends every consumer websocket.disconnect and every client 1012 ("service
        # restart"), waits for the consumers to return, then re-raises SIGTERM: the process ends
        # killed by the signal, so atexit handlers (forget_process) do not run. The consumers'
        # own disconnect has deleted the rows.
        assert status == -signal.SIGTERM, stopping.log_tail()
        assert codes == {1012}
    else:
        # daphne cancels the consumers (no websocket.disconnect) and exits normally: atexit's
        # forget_process deletes the rows.
        assert status == 0, stopping.log_tail()
        assert codes == {1006}  # no close frame: the connections just drop
    # Checked right after the exit, long before STALE_AFTER or any prune.
    left = await stack.rows_of(stopping)
    if server == "uvicorn":
        # With channels_redis's own receive, a consumer on Python 3.11 could miss the
        # cancellation of its layer read (CPython gh-86296), never return after websocket.disconnect
        # and be cancelled by uvicorn after --timeout-graceful-shutdown, its row left to the
        # prune (about one stop in three with 100 sockets). BatchedRedisChannelLayer's receive
        # awaits an in-process queue, so every consumer returns and deletes its own row.
        cancelled = re.findall(r"Cancel \d+ running task", stopping.log_tail(1_000_000))
        assert cancelled == [], f"uvicorn had to cancel consumers: {cancelled}"
    assert left == [], f"{len(left)} of 100 rows outlived the graceful stop"
    assert {row.channel_name for row in await stack.rows_of(staying)} == staying_rows
    delivery = await asend_to_users(users, {"type": NOTIFY, "data": "x"})
    assert (delivery.channels, delivery.sent) == (3, 3)


@pytest.mark.timing
async def test_a_burst_of_150_connections_on_one_process(stack):
    """A page reload after a deploy: every client reconnects at the same moment.

    Timed: whether daphne drains its accept backlog before a client gives up depends on the
    CPU it gets; next to other suites some handshakes fail with no HTTP response at all."""
    import redis

    [redis_server] = stack.start_redis()
    [server] = stack.daphnes(1)
    users = await stack.users(*[f"user{i}" for i in range(75)])

    outcomes = await asyncio.gather(
        *(stack.tab(server, user, path=path) for user in users for path in ("/ws/registry/", "/ws/groups/")),
        return_exceptions=True,
    )

    failures = [repr(outcome) for outcome in outcomes if isinstance(outcome, BaseException)]
    assert failures == [], f"{len(failures)} of 150 handshakes failed ({failures[0]}); daphne: {server.errors()}"
    rows = await stack.rows_of(server)
    assert len(rows) == 75
    # Every socket is reachable. The demo's presence broadcasts (one per login) queue up
    # first: wait for the process's queue to drain so its capacity of 100 is not what we test.
    client = redis.Redis.from_url(redis_server.url)
    queue = _process_key(stack, rows[0].channel_name)
    await await_until(lambda: client.zcard(queue) == 0, 20, interval=0.1)
    assert (await asend_to_users(users, {"type": NOTIFY, "data": "x"})).sent == 75
    for start in range(0, 75, 25):  # one group_send per user: 75 messages in that same queue
        await group_dispatch.asend_to_users(users[start : start + 25], {"type": NOTIFY, "data": "g"})
        await await_until(lambda: client.zcard(queue) == 0, 20, interval=0.05)
    for tab in outcomes:
        await tab.wait_for(lambda f: f.get("type") == "notification", 10)


# --------------------------------------------------------------------------- closing a user's tabs


@pytest.mark.parametrize("server", SERVERS)
async def test_disconnect_user_closes_every_tab_on_every_process(stack, server):
    stack.start_redis()
    first, second = stack.daphnes(2, kind=server)
    alice, bob = await stack.users("alice", "bob")
    alice_tabs = [await stack.open_tab(server, alice) for server in (first, first, second)]
    bob_tabs = [await stack.open_tab(server, bob) for server in (first, second)]

    assert await adisconnect_user(alice) == 3

    assert [await tab.closed_with(5) for tab in alice_tabs] == [4403] * 3
    await await_until(lambda: row_count(user=alice, expect=0), 5)
    delivery = await asend_to_user(bob, {"type": NOTIFY, "data": "still here"})
    assert delivery.sent == 2
    for tab in bob_tabs:
        assert (await tab.wait_for(lambda f: f.get("type") == "notification", 5))["data"] == "still here"


async def test_logout_closes_that_sessions_tabs_on_every_process_with_4410(stack):
    stack.start_redis()
    first, second = stack.daphnes(2)
    alice, bob = await stack.users("alice", "bob")
    # A real sign-in through the login form, and a second device with a session of its own.
    session = await asyncio.to_thread(login, first.port, "alice", "pw")
    other_device = alice.session
    signed_out = [await stack.open_tab(first, session), await stack.open_tab(second, session)]
    phone = await stack.open_tab(second, other_device)
    bob_tab = await stack.open_tab(second, bob)

    assert await asyncio.to_thread(logout, first.port, session) == 302

    assert [await tab.closed_with(1) for tab in signed_out] == [4410] * 2
    await await_until(lambda: row_count(user=alice, expect=1), 5)
    # The other device stays connected and reachable.
    assert (await asend_to_user(alice, {"type": NOTIFY, "data": "phone"})).sent == 1
    assert (await phone.wait_for(lambda f: f.get("type") == "notification", 5))["data"] == "phone"
    # The signed-out session no longer opens a socket; bob never noticed anything.
    stale = await stack.tab(second, session)
    assert await stale.closed_with(5) == 4401
    assert bob_tab.is_open and bob_tab.frames_of("direct") == []


@pytest.mark.parametrize("policy", ["close_newest", "close_oldest"])
async def test_connection_limit_holds_across_processes(stack, policy):
    stack.start_redis()
    stack.configure(max_connections=2, on_limit=policy)
    first, second = stack.daphnes(2)
    [alice] = await stack.users("alice")
    oldest = await stack.open_tab(first, alice)
    await asyncio.sleep(0.01)  # distinct connected_at
    middle = await stack.open_tab(second, alice)

    third = await stack.tab(second, alice)  # over the limit, counted over both processes
    if policy == "close_newest":
        assert await third.closed_with(5) == 4429
        fourth = await stack.tab(first, alice)
        assert await fourth.closed_with(5) == 4429
        survivors = [oldest, middle]
    else:
        assert await oldest.closed_with(5) == 4429  # on the other process
        fourth = await stack.tab(first, alice)
        assert await middle.closed_with(5) == 4429
        survivors = [third, fourth]

    assert all(tab.is_open for tab in survivors)
    await await_until(lambda: row_count(user=alice, expect=2), 5)
    expected = {row.channel_name for row in await stack.rows(user=alice)}
    delivery = await asend_to_user(alice, {"type": NOTIFY, "data": "which tabs"})
    assert (delivery.channels, delivery.sent) == (2, 2) and len(expected) == 2
    for tab in survivors:
        assert (await tab.wait_for(lambda f: f.get("type") == "notification", 5))["data"] == "which tabs"


# --------------------------------------------------------------------------- outages


async def test_redis_outage_errors_then_delivery_resumes_without_restart(stack):
    [redis_server] = stack.start_redis()
    stack.configure(rate_limit="none")
    first, second = stack.daphnes(2)
    alice, bob, carol = await stack.users("alice", "bob", "carol")
    sender = await stack.open_tab(first, alice)
    bob_tabs = [await stack.open_tab(first, bob), await stack.open_tab(second, bob)]
    chatter = await stack.open_tab(second, carol)

    for i in range(3):
        assert (await sender.request(direct(bob, "before", f"b{i}"))).get("delivered") == 2
    for tab in bob_tabs:
        assert [(await tab.next_direct())["id"] for _ in range(3)] == ["b0", "b1", "b2"]

    # A busy moment before the outage: ten messages at once from ten tabs, so each
    # process's Redis pool holds several connections when the server goes away.
    crowd = [await stack.open_tab(server, alice) for server in (first, second) for _ in range(5)]
    replies = await asyncio.gather(*(tab.request(direct(bob, "busy", f"w{k}")) for k, tab in enumerate(crowd)))
    assert [reply.get("delivered") for reply in replies] == [2] * 10, replies
    deliveries = await asyncio.gather(*(asend_to_user(bob, {"type": NOTIFY, "data": "busy"}) for _ in range(10)))
    assert [d.sent for d in deliveries] == [2] * 10

    # Traffic all along: carol writes to bob every 100 ms, before, during and after the outage.
    chatting = asyncio.Event()
    chatting.set()
    chat_ids: list[str] = []

    async def chat() -> None:
        while chatting.is_set():
            chat_ids.append(f"c{len(chat_ids)}")
            await chatter.send(direct(bob, "chatter", chat_ids[-1]))
            await asyncio.sleep(0.1)

    chat_task = asyncio.ensure_future(chat())
    await asyncio.sleep(0.5)  # the outage starts in the middle of the chatter

    redis_server.stop()

    started = time.monotonic()
    with pytest.raises(ChannelLayerUnavailable):
        await asend_to_user(bob, {"type": NOTIFY, "data": "lost"})
    assert time.monotonic() - started < 5
    started = time.monotonic()
    reply = await sender.request(direct(bob, "during", "d1"), within=10)
    assert (reply["type"], reply["code"]) == ("error", "unavailable")
    assert time.monotonic() - started < 5
    # The consumers are alive, not closed with 1011, however long the outage lasts.
    await asyncio.sleep(2)
    await sender.send({"type": "ping"})
    await sender.wait_for(lambda f: f.get("type") == "pong", 5)
    assert all(tab.is_open for tab in [sender, *bob_tabs])

    redis_server.start()  # same port, empty data set; nothing restarted on our side
    restarted_at = len(chat_ids)
    # This process kept the connections it pooled before the outage: once Redis answers
    # again, the very next send_to_user works.
    try:
        delivery = await asend_to_user(bob, {"type": NOTIFY, "data": "back"})
    except ChannelLayerUnavailable as error:
        pytest.fail(f"send_to_user failed with Redis back up: {error}")
    assert delivery.sent == 2
    # And so do the consumers, busy or not: the first message of every tab after the
    # restart is delivered, each on a connection its process pooled before the outage
    # (redis-py 8.1's RESP3 pool would send it on the dead socket: redis/redis-py#4252).
    replies = await asyncio.gather(*(tab.request(direct(bob, "back", f"k{k}")) for k, tab in enumerate(crowd)))
    refused = [reply for reply in replies if reply.get("delivered") != 2]
    assert refused == [], f"{len(refused)} of 10 first messages after the restart refused: {refused[0]}"

    # Delivery resumes by itself: the next message reaches every tab once their consumers'
    # receive loops (backing off while Redis was away) read again.
    reply = await sender.request(direct(bob, "after", "a0"), within=10)
    assert reply.get("delivered") == 2, reply
    first_id = "a0"
    for tab in bob_tabs:
        frame = await tab.wait_for(lambda f: f.get("id") == first_id, 15)
        assert frame["message"] == "after" and frame["from"] == alice.pk
    for i in range(5):
        reply = await sender.request(direct(bob, "steady", f"s{i}"))
        assert reply.get("delivered") == 2, f"message {i} after the recovery: {reply}"
    for tab in bob_tabs:
        assert [(await tab.wait_for(lambda f, i=i: f.get("id") == f"s{i}", 5))["id"] for i in range(5)]
    assert (await asend_to_user(bob, {"type": NOTIFY, "data": "still back"})).sent == 2

    chatting.clear()
    await chat_task
    # Every chat message was answered, with an ack or "unavailable" (the consumer never
    # died); and every one accepted after the restart reached both of bob's tabs.
    replies = {}
    for frame_id in chat_ids:
        reply = await chatter.wait_for(lambda f, i=frame_id: f.get("id") == i and f["type"] in ("ack", "error"), 15)
        replies[frame_id] = f"ack{reply['delivered']}" if reply["type"] == "ack" else reply["code"]
    assert set(replies.values()) == {"ack2", "unavailable"}, replies
    # Once Redis answers again, no message fails any more: not even the first one on
    # each connection the pool held across the outage.
    after = {i: replies[i] for i in chat_ids[restarted_at:]}
    assert set(after.values()) == {"ack2"}, f"refused after Redis was back: {after}"
    delivered_after = list(after)
    for tab in bob_tabs:
        for frame_id in delivered_after:
            await tab.wait_for(lambda f, i=frame_id: f.get("id") == i, 15)
    assert all(tab.is_open for tab in [sender, chatter, *bob_tabs])


async def test_postgres_outage_refuses_new_sockets_with_4503_and_open_ones_keep_receiving(pg_stack):
    stack = pg_stack
    stack.start_redis()
    first, second = stack.daphnes(2)
    alice, bob, carol = await stack.users("alice", "bob", "carol")
    sender = await stack.open_tab(first, alice)
    bob_mapping = await stack.open_tab(second, bob)
    bob_groups = await stack.open_tab(first, bob, path="/ws/groups/")
    [bob_channel] = [row.channel_name for row in await stack.rows(user=bob)]
    from channel_registry.delivery.strategy import channel_layer

    # Connections racing the stop, then connections during the outage: each one is
    # either open (registered in time) or accepted and closed with 4503, so the client
    # sees why; never a failed handshake (HTTP 500, which a browser reports as 1006).
    racing = [asyncio.ensure_future(stack.tab(first, carol)) for _ in range(6)]
    await asyncio.to_thread(stack.postgres.stop, "fast")
    during = [stack.tab(server, carol, path=path) for server, path in [(first, "/ws/registry/"),
                                                                       (second, "/ws/groups/")]]  # fmt: skip
    attempts = await asyncio.gather(*racing, *during, return_exceptions=True)
    refused = [repr(a) for a in attempts if isinstance(a, BaseException)]
    assert refused == [], f"handshakes failed instead of accept + close 4503: {refused}; {first.errors()}"
    for tab in attempts[len(racing) :]:
        assert await tab.closed_with(10) == 4503
    for tab in attempts[: len(racing)]:
        with contextlib.suppress(TimeoutError):
            assert await tab.closed_with(0.5) == 4503
    # Open connections keep receiving: through groups, and messages already addressed.
    await group_dispatch.asend_to_user(bob, {"type": NOTIFY, "data": "via groups"})
    assert (await bob_groups.wait_for(lambda f: f.get("type") == "notification", 5))["data"] == "via groups"
    await channel_layer().send(bob_channel, {"type": NOTIFY, "data": "addressed"})
    assert (await bob_mapping.wait_for(lambda f: f.get("type") == "notification", 5))["data"] == "addressed"
    # A lookup is impossible: the sender is told so and stays connected.
    reply = await sender.request(direct(bob, "during", "d1"), within=15)
    assert (reply["type"], reply["code"]) == ("error", "unavailable")
    assert all(tab.is_open for tab in [sender, bob_mapping, bob_groups])

    stack.postgres.start()
    await stack.reconnect()

    # The first connection after the restart works, and so does the registry (bob's
    # row, stale if the outage outlasted STALE_AFTER, is live again after a heartbeat).
    late = await stack.open_tab(first, carol)
    await await_until(lambda: row_count(user=bob, expect=1, last_seen__gte=timezone.now() - timedelta(seconds=1)), 5)
    reply = await late.request(direct(bob, "after", "a1"))
    assert reply == {"type": "ack", "id": "a1", "delivered": 1}
    assert (await bob_mapping.next_direct(5))["message"] == "after"
    carol_tabs = [late, *(tab for tab in attempts[: len(racing)] if tab.is_open)]
    reply = await sender.request(direct(carol, "welcome back", "a2"))
    assert reply == {"type": "ack", "id": "a2", "delivered": len(carol_tabs)}
    for tab in carol_tabs:
        assert (await tab.next_direct(5))["message"] == "welcome back"
    assert all(tab.is_open for tab in [sender, bob_mapping, bob_groups, *carol_tabs])


async def test_sockets_closed_during_a_postgres_outage_are_forgotten(pg_stack):
    """A disconnect whose DELETE failed leaves a row behind; it must not stay reachable."""
    stack = pg_stack
    stack.start_redis()
    busy, idle = stack.daphnes(2)
    alice, bob = await stack.users("alice", "bob")
    closing = await stack.open_tab(busy, alice)
    staying = await stack.open_tab(busy, alice)  # keeps the busy process's heartbeat going
    bob_tab = await stack.open_tab(idle, bob)  # the idle process's only socket

    stack.postgres.stop("fast")
    await closing.close()
    await bob_tab.close()
    # Both processes tried to unregister and could not.
    for server in (busy, idle):
        await await_until(lambda s=server: "could not unregister" in s.log_tail(100_000), 10, interval=0.1)
    stack.postgres.start()
    await stack.reconnect()

    # Within STALE_AFTER (plus a heartbeat) only the open tab is targeted.
    async def only_open_tab_targeted():
        return (await asend_to_user(alice, {"type": NOTIFY, "data": "x"})).channels == 1

    try:
        await await_until(only_open_tab_targeted, STALE_AFTER + 3, interval=0.2)
    except TimeoutError:
        rows = await stack.rows(user=alice)
        pytest.fail(f"the closed tab's row is still live {STALE_AFTER + 3} s after the outage: the heartbeat "
                    f"keeps refreshing it ({[(r.channel_name[-6:], r.last_seen) for r in rows]})")  # fmt: skip
    assert (await staying.wait_for(lambda f: f.get("type") == "notification", 5))["data"] == "x"

    # A graceful stop removes whatever its process left, even with no socket open any more.
    assert await asyncio.to_thread(idle.terminate) == 0
    assert await stack.rows_of(idle) == [], "the idle process exited and left its failed-to-delete row"


@pytest.fixture
async def chicago_stack(request, private_postgres, settings, django_db_blocker):
    """A stack on a database of the private cluster whose ``timezone`` is America/Chicago."""
    server, _ = private_postgres
    url = migrated_database(server.url, "demo_chicago")
    await asyncio.to_thread(_set_database_time_zone, url, "America/Chicago")
    async with stack_on(url, request, settings, django_db_blocker) as stack:
        yield stack


async def test_registry_works_on_a_postgres_server_not_in_utc(chicago_stack):
    """Django sets its connections' session time zone; the registry must read ``last_seen`` right anyway.

    Debian's initdb writes the machine's zone into postgresql.conf; any zone
    other than UTC shifts every timestamp read without that setting: behind UTC
    every row looks stale (nothing is delivered), ahead of it none ever does.
    """
    stack = chicago_stack
    stack.start_redis()
    first, second = stack.daphnes(2)
    alice, bob = await stack.users("alice", "bob")
    sender = await stack.open_tab(first, alice)
    receiver = await stack.open_tab(second, bob)

    reply = await sender.request(direct(bob, "across the zones", "tz1"))
    delivery = await asend_to_user(bob, {"type": NOTIFY, "data": "from here"})

    assert reply == {"type": "ack", "id": "tz1", "delivered": 1}
    assert (await receiver.next_direct())["message"] == "across the zones"
    assert (delivery.channels, delivery.sent) == (1, 1)


def _set_database_time_zone(url: str, zone: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET timezone TO '{zone}'")


# --------------------------------------------------------------------------- security


async def test_a_user_never_receives_another_users_traffic(stack):
    stack.start_redis()
    first, second = stack.daphnes(2)
    alice, bob, mallory = await stack.users("alice", "bob", "mallory")
    alice_tab = await stack.open_tab(first, alice)
    bob_tabs = [await stack.open_tab(first, bob), await stack.open_tab(second, bob)]
    mallory_tabs = [await stack.open_tab(first, mallory), await stack.open_tab(second, mallory)]
    [bob_channel, *_] = [row.channel_name for row in await stack.rows(user=bob)]
    a, b, m = alice.pk, bob.pk, mallory.pk

    # (frame, expected reply): "ack" or an error code. Whatever mallory writes, the
    # recipient comes from "to" alone and the sender from mallory's own session.
    attempts = [
        ({"type": "direct", "to": b, "message": "m1", "id": "x1", "from": a}, "ack"),
        ({"type": "direct", "to": b, "message": "m2", "id": "x2", "user": a, "sender": a, "user_id": a}, "ack"),
        ({"type": "direct", "to": a, "message": {"type": "direct", "from": b}, "id": "x3"}, "ack"),
        (f'{{"type": "direct", "to": {a}, "to": {b}, "message": "m4", "id": "x4"}}', "ack"),
        ({"type": "direct", "to": b, "message": "m5", "id": "x5", "__asgi_channel__": bob_channel}, "ack"),
        ({"type": "direct", "to": [a, b], "message": "m6", "id": "x6"}, "invalid_payload"),
        ({"type": "direct", "to": str(a), "message": "m7", "id": "x7"}, "invalid_payload"),
        ({"type": "direct", "to": a + 0.5, "message": "m8", "id": "x8"}, "invalid_payload"),
        ({"type": "direct", "to": True, "message": "m9", "id": "x9"}, "invalid_payload"),
        ({"type": "direct", "to": bob_channel, "message": "m10", "id": "x10"}, "invalid_payload"),
        ({"type": "direct", "to": 2**63, "message": "m11", "id": "x11"}, "invalid_payload"),
        ({"type": "direct", "to": m, "message": "m12", "id": "x12"}, "forbidden"),
        ({"type": "direct", "to": 10**9, "message": "m13", "id": "x13"}, "unknown_recipient"),
        ({"type": "registry.direct", "frame": {"from": a, "message": "forged"}, "id": "x14"}, "unknown_type"),
        ({"type": "registry_direct", "frame": {"from": a, "message": "forged"}, "id": "x15"}, "unknown_type"),
        ({"type": "registry.disconnect", "code": 4403, "user": b, "id": "x16"}, "unknown_type"),
        ({"type": "registry.notify", "data": "forged", "user": b, "id": "x17"}, "unknown_type"),
        ({"type": "websocket.disconnect", "code": 1000, "id": "x18"}, "unknown_type"),
        ({"type": "demo.presence", "online": [], "id": "x19"}, "unknown_type"),
    ]
    for index, (frame, expected) in enumerate(attempts):
        tab = mallory_tabs[index % 2]
        frame_id = frame["id"] if isinstance(frame, dict) else "x4"
        await tab.send(frame)
        reply = await tab.wait_for(lambda f, i=frame_id: f.get("id") == i and f.get("type") in ("ack", "error"), 10)
        assert reply["type" if expected == "ack" else "code"] == expected, (frame, reply)
    # Frames refused before they are read carry no id to echo.
    oversized = json.dumps({"type": "direct", "to": b, "message": "x" * 20_000, "id": "x20"})
    for junk, code in [(b"\x00binary", "invalid_payload"), ("not json", "invalid_json"), ("[1, 2]", "invalid_json"),
                       (f'{{"type": "direct", "to": {b}', "invalid_json"), (oversized, "too_large")]:  # fmt: skip
        await mallory_tabs[0].ws.send(junk)
        reply = await mallory_tabs[0].wait_for(lambda f: f.get("type") == "error", 5)
        assert reply["code"] == code, (junk[:40], reply)

    # Real traffic between alice and bob, and from this process.
    for i in range(3):
        assert (await alice_tab.request(direct(bob, f"secret{i}", f"a{i}"))).get("delivered") == 2
        assert (await bob_tabs[i % 2].request(direct(alice, f"reply{i}", f"b{i}"))).get("delivered") == 1
    await asend_to_user(alice, {"type": NOTIFY, "data": "for alice"})
    await asend_to_user(bob, {"type": NOTIFY, "data": "for bob"})
    for tab in bob_tabs:
        await tab.wait_for(lambda f: f.get("data") == "for bob", 5)
        await tab.wait_for(lambda f: f.get("id") == "a2", 5)
    await alice_tab.wait_for(lambda f: f.get("data") == "for alice", 5)
    await alice_tab.wait_for(lambda f: f.get("id") == "b2", 5)

    for tab in mallory_tabs:
        assert tab.frames_of("direct") == [] and tab.frames_of("notification") == [], tab.frames
        assert tab.is_open
    for tab in bob_tabs:
        directs = {(f["from"], f["id"]) for f in tab.frames_of("direct")}
        assert directs == {(a, "a0"), (a, "a1"), (a, "a2"), (m, "x1"), (m, "x2"), (m, "x4"), (m, "x5")}
        assert [f["data"] for f in tab.frames_of("notification")] == ["for bob"]
        assert tab.is_open
    directs = {(f["from"], f["id"]) for f in alice_tab.frames_of("direct")}
    assert directs == {(b, "b0"), (b, "b1"), (b, "b2"), (m, "x3")}
    assert [f["data"] for f in alice_tab.frames_of("notification")] == ["for alice"]


async def test_foreign_origins_are_refused_and_event_streams_need_a_session(stack):
    stack.start_redis()
    [server] = stack.daphnes(1)
    [alice] = await stack.users("alice")

    for origin in ("http://evil.example", f"http://127.0.0.1.evil.example:{server.port}", "null", None):
        with pytest.raises(HandshakeRefused) as refused:
            await stack.tab(server, alice, origin=origin)
        assert refused.value.status == 403, origin
    assert await stack.rows() == []

    stream = {"Accept": "text/event-stream"}
    tampered = alice.session[:-1] + ("1" if alice.session.endswith("0") else "0")  # never the key itself
    for cookies in (None, {"sessionid": "x" * 32}, {"sessionid": tampered}):
        status, _, _ = await asyncio.to_thread(
            http_request, server.port, "GET", "/events/", cookies=cookies, headers=stream, timeout=20
        )
        assert status == 401, cookies
    assert await stack.rows() == []

    # With the session: a stream, registered as one more connection of alice.
    import http.client

    def open_stream():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        conn.request("GET", "/events/", headers={**stream, "Cookie": f"sessionid={alice.session}",
                                                 "Host": f"127.0.0.1:{server.port}"})  # fmt: skip
        response = conn.getresponse()
        return conn, response.status, response.readline()

    conn, status, first_line = await asyncio.to_thread(open_stream)
    try:
        assert status == 200 and first_line.startswith(b"retry:")
        assert [row.user_id for row in await stack.rows()] == [alice.pk]
    finally:
        conn.close()
    await await_until(lambda: row_count(expect=0), 5)


async def test_a_client_cannot_register_a_channel_for_another_user(stack):
    stack.start_redis()
    first, second = stack.daphnes(2)
    alice, mallory = await stack.users("alice", "mallory")

    def forged_sessions():
        from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
        from django.contrib.sessions.backends.db import SessionStore

        made = []
        for session_hash in (mallory.get_session_auth_hash(), None, "0" * 64):
            session = SessionStore()  # alice's id, without alice's password-derived hash
            session[SESSION_KEY] = str(alice.pk)
            session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
            if session_hash:
                session[HASH_SESSION_KEY] = session_hash
            session.create()
            made.append(session.session_key)
        return made

    forged = [
        "x" * 32,  # a made-up key
        alice.session[:-1] + ("0" if alice.session[-1] != "0" else "1"),  # alice's, altered
        *await sync_to_async(forged_sessions)(),
    ]
    for key in forged:
        for server in (first, second):
            tab = await stack.tab(server, key)
            assert await tab.closed_with(5) == 4401, key
    assert await stack.rows() == []

    # Mallory's own session with every other way of naming a user: she is still mallory.
    a = alice.pk
    tabs = [
        await stack.open_tab(first, mallory, path=f"/ws/registry/?user={a}&user_id={a}&to={a}"),
        await stack.open_tab(
            second, mallory, headers={"X-User-Id": str(a), "X-Forwarded-User": "alice"},
            cookies={"user_id": str(a), "username": "alice"},
        ),
    ]
    for tab in tabs:
        for frame in ({"type": "register", "user": a, "id": 1}, {"type": "subscribe", "user_id": a, "id": 2},
                      {"type": "login", "username": "alice", "id": 3}):  # fmt: skip
            assert (await tab.request(frame))["code"] == "unknown_type"
    assert sorted(row.user_id for row in await stack.rows()) == [mallory.pk, mallory.pk]
    delivery = await asend_to_user(alice, {"type": NOTIFY, "data": "for alice only"})
    assert delivery.channels == 0
    await asyncio.sleep(0.2)  # a stray notification would have arrived by now
    assert all(tab.frames_of("notification") == [] for tab in tabs)


# --------------------------------------------------------------------------- bookkeeping


def change_password(user) -> None:
    user.set_password("changed")
    user.save()


def deactivate(user) -> None:
    user.is_active = False
    user.save()


async def test_every_documented_close_code_reaches_a_real_client(stack):
    """Each code as the websockets client sees it through daphne (autobahn refuses 1011, for one)."""
    stack.start_redis()
    stack.configure(max_connections=2)
    [server] = stack.daphnes(1)
    alice, bob, carol, dave = await stack.users("alice", "bob", "carol", "dave")

    assert await (await stack.tab(server, None)).closed_with(5) == 4401
    forbidden = await stack.open_tab(server, alice)
    assert await adisconnect_user(alice) == 1
    assert await forbidden.closed_with(1) == 4403
    first, second = await stack.open_tab(server, bob), await stack.open_tab(server, bob)
    assert await (await stack.tab(server, bob)).closed_with(5) == 4429
    await sync_to_async(change_password)(bob)
    assert [await first.closed_with(1), await second.closed_with(1)] == [4409, 4409]
    # Reconnecting with the session from before the change: Django no longer accepts it.
    assert await (await stack.tab(server, bob)).closed_with(5) == 4401
    gone = await stack.open_tab(server, carol)
    await sync_to_async(deactivate)(carol)
    assert await gone.closed_with(1) == 4410
    assert await (await stack.tab(server, carol)).closed_with(5) == 4401
    # The one code left (4503, registration impossible) is the PostgreSQL outage test's.
    assert (await stack.open_tab(server, dave)).is_open
    assert server.errors() == []


@pytest.mark.long
async def test_churn_against_a_fast_heartbeat_leaves_no_row_and_nobody_online(stack):
    """Tabs opening and closing at random next to tabs that stay open, on two processes whose
    heartbeat runs every 20 ms: after every round, once every tab closed, no row is left."""
    import random

    stack.start_redis()
    stack.configure(heartbeat=0.02, stale_after=5)
    servers = stack.daphnes(2)
    users = await stack.users(*[f"churn{i}" for i in range(24)])
    rng = random.Random(9)

    async def churn(user, until: float) -> int:
        opened = 0
        while time.monotonic() < until:
            tab = await stack.tab(rng.choice(servers), user)
            opened += 1
            await asyncio.sleep(rng.uniform(0, 0.15))
            await tab.close()
            stack.tabs.remove(tab)
        return opened

    rounds = int(os.environ.get("CR_CHURN_ROUNDS", "20"))
    for round_no in range(rounds):
        steady = await bounded(stack.open_tab(servers[i % 2], users[i % 8]) for i in range(16))
        until = time.monotonic() + 1.0
        opened = await asyncio.gather(*(churn(user, until) for user in users[8:]))
        assert sum(opened) > 0
        await close_all(steady)
        stack.tabs.clear()
        try:
            await await_until(lambda: row_count(expect=0), 3)
        except TimeoutError:
            left = [(r.user_id, r.channel_name, r.server) for r in await stack.rows()]
            raise AssertionError(f"round {round_no}: rows left after every tab closed: {left}") from None
        assert await sync_to_async(online_user_ids)() == set()
    for server in servers:
        assert server.errors() == []
