"""The benchmark's world: its database, users, registered channels and receiving keys.

Channels are registered the way both strategies would register them, without
going through ``register()`` (that is what target 4 times): a ``UserChannel``
row per channel for the mapping strategy, and ``group_add`` of the same name to
the user's group for the group strategy. So both dispatchers reach exactly the
same channels.

Receivers are simulated, never run: for ``RedisChannelLayer`` the channel names
come from ``RECEIVERS`` separate layer instances (one client prefix each, as if
four daphne processes served the users) and nobody reads them, so the harness
deletes their keys between rounds; the in-memory layer's queues are cleared; the
pub/sub layer's channels are subscribed by a second layer instance in this
process, whose queues are emptied between rounds.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field

import psycopg
from channels.db import database_sync_to_async
from psycopg import sql

from .stats import progress

#: Simulated server processes serving the users' sockets (RedisChannelLayer).
RECEIVERS = 4
#: Layer aliases of benchmarks.settings, in table order.
LAYERS = {"default": "redis", "memory": "in-memory", "pubsub": "redis pub/sub"}

db = database_sync_to_async  # the library's own hop: one thread, one persistent connection


def setup_django() -> str:
    """Create the benchmark database if needed, set Django up and migrate. Returns its name."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    from django.conf import settings

    database = settings.DATABASES["default"]
    params = {
        "host": database["HOST"],
        "port": database["PORT"],
        "user": database["USER"],
        "password": database["PASSWORD"] or None,
        "connect_timeout": 5,
        "autocommit": True,
    }
    with psycopg.connect(dbname="postgres", **params) as maintenance:
        exists = maintenance.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database["NAME"]]).fetchone()
        if not exists:
            maintenance.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database["NAME"])))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    return database["NAME"]


# --- synchronous database helpers (always run through ``db()``) -----------------------


def reset_tables() -> None:
    """Empty the registry and the users (the benchmark database is its own)."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from channel_registry.models import UserChannel

    tables = ", ".join(
        connection.ops.quote_name(model._meta.db_table) for model in (UserChannel, get_user_model())
    )
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")


def create_users(count: int) -> list[int]:
    """``count`` users in one ``INSERT … SELECT generate_series``; their primary keys."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    table = connection.ops.quote_name(get_user_model()._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (password, is_superuser, username, first_name, last_name, email,"
            " is_staff, is_active, date_joined)"
            " SELECT '', false, 'bench-' || gen_random_uuid(), '', '', '', false, true, now()"
            " FROM generate_series(1, %s) RETURNING id",
            [count],
        )
        return sorted(row[0] for row in cursor.fetchall())


def analyze() -> None:
    """Fresh planner statistics, as autovacuum keeps them in a steady state after a bulk load."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from channel_registry.models import UserChannel

    tables = ", ".join(
        connection.ops.quote_name(model._meta.db_table) for model in (UserChannel, get_user_model())
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {tables}")


def add_rows(pairs: list[tuple[int, str]], server: str = "bench-receivers") -> None:
    from channel_registry.models import UserChannel

    UserChannel.objects.bulk_create(
        [UserChannel(user_id=user_id, channel_name=name, server=server) for user_id, name in pairs],
        batch_size=5000,
    )


# --- worlds ------------------------------------------------------------------------------


@dataclass
class World:
    """Users with registered channels on one layer alias, and how to drain them."""

    alias: str
    layer: object
    users: dict[int, list[str]] = field(default_factory=dict)
    receivers: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return LAYERS[self.alias]

    def with_channels(self, count: int) -> list[int]:
        return [user for user, names in self.users.items() if len(names) == count]

    @property
    def channel_count(self) -> int:
        return sum(len(names) for names in self.users.values())

    async def drain(self) -> None:
        """Empty every receiving queue so capacity and memory never build up between rounds."""
        if self.alias == "default":
            keys = [self.layer.prefix + f"specific.{r.client_prefix}!" for r in self.receivers]
            await self.layer.connection(0).delete(*keys)
        elif self.alias == "memory":
            self.layer.channels.clear()
        else:  # pub/sub: let the receiving task catch up, then empty its queues
            await asyncio.sleep(0.05)
            for receiver in self.receivers:
                for queue in receiver._get_layer().channels.values():
                    while not queue.empty():
                        queue.get_nowait()


def get_layer(alias: str):
    from channels.layers import get_channel_layer

    return get_channel_layer(alias)


#: pub/sub receivers stay subscribed (to their channels and groups) until ``reset()``.
_subscribed: list = []


def receivers_for(alias: str, layer) -> list:
    from django.conf import settings

    config = settings.CHANNEL_LAYERS[alias].get("CONFIG", {})
    if alias == "default":
        from channels_redis.core import RedisChannelLayer

        return [RedisChannelLayer(**config) for _ in range(RECEIVERS)]
    if alias == "pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer

        _subscribed.append(RedisPubSubChannelLayer(**config))
        return [_subscribed[-1]]
    return [layer]


async def reset() -> None:
    """Forget every world: rows and users, the run's Redis keys (groups included), layer state.

    User ids restart at 1 after each reset, so a group left in Redis would add
    old members to the next target's group_send.
    """
    from django.conf import settings

    await db(reset_tables)()
    await delete_keys(get_layer("default"), settings.KEY_PREFIX)
    await get_layer("memory").flush()
    while _subscribed:
        await _subscribed.pop().flush()


async def build_world(alias: str, channels_per_user: list[int], seed: int = 1) -> World:
    """Create ``len(channels_per_user)`` users, each with that many registered channels."""
    from channel_registry.delivery.fanout import run_bounded
    from channel_registry.groups import group_name

    layer = get_layer(alias)
    world = World(alias, layer, receivers=receivers_for(alias, layer))
    rng = random.Random(seed)
    user_ids = await db(create_users)(len(channels_per_user))
    memberships = []
    for user_id, count in zip(user_ids, channels_per_user, strict=True):
        names = []
        for _ in range(count):
            receiver = rng.choice(world.receivers)
            name = await receiver.new_channel()
            names.append(name)
            memberships.append((receiver, user_id, name))
        world.users[user_id] = names
    await db(add_rows)([(user_id, name) for _, user_id, name in memberships])

    async def join(membership) -> None:
        receiver, user_id, name = membership
        # pub/sub subscribes in the process that owns the channel; Redis groups are shared.
        owner = receiver if alias == "pubsub" else layer
        await owner.group_add(group_name(user_id), name)

    await run_bounded(memberships, join, 50)
    await db(analyze)()
    progress(f"  {LAYERS[alias]}: {len(user_ids):,} users, {len(memberships):,} channels registered")
    return world


async def delete_keys(layer, prefix: str) -> int:
    """Delete every key under ``prefix`` (the run's own) on the layer's first shard."""
    connection = layer.connection(0)
    deleted = 0
    batch = []
    async for key in connection.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await connection.delete(*batch)
            batch = []
    if batch:
        deleted += await connection.delete(*batch)
    return deleted
