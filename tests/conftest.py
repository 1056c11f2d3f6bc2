import asyncio
import contextlib
import itertools
import json
import uuid
from types import SimpleNamespace

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.db import connections
from redis.exceptions import ConnectionError as RedisConnectionError

from channel_registry.conf import registry_settings
from channel_registry.consumers import RegistryConsumer
from channel_registry.models import UserChannel
from channel_registry.registry import postgres
from channel_registry.registry.liveness import process
from channel_registry.signals import user_offline, user_online

from .redis_servers import free_port

# registry_communicator and in_memory_registry, as a host project gets them (tests/test_testing.py).
pytest_plugins = ["channel_registry.pytest_plugin"]

_names = itertools.count()

#: Markers of tests that start server processes: their modules run first (see below).
_PROCESS_MARKERS = {"faults", "browser", "abuse"}


def pytest_collection_modifyitems(items):
    """Long tests first, then the modules that start server processes, then the rest.

    On a few xdist workers the run ends when the last worker does: a 50 s test handed out
    last is the whole tail, while many short tests at the end even the workers out. Each
    module's tests stay in order and together, so its module fixtures are made once a worker.
    """

    def rank(item) -> int:
        if item.get_closest_marker("long"):
            return 0
        return 1 if _PROCESS_MARKERS & {mark.name for mark in item.iter_markers()} else 2

    items.sort(key=rank)  # stable: collection order within each rank


#: Modules whose tests one xdist worker runs together, as ``--dist loadgroup`` does for an ``xdist_group``:
#: their module fixtures (a browser, its own database, daphne processes) are set up once, not per worker.
ONE_WORKER_MODULES = ("tests/test_browser.py::",)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with :data:`ONE_WORKER_MODULES` as groups.

    ``xdist_group`` marks cannot do it with pytest 9: pytest-xdist 3.8 names the group in
    ``item._nodeid``, which pytest 9 no longer reads, so the marks are silently ignored.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(ONE_WORKER_MODULES):
                return nodeid.split("::", 1)[0]
            return super()._split_scope(nodeid)

    return ModuleGroups(config, log)


@pytest.fixture(scope="session", autouse=True)
def close_async_connections(django_db_setup, django_db_blocker):
    """Close the connection of asgiref's database thread, or the test database cannot be dropped."""
    yield
    with django_db_blocker.unblock():
        asyncio.run(sync_to_async(connections.close_all)())


@pytest.fixture(autouse=True)
def fresh_process_channels():
    """Each test's connections die with its event loop: none is left for the next test's heartbeat."""
    yield
    process.open.clear()
    process.closing.clear()
    process.watched.clear()


@pytest.fixture(autouse=True)
def fresh_channel_layers():
    """A new layer instance per test: a receive the previous test's event loop left
    pending must not leave channels_redis's receive lock bound to that dead loop."""
    yield
    channel_layers.backends = {}


@pytest.fixture
def make_user(transactional_db):
    """A sync factory; call it before entering async code, or through ``sync_to_async``."""

    def make(username=None, **fields):
        username = username or f"user{next(_names)}"
        return get_user_model().objects.create_user(username=username, password="pw", **fields)

    return make


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def carol(make_user):
    return make_user("carol")


@pytest.fixture
async def connect(transactional_db):
    """Open a WebSocket to a consumer as ``user``; every socket is closed after the test."""
    opened = []

    async def open_socket(user, consumer=RegistryConsumer, expect_accept=True, session_key=None, since=None):
        """``since``: the client's history position; then the test reads the first frames itself."""
        communicator = WebsocketCommunicator(consumer.as_asgi(), f"/ws/?since={since}" if since else "/ws/")
        communicator.scope["user"] = user if user is not None else AnonymousUser()
        if session_key:
            communicator.scope["session"] = SimpleNamespace(session_key=session_key)
        before = set(process.open)
        # 5 s, not Channels' 1 s: make test runs this suite next to others on two CPUs.
        connected, _ = await communicator.connect(timeout=5)
        assert connected is expect_accept
        # The mapping strategy's new channel, for tests that need to name it.
        communicator.channel_name = next(iter(set(process.open) - before), None)
        opened.append(communicator)
        if connected and since is None and registry_settings().HISTORY:
            communicator.position = await first_position(communicator)
        return communicator

    yield open_socket
    for communicator in opened:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await communicator.disconnect()
    await close_layer_connections()


def at(socket, seq: int) -> dict:
    """The ``epoch`` and ``seq`` fields of a recoverable frame: ``seq`` in the history ``socket`` started in."""
    return {"epoch": socket.position["epoch"], "seq": seq}


async def first_position(communicator):
    """The ``position`` frame every new client gets first (``None`` when the socket was refused, or
    without a history); a close is left in the queue for the test."""
    output = await communicator.receive_output(5)
    if output["type"] != "websocket.send":
        communicator.output_queue.put_nowait(output)
        return None
    frame = json.loads(output["text"])
    assert frame["type"] == "position", frame
    return frame


async def close_layer_connections() -> None:
    """Disconnect this test's Redis connections before its event loop closes.

    A layer receive that lost its cancellation (CPython gh-86296) keeps
    waiting on its socket, and closing the loop waits for it forever; with its
    connection closed it fails at once.
    """
    for backend in list(channel_layers.backends.values()):
        if hasattr(backend, "close_pools"):
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(backend.close_pools(), 3)


@pytest_asyncio.fixture
async def redis_layers():
    """``make(cls, hosts, **options)``: Redis channel layers sharing one fresh key prefix; flushed
    and closed after the test."""
    prefix = f"crtest{uuid.uuid4().hex[:12]}"
    layers = []

    def make(cls, hosts, **options):
        layer = cls(hosts=hosts, prefix=prefix, **options)
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        try:
            await layer.flush()
        except (OSError, RedisConnectionError):
            pass  # a server the test stopped on purpose
        await layer.close_pools()


@pytest.fixture
def layer():
    return get_channel_layer()


@pytest.fixture
def presence_events():
    """Every presence signal sent during the test, as ("online"|"offline", user_id)."""
    events = []

    def online(user_id, **kwargs):
        events.append(("online", user_id))

    def offline(user_id, **kwargs):
        events.append(("offline", user_id))

    user_online.connect(online, weak=False)
    user_offline.connect(offline, weak=False)
    yield events
    user_online.disconnect(online)
    user_offline.disconnect(offline)


@pytest.fixture
def database_unreachable():
    """Point the default database at a closed port (or a missing file) until the block ends.

    The database server keeps running; new connections simply cannot reach it,
    which is what a consumer sees during an outage.
    """
    settings_dict = connections.settings["default"]

    @contextlib.asynccontextmanager
    async def unreachable():
        saved = dict(settings_dict)
        if settings_dict["ENGINE"].endswith("sqlite3"):
            settings_dict["NAME"] = "/nonexistent/channel_registry.sqlite3"
        else:
            settings_dict["PORT"] = str(free_port())
        await sync_to_async(connections.close_all)()
        await postgres.pool.close_idle()  # the native store's open connections go as well
        try:
            yield
        finally:
            settings_dict.update(saved)
            await sync_to_async(connections.close_all)()

    return unreachable


async def rows(**filters) -> list[UserChannel]:
    return [row async for row in UserChannel.objects.filter(**filters)]
