"""``manage.py compare_strategies``: the mapping against per-user groups on the project's own stack.

The routing comparisons of the repository's benchmark — ``send_to_user`` to a user
with 1 and with 3 tabs, a fan-out to many users, a connect + disconnect, and what
each strategy can count — run on the channel layer and the database the project is
configured with, on throwaway users whose tabs are simulated: a ``UserChannel``
row and a group membership per tab, on channel names of a few simulated server
processes whose queues are emptied between rounds (nobody reads them).

Everything it creates carries one random tag and goes in a ``finally``, also on an
error or a stop (Ctrl-C): the users (through the ORM, so their cascades go too), their
rows, their groups and connection slots, the simulated processes' queues. Only a clean-up
cut short (``kill -9``) leaves some behind; they are named ``compare-strategies-<tag>-<n>``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from django.contrib.auth import get_user_model
from django.db import connections, models, router
from django.utils import timezone

from . import dispatch, groups
from .delivery.fanout import is_redis_layer, run_bounded
from .delivery.mapping import MappingStrategy
from .delivery.strategy import DeliveryStrategy, channel_layer
from .groups import GroupStrategy, group_name
from .models import UserChannel
from .presence import aonline_user_ids
from .timing import Call, interleaved, summary

#: A database whose name holds one of these words has room for throwaway rows.
THROWAWAY_WORDS = frozenset({"test", "tests", "testing", "staging", "stage", "dev", "demo", "bench", "sandbox"})
EVENT = {"type": "registry.compare", "text": "x" * 64}
#: Simulated server processes hold at most this many tabs each, so that a fan-out between two
#: drains stays under channels_redis's default capacity (100 messages per process).
TABS_PER_PROCESS = 50
#: Within this ratio a percentile counts as even.
EVEN = 1.1
Progress = Callable[[str], None]


class CompareError(Exception):
    """The comparison cannot run here; the message says why and what to do."""


class Interrupted(CompareError):
    """``stop`` was set: the run ended at the next round, its clean-up done."""


@dataclass(frozen=True)
class Options:
    """How much work each case does. The defaults take a few seconds."""

    #: Timed ``send_to_user`` calls per case and strategy; a tenth as many fan-outs, half as many connects.
    iterations: int = 200
    #: Throwaway users with 1 to 3 tabs each: the fan-out's recipients.
    users: int = 100

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.users < 3:  # a user of each tab count, 1 to 3
            raise ValueError(f"need at least 1 iteration and 3 users, not {self.iterations} and {self.users}")

    @property
    def fanouts(self) -> int:
        return max(5, self.iterations // 10)

    @property
    def pairs(self) -> int:
        return max(10, self.iterations // 2)


# --------------------------------------------------------------------------- where it may run


def has_throwaway_room(name: str, allowed: str | None = None) -> bool:
    """Whether throwaway rows may go into the database ``name``: ``--allow-database`` names it,
    or a word of its name (a file's name, for SQLite) is one of ``THROWAWAY_WORDS``."""
    words = re.split(r"[^a-z0-9]+", os.path.basename(str(name)).lower())
    return str(name) == allowed or not THROWAWAY_WORDS.isdisjoint(words)


def check_room(allowed: str | None) -> None:
    """Raise ``CompareError`` unless every database the comparison writes to has throwaway room."""
    for alias in {router.db_for_write(UserChannel), router.db_for_write(get_user_model())}:
        name = str(connections[alias].settings_dict["NAME"])
        if not has_throwaway_room(name, allowed):
            words = ", ".join(sorted(THROWAWAY_WORDS))
            raise CompareError(
                f"compare_strategies writes throwaway users and registry rows (and removes them), so it only runs "
                f"on a database with room for them; database {name!r} (alias {alias!r}) does not look like one.\n"
                f"Point it at a staging or test database: run it with that environment's settings, e.g. "
                f"DJANGO_SETTINGS_MODULE=mysite.settings_staging python manage.py compare_strategies (or its "
                f"DATABASE_URL), or use a database whose name holds one of the words {words}.\n"
                f"If this database is yours to write throwaway rows into, name it: "
                f"python manage.py compare_strategies --allow-database {name}"
            )


def check_layer(layer: Any) -> None:
    if not (is_redis_layer(layer) or isinstance(layer, InMemoryChannelLayer)):
        raise CompareError(
            f"compare_strategies measures channels_redis's RedisChannelLayer (and subclasses such as "
            f"BatchedRedisChannelLayer) and InMemoryChannelLayer; the registry's layer is {describe(layer)}."
        )


def describe(layer: Any) -> str:
    return f"{type(layer).__module__}.{type(layer).__qualname__}"


# --------------------------------------------------------------------------- the throwaway world


def throwaway_users(tag: str) -> models.QuerySet[Any]:
    User = get_user_model()
    return User._default_manager.filter(**{f"{User.USERNAME_FIELD}__startswith": tag})


def create_users(tag: str, count: int) -> list[Any]:
    """``count`` users that cannot sign in, in one ``bulk_create`` (no signals); their primary keys.

    Raises ``CompareError`` when the project's user model needs more than a username.
    """
    User = get_user_model()
    email = isinstance(User._meta.get_field(User.USERNAME_FIELD), models.EmailField)
    made = []
    for n in range(count):
        user = User(**{User.USERNAME_FIELD: f"{tag}{n}" + ("@example.invalid" if email else "")})
        user.set_unusable_password()
        made.append(user)
    try:
        User._default_manager.bulk_create(made, batch_size=1000)
    except Exception as error:
        raise CompareError(f"could not create throwaway users of {User._meta.label}: {error}") from error
    return list(throwaway_users(tag).order_by("pk").values_list("pk", flat=True))


def add_rows(tabs: dict[Any, list[str]], server: str) -> None:
    rows = [UserChannel(user_id=user, channel_name=name, server=server) for user, names in tabs.items()
            for name in names]  # fmt: skip
    UserChannel.objects.bulk_create(rows, batch_size=1000)


def refresh_rows(server: str) -> None:
    """Keep the simulated tabs live however long the run takes (``STALE_AFTER``)."""
    UserChannel.objects.filter(server=server).update(last_seen=timezone.now())


def delete_users(tag: str) -> None:
    """The throwaway users and, through the ORM's cascades, everything of theirs: their rows included."""
    throwaway_users(tag).delete()


@dataclass
class World:
    """The throwaway users, their simulated tabs, and how to empty the queues nobody reads."""

    layer: Any
    #: Set to end the run at the next round (see ``compare_strategies``).
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tag: str = field(default_factory=lambda: f"compare-strategies-{secrets.token_hex(4)}-")
    #: User → the channel names of their simulated tabs (1, 2 or 3).
    tabs: dict[Any, list[str]] = field(default_factory=dict)
    #: Users without tabs: each connect + disconnect is their first and last connection.
    fresh: list[Any] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    #: Connections registered by the connect + disconnect case and not unregistered yet.
    connecting: set[tuple[Any, str]] = field(default_factory=set)
    _channels: int = 0

    @property
    def server(self) -> str:
        return self.tag + "rows"

    def new_channel(self) -> str:
        """A process-local channel name of a simulated server process, as ``new_channel()`` makes them."""
        self._channels += 1
        return f"specific.{self.processes[self._channels % len(self.processes)]}!{secrets.token_hex(6)}"

    def with_tabs(self, count: int) -> list[Any]:
        return [user for user, names in self.tabs.items() if len(names) == count]

    def memberships(self) -> list[tuple[Any, str]]:
        """(user, channel name) of every simulated tab."""
        return [(user, name) for user, names in self.tabs.items() for name in names]

    async def build(self, options: Options, progress: Progress) -> None:
        users = options.users
        tabs = [1 + n % 3 for n in range(users)]
        progress(f"creating {users + 20} throwaway users ({self.tag}*) and {sum(tabs)} simulated tabs")
        made = await database_sync_to_async(create_users)(self.tag, users + 20)
        self.fresh = made[users:]
        processes = max(4, math.ceil(sum(tabs) / TABS_PER_PROCESS))
        self.processes = [f"{self.tag.rstrip('-')}.{n}" for n in range(processes)]
        self.tabs = {user: [self.new_channel() for _ in range(n)] for user, n in zip(made, tabs, strict=False)}
        await database_sync_to_async(add_rows)(self.tabs, self.server)
        await run_bounded(self.memberships(), lambda tab: self.layer.group_add(group_name(tab[0]), tab[1]), 50)

    async def next_round(self) -> None:
        """Between two rounds: end the run if asked to, and empty the queues."""
        if self.stop.is_set():
            raise Interrupted("interrupted")
        await self.drain()

    async def drain(self) -> None:
        """Empty the simulated processes' queues, so no capacity fills up between rounds."""
        if is_redis_layer(self.layer):
            await self.delete_keys([f"{self.layer.prefix}specific.{process}!" for process in self.processes])
        else:
            for _, name in self.memberships():
                self.layer.channels.pop(name, None)

    async def delete_keys(self, keys: list[str]) -> None:
        """On every shard: a stock layer's ``send`` may put a process's queue on another (channels_redis#221)."""
        if not keys:
            return
        for index in range(self.layer.ring_size):
            await self.layer.connection(index).delete(*keys)

    async def clean_up(self, progress: Progress) -> None:
        """Remove everything the run created, each step whatever became of the one before."""
        failures = []
        steps = [
            ("open connections", self.unregister_leftovers),
            ("group memberships", self.leave_groups),
            ("queues", self.drain),
            ("users and rows", database_sync_to_async(lambda: delete_users(self.tag))),
        ]
        for what, step in steps:
            try:
                await step()
            except Exception as error:
                failures.append(f"{what}: {error!r}")
        if failures:
            raise CompareError(f"could not remove every throwaway item ({self.tag}*): " + "; ".join(failures))
        progress(f"removed the throwaway users, rows, groups and queues ({self.tag}*)")

    async def unregister_leftovers(self) -> None:
        for user, channel in list(self.connecting):
            for strategy in (MappingStrategy(), GroupStrategy()):
                await strategy.unregister(user, channel)
            self.connecting.discard((user, channel))

    async def leave_groups(self) -> None:
        await run_bounded(self.memberships(), lambda tab: self.layer.group_discard(group_name(tab[0]), tab[1]), 50)


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Row:
    """One line of the table: each strategy's cell and what it means."""

    case: str
    mapping: str
    groups: str
    verdict: str


def latency(stats: dict[str, float]) -> str:
    return f"{stats['p50']:.3f} / {stats['p99']:.3f}"


def lead(mapping: float, groups: float) -> tuple[str, float]:
    """Which strategy is faster and by how much; ``"even"`` within ``EVEN``."""
    if groups >= EVEN * mapping:
        return "mapping", groups / mapping
    if mapping >= EVEN * groups:
        return "groups", mapping / groups
    return "even", 1.0


def verdict(mapping: dict[str, float], groups: dict[str, float]) -> str:
    """E.g. "mapping faster: 15.6x at p50, 16.6x at p99" or "groups 1.3x faster at p50, even at p99"."""
    (first, by50), (second, by99) = lead(mapping["p50"], groups["p50"]), lead(mapping["p99"], groups["p99"])
    if first == second == "even":
        return "even at p50 and p99"
    if first == second:
        return f"{first} faster: {by50:.1f}x at p50, {by99:.1f}x at p99"
    at50 = "even at p50" if first == "even" else f"{first} {by50:.1f}x faster at p50"
    at99 = "even at p99" if second == "even" else f"{second} {by99:.1f}x faster at p99"
    return f"{at50}, {at99}"


def timed_row(case: str, times: dict[str, list[float]]) -> Row:
    mapping, groups = summary(times["mapping"]), summary(times["groups"])
    return Row(case, latency(mapping), latency(groups), verdict(mapping, groups))


def sends_to(dispatcher: dispatch.Dispatcher, users: list[Any]) -> Call:
    async def call(i: int) -> object:
        return await dispatcher.asend_to_user(users[i % len(users)], EVENT, recover=False)

    return call


def fans_out_to(dispatcher: dispatch.Dispatcher, users: list[Any]) -> Call:
    async def call(i: int) -> object:
        return await dispatcher.asend_to_users(users, EVENT, recover=False)

    return call


def connects(strategy: DeliveryStrategy, world: World) -> Call:
    async def call(i: int) -> None:
        user, channel = world.fresh[i % len(world.fresh)], world.new_channel()
        world.connecting.add((user, channel))
        await strategy.register(user, channel)
        await strategy.unregister(user, channel)
        world.connecting.discard((user, channel))

    return call


DISPATCHERS = {"mapping": dispatch.mapping, "groups": groups.groups}


async def measure(world: World, options: Options, progress: Progress) -> list[Row]:
    # Rounds of at most 20 calls between two drains (at most 60 messages in a process's queue) and
    # a short warm-up: a stop is seen within a fraction of a second.
    rounds, warmup, between = max(50, options.iterations // 20), 20, world.next_round
    rows = []
    for count in (1, 3):
        progress(f"measuring send_to_user to a user with {count} tab(s), {options.iterations} calls per strategy")
        await database_sync_to_async(refresh_rows)(world.server)
        users = world.with_tabs(count)
        calls = {name: sends_to(dispatcher, users) for name, dispatcher in DISPATCHERS.items()}
        times = await interleaved(calls, options.iterations, rounds=rounds, between=between, warmup=warmup)
        rows.append(timed_row(f"send_to_user, {count} tab{'s' if count > 1 else ''}", times))

    everyone = list(world.tabs)
    tabs = sum(len(names) for names in world.tabs.values())
    progress(f"measuring send_to_users to {len(everyone)} users ({tabs} tabs), {options.fanouts} per strategy")
    await database_sync_to_async(refresh_rows)(world.server)
    calls = {name: fans_out_to(dispatcher, everyone) for name, dispatcher in DISPATCHERS.items()}
    times = await interleaved(calls, options.fanouts, rounds=options.fanouts, between=between, warmup=2)
    rows.append(timed_row(f"send_to_users, {len(everyone)} users ({tabs} tabs)", times))

    progress(f"measuring connect + disconnect, {options.pairs} per strategy")
    calls = {"mapping": connects(MappingStrategy(), world), "groups": connects(GroupStrategy(), world)}
    times = await interleaved(calls, options.pairs, rounds=max(50, options.pairs // 20), between=between,
                              warmup=warmup)  # fmt: skip
    rows.append(timed_row("connect + disconnect", times))
    rows.extend(await what_each_counts(world))
    return rows


async def what_each_counts(world: World) -> list[Row]:
    await database_sync_to_async(refresh_rows)(world.server)
    [user, *_] = world.with_tabs(3)
    reached = {name: await d.asend_to_user(user, EVENT, recover=False) for name, d in DISPATCHERS.items()}
    await world.drain()
    tabs = Row("counts the tabs it reached", f"yes ({reached['mapping'].sent} of 3)",
               f"no ({reached['groups'].sent})", "only mapping: an ack's `delivered`, Delivery.sent")  # fmt: skip
    online = len(set(world.tabs) & await aonline_user_ids())
    who = Row("tells who is online", f"yes ({online} of {len(world.tabs)})", "no (keeps no rows)",
              "only mapping: online_user_ids(), user_online/user_offline")  # fmt: skip
    return [tabs, who]


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    heading: list[str]
    rows: list[Row]

    def render(self) -> str:
        columns = ["case", "mapping p50 / p99", "groups p50 / p99", "verdict"]
        cells = [columns] + [[row.case, row.mapping, row.groups, row.verdict] for row in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[3]
                 for line in cells]  # fmt: skip
        rule = "  ".join("-" * width for width in [*widths, len("verdict")])
        return "\n".join([*self.heading, "", lines[0], rule, *lines[1:]])


def heading(layer: Any, options: Options) -> list[str]:
    alias = router.db_for_write(UserChannel)
    database = connections[alias]
    return [
        "Mapping (RegistryConsumer) vs per-user groups (GroupConsumer) on this project's stack",
        f"channel layer: {describe(layer)}; database {alias!r}: {database.settings_dict['NAME']} ({database.vendor})",
        f"latencies in ms over {options.iterations} sends per case, {options.fanouts} fan-outs and "
        f"{options.pairs} connects per strategy, taking turns; sent with recover=False (routing only). "
        "Run it twice: a busy machine moves both columns.",
        "Each connect + disconnect is its user's first and last connection: the mapping's includes your "
        "user_online and user_offline receivers.",
    ]


async def compare_strategies(options: Options, progress: Progress, stop: asyncio.Event | None = None) -> Report:
    """Build the throwaway world, measure both strategies, remove the world whatever happened.

    Set ``stop`` (from a SIGINT handler) to end the run at the next round with ``Interrupted``,
    after the clean-up. Cancelling the task is not as safe: on Python 3.11 redis-py can lose a
    cancellation (see ``cancellation.cancellable``), and the run would go on.
    """
    layer = channel_layer()
    check_layer(layer)
    world = World(layer, stop or asyncio.Event())
    try:
        await world.build(options, progress)
        rows = await measure(world, options, progress)
    finally:
        try:
            await world.clean_up(progress)
        finally:
            if hasattr(layer, "close_pools"):  # this event loop's connections: asyncio.run closes it next
                await layer.close_pools()
    return Report(heading(layer, options), rows)
