"""One function per target of issue 5, plus the sharded-send loss (channels_redis#221).

Every function builds its own world (users, rows, group memberships), measures
through the public API — ``channel_registry.dispatch.mapping`` against
``channel_registry.groups.groups``, ``MappingStrategy`` against ``GroupStrategy`` —
and returns a :class:`~benchmarks.stats.Table` with its verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass

from django.conf import settings
from django.test.utils import override_settings

from channel_registry import dispatch, groups
from channel_registry.delivery.fanout import run_bounded, send_many
from channel_registry.delivery.mapping import MappingStrategy
from channel_registry.groups import GroupStrategy, group_name
from channel_registry.registry.liveness import heartbeat, process
from channel_registry.timing import interleaved, sample, summary

from . import world as w
from .probes import BlockingCallbacks, LoopLag
from .stats import Table, progress, ratio

EVENT = {"type": "bench.message", "text": "x" * 64}
#: Targets 1 to 6 compare routing, so they send without the per-user history (both strategies would
#: append to it alike); the history target measures what it adds.
ROUTING_ONLY = False
STRATEGIES = {"mapping": dispatch.mapping, "groups": groups.groups}


@dataclass(frozen=True)
class Scale:
    """How much work each target does; ``--quick`` shrinks everything for a ~50 s smoke run."""

    quick: bool
    sends: int  # timed send_to_user calls per case and strategy (Redis; other layers half)
    fanout_sizes: tuple[int, ...]  # users per fan-out on Redis (other layers: 1,000)
    fanout_reps: dict  # (users, strategy) -> timed fan-outs
    senders: int
    load_seconds: float
    pairs: int  # timed connect+disconnect pairs per strategy
    storm: int
    prune_rows: int
    prune_users: int
    shard_channels: int

    @classmethod
    def make(cls, quick: bool, prune_rows: int | None) -> Scale:
        if quick:
            return cls(True, 300, (1000,), {(1000, "mapping"): 3, (1000, "groups"): 1}, 200, 1.0, 200, 1000,
                       prune_rows or 100_000, 10_000, 200)  # fmt: skip
        reps = {(1000, "mapping"): 20, (1000, "groups"): 4, (10_000, "mapping"): 10, (10_000, "groups"): 2}
        return cls(False, 2000, (1000, 10_000), reps, 200, 10.0, 1000, 1000, prune_rows or 1_000_000, 10_000, 1000)


def use_layer(alias: str):
    """Point the registry's CHANNEL_LAYER option at ``alias`` for the block."""
    return override_settings(CHANNEL_REGISTRY={**settings.CHANNEL_REGISTRY, "CHANNEL_LAYER": alias})


def orm_path():
    """``NATIVE_POSTGRES=False`` for the block (the registry's ORM path), or None if the option is gone."""
    from channel_registry.conf import OPTION_NAMES

    if "NATIVE_POSTGRES" not in OPTION_NAMES:
        return None
    return override_settings(CHANNEL_REGISTRY={**settings.CHANNEL_REGISTRY, "NATIVE_POSTGRES": False})


def spread(rng: random.Random, count: int) -> list[int]:
    """Channels per user, 1 to 3."""
    return [rng.randint(1, 3) for _ in range(count)]


def to_user(dispatcher, users: list[int]):
    async def call(i: int):
        return await dispatcher.asend_to_user(users[i % len(users)], EVENT, recover=ROUTING_ONLY)

    return call


async def ping_floor(iterations: int) -> dict:
    connection = w.get_layer("default").connection(0)

    async def ping(_):
        await connection.ping()

    return summary(await sample(ping, iterations, warmup=50))


# --- target 1 ----------------------------------------------------------------------------


async def target_1(scale: Scale) -> Table:
    table = Table("1", "Target 1 — send_to_user, registry lookup + delivery (ms)", [
        "layer, channels", "mapping p50", "mapping p99", "groups p50", "groups p99",
        "ratio p50", "ratio p99", "PING p50", "layer.send p50", "layer.send p99",
    ])  # fmt: skip
    rng = random.Random(1)
    ping = await ping_floor(scale.sends)
    for alias, label in w.LAYERS.items():
        with use_layer(alias):
            progress(f"target 1: {label}")
            world = await w.build_world(alias, [1] * 200 + [3] * 200, seed=rng.random())
            n = scale.sends if alias == "default" else scale.sends // 2
            first = world.users[world.with_channels(1)[0]][0]

            async def plain_send(_, layer=world.layer, name=first):
                await layer.send(name, EVENT)

            floor = summary(await sample(plain_send, n, warmup=50, rounds=5, between=world.drain))
            for count in (1, 3):
                users = world.with_channels(count)
                delivery = await dispatch.mapping.asend_to_user(users[0], EVENT, recover=ROUTING_ONLY)
                assert delivery.sent == count and not delivery.failed, delivery
                times = await interleaved({k: to_user(d, users) for k, d in STRATEGIES.items()}, n, between=world.drain)
                m, g = summary(times["mapping"]), summary(times["groups"])
                table.add(f"{label}, {count} ch", m["p50"], m["p99"], g["p50"], g["p99"],
                          ratio(m["p50"], g["p50"]), ratio(m["p99"], g["p99"]),
                          ping["p50"] if alias != "memory" else None, floor["p50"], floor["p99"])  # fmt: skip
                table.data[f"{alias}/{count}"] = {"mapping": m, "groups": g, "layer_send": floor}
                if alias == "default":
                    for which, stat in (("p50", "p50"), ("p99", "p99")):
                        r = ratio(m[stat], g[stat])
                        table.check(f"redis, {count} channel(s): mapping/groups {which} ≤ 1.0", r <= 1.0, f"{r:.2f}x")
                    if (override := orm_path()) is not None:
                        with override:  # the same comparison over the ORM path, for the record
                            times = await interleaved({k: to_user(d, users) for k, d in STRATEGIES.items()}, n // 2,
                                                  between=world.drain)  # fmt: skip
                        m, g = summary(times["mapping"]), summary(times["groups"])
                        table.add("  same, NATIVE_POSTGRES=False", m["p50"], m["p99"], g["p50"], g["p99"],
                                  ratio(m["p50"], g["p50"]), ratio(m["p99"], g["p99"]), None, None, None)
                        table.data[f"{alias}/{count}/orm"] = {"mapping": m, "groups": g}
            await world.drain()
    table.data["ping"] = ping
    table.notes.append("PING and layer.send are floors: one Redis round trip, and channels_redis's own send "
                       "(4 commands) to one channel; pub/sub's PING is the same Redis server's.")
    return table


# --- target 2 ----------------------------------------------------------------------------


async def fan_out(dispatcher, users: list[int], reps: int, world: w.World) -> tuple[list[float], list, Counter]:
    times, deliveries, errors = [], [], Counter()
    for _ in range(reps):
        start = time.perf_counter()
        try:
            deliveries.append(await dispatcher.asend_to_users(users, EVENT, recover=ROUTING_ONLY))
        except Exception as error:  # reported in the table: "never fails for size"
            errors[type(error).__name__] += 1
        times.append(time.perf_counter() - start)
        await world.drain()
    return times, deliveries, errors


async def peak_memory(call) -> float:
    """Peak MiB allocated by Python while ``call()`` runs (tracemalloc, untimed run)."""
    tracemalloc.start()
    try:
        await call()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


async def target_2(scale: Scale) -> Table:
    table = Table("2", "Target 2 — fan-out of one event with send_to_users (ms per fan-out)", [
        "layer, users", "channels", "mapping p50", "mapping p99", "groups p50", "groups p99",
        "speed-up p50", "failed/errors", "peak MiB mapping", "peak MiB groups",
    ])  # fmt: skip
    rng = random.Random(2)
    cases = [("default", max(scale.fanout_sizes), scale.fanout_sizes), ("memory", 1000, (1000,)),
             ("pubsub", 1000, (1000,))]  # fmt: skip
    for alias, world_size, sizes in cases:
        with use_layer(alias):
            progress(f"target 2: {w.LAYERS[alias]} world of {world_size:,} users")
            world = await w.build_world(alias, spread(rng, world_size), seed=rng.random())
            everyone = list(world.users)
            for size in sizes:
                users = everyone[:size]
                channels = sum(len(world.users[u]) for u in users)
                reps = {k: scale.fanout_reps[(size, k)] for k in STRATEGIES}
                if alias != "default":
                    reps = {k: max(1, v // 2) for k, v in reps.items()}
                results = {}
                for name, dispatcher in STRATEGIES.items():
                    progress(f"  {name}: {reps[name]} fan-out(s) to {size:,} users / {channels:,} channels")
                    await fan_out(dispatcher, users, 1, world)  # warm-up
                    results[name] = await fan_out(dispatcher, users, reps[name], world)
                m_times, m_deliveries, m_errors = results["mapping"]
                g_times, _, g_errors = results["groups"]
                failed = sum(len(d.failed) for d in m_deliveries)
                short = sum(d.sent != channels for d in m_deliveries)
                peaks = {}
                for name, dispatcher in STRATEGIES.items():
                    peaks[name] = await peak_memory(
                        lambda d=dispatcher, u=users: d.asend_to_users(u, EVENT, recover=ROUTING_ONLY)
                    )
                    await world.drain()
                m, g = summary(m_times), summary(g_times)
                speedup = ratio(g["p50"], m["p50"])
                problems = failed + short + sum(m_errors.values()) + sum(g_errors.values())
                table.add(f"{w.LAYERS[alias]}, {size:,}", channels, m["p50"], m["p99"], g["p50"], g["p99"],
                          f"{speedup:.1f}x", f"{failed + short}/{dict(m_errors) or 0}/{dict(g_errors) or 0}",
                          peaks["mapping"], peaks["groups"])  # fmt: skip
                table.data[f"{alias}/{size}"] = {
                    "channels": channels, "mapping": m, "groups": g, "speedup_p50": speedup,
                    "mapping_errors": dict(m_errors), "groups_errors": dict(g_errors), "failed": failed,
                    "short_deliveries": short, "peak_mib": peaks,
                }  # fmt: skip
                if alias == "default":
                    table.check(f"redis, {size:,} users: mapping ≥ 20x faster than a group_send per user",
                                speedup >= 20, f"{speedup:.1f}x")
                    table.check(f"redis, {size:,} users: no failure, no error", problems == 0,
                                f"{problems} problem(s)")
            if alias == "default":
                pool = world.layer.connection(0).connection_pool
                table.data["redis_pool_connections"] = len(pool._available_connections) + len(pool._in_use_connections)
                table.notes.append(f"Redis connections in the layer's pool after every fan-out: "
                                   f"{table.data['redis_pool_connections']} (redis-py 8 refuses a 101st).")
            await world.drain()
    table.notes.append("failed/errors: mapping channels failed or not reached / mapping exceptions / "
                       "groups exceptions. "
                       "Peak MiB: Python allocations during one fan-out (tracemalloc).")
    table.notes.append("in-memory and pub/sub run 1,000 users only: InMemoryChannelLayer.group_send scans every "
                       "membership of every group per call (O(users x channels) for a fan-out).")
    return table


# --- target 3 ----------------------------------------------------------------------------


class Load:
    """``senders`` tasks calling asend_to_user back to back, over one or more rounds of ``run()``.

    ``in_flight``: an optional cap on concurrent calls, held by the harness.
    Rounds add up, so strategies can take turns and drift on a shared machine hits all alike.
    """

    def __init__(self, dispatcher, users: list[int], senders: int, in_flight: int | None = None) -> None:
        self.dispatcher, self.users, self.senders = dispatcher, users, senders
        self.gate = asyncio.Semaphore(in_flight) if in_flight else contextlib.nullcontext()
        self.latencies: list[float] = []
        self.errors: Counter = Counter()
        self.elapsed = self.cpu = 0.0
        self.lag, self.blocks = LoopLag(), BlockingCallbacks()

    async def run(self, seconds: float, world: w.World) -> None:
        clock = time.perf_counter
        deadline = clock() + seconds

        async def sender(seed: int) -> None:
            rng = random.Random(seed)
            while clock() < deadline:
                user = self.users[rng.randrange(len(self.users))]
                start = clock()
                try:
                    async with self.gate:
                        await self.dispatcher.asend_to_user(user, EVENT, recover=ROUTING_ONLY)
                except Exception as error:
                    self.errors[type(error).__name__] += 1
                else:
                    self.latencies.append(clock() - start)

        async with self.lag:
            with self.blocks:
                started, cpu = clock(), time.process_time()
                await asyncio.gather(*(sender(i) for i in range(self.senders)))
                self.elapsed += clock() - started
                self.cpu += time.process_time() - cpu
        await world.drain()

    def result(self) -> dict:
        messages = len(self.latencies)
        return {
            "messages": messages, "per_second": messages / self.elapsed, "errors": dict(self.errors),
            "cpu_us_per_message": 1e6 * self.cpu / max(1, messages), "latency": summary(self.latencies),
            "loop_lag": self.lag.summary(), "callbacks": self.blocks.summary(),
        }  # fmt: skip


async def target_3(scale: Scale) -> Table:
    title = f"Target 3 — {scale.senders} concurrent senders for {scale.load_seconds:g} s, one process (redis)"
    table = Table("3", title, [
        "strategy", "messages/s", "errors", "CPU µs/msg", "send p50 ms", "send p99 ms", "loop lag p99 ms",
        "loop lag max ms", "longest step ms", "own CPU ms", "steps > 5 ms own", "longest GC ms", "its CPU ms",
    ])  # fmt: skip
    world = await w.build_world("default", spread(random.Random(3), 1000), seed=3)
    users = list(world.users)
    runs = {
        "mapping": (dispatch.mapping, None),
        "groups": (groups.groups, None),
        # redis-py 8's pool refuses the 101st concurrent command: what groups reach when callers stay under it.
        "groups, ≤ 50 in flight": (groups.groups, 50),
    }
    loads = {name: Load(dispatcher, users, scale.senders, cap) for name, (dispatcher, cap) in runs.items()}
    for dispatcher, cap in runs.values():  # warm-up
        await Load(dispatcher, users, scale.senders, cap).run(min(1.0, scale.load_seconds / 5), world)
    rounds = 5
    for i in range(rounds):
        progress(f"target 3: round {i + 1}/{rounds}, {scale.senders} senders x {scale.load_seconds / rounds:g} s "
                 f"for each of {', '.join(runs)}")  # fmt: skip
        for run in loads.values():
            await run.run(scale.load_seconds / rounds, world)
    results = {name: run.result() for name, run in loads.items()}
    for name, r in results.items():
        table.add(name, r["per_second"], sum(r["errors"].values()), r["cpu_us_per_message"], r["latency"]["p50"],
                  r["latency"]["p99"], r["loop_lag"]["p99"], r["loop_lag"]["max"], r["callbacks"]["longest_ms"],
                  r["callbacks"]["longest_own_cpu_ms"], r["callbacks"]["over_threshold_own_cpu"],
                  r["callbacks"]["gc_longest_ms"], r["callbacks"]["gc_longest_cpu_ms"])  # fmt: skip
    table.data = results
    m = results["mapping"]
    best = max(results["groups"]["per_second"], results["groups, ≤ 50 in flight"]["per_second"])
    table.check("mapping messages/s ≥ groups (the better of the two groups rows)", m["per_second"] >= best,
                f"{m['per_second']:,.0f} vs {best:,.0f}/s ({ratio(m['per_second'], best):.2f}x)")
    steps = m["callbacks"]
    table.check("loop never blocked > 5 ms by the mapping dispatcher (a step's own CPU, GC excluded)",
                steps["longest_own_cpu_ms"] <= 5,
                f"longest step {steps['longest_own_cpu_ms']:.1f} ms own CPU ({steps['longest_ms']:.1f} ms wall), "
                f"{steps['over_threshold_own_cpu']} step(s) over 5 ms {steps['slowest_by_coroutine'] or ''}, "
                f"{steps['over_threshold_wall']} over 5 ms wall")
    table.check("... and no GC pause > 5 ms of CPU in the sending process (the process's, not the dispatcher's)",
                steps["gc_over_threshold_cpu"] == 0,
                f"{steps['gc_over_threshold_cpu']} of {steps['gc_collections']} collections over 5 ms CPU, "
                f"longest {steps['gc_longest_cpu_ms']:.1f} ms CPU ({steps['gc_longest_ms']:.1f} ms wall)")
    for name, r in results.items():
        if r["errors"]:
            table.notes.append(f"{name} errors: {r['errors']}")
    table.notes.append(f"{rounds} interleaved rounds of {scale.load_seconds / rounds:g} s per strategy. CPU µs/msg: "
                       "this process's CPU time (every thread) per message sent; Redis and PostgreSQL run "
                       "on the same machine and are not counted.")
    table.notes.append("loop lag: how late a 1 ms sleep wakes up (it also waits behind the 200 senders' own "
                       "steps). longest step: the longest single callback (task step), wall clock, and the CPU "
                       "this thread spent in it minus GC pauses (own): wall >> own means the process was "
                       "waiting (OS scheduling on a busy machine, the GIL) or collecting garbage, not the "
                       "dispatcher working.")
    return table


# --- target 4 ----------------------------------------------------------------------------


async def target_4(scale: Scale) -> Table:
    table = Table("4", "Target 4 — connect + disconnect bookkeeping (ms) and a reconnect storm", [
        "case", "mapping p50", "mapping p99", "groups p50", "groups p99", "ratio p50", "ratio p99",
    ])  # fmt: skip
    strategies = {"mapping": MappingStrategy(), "groups": GroupStrategy()}
    layer = w.get_layer("default")
    receiver = w.receivers_for("default", layer)[0]
    users = await w.db(w.create_users)(scale.pairs)
    progress(f"target 4: {scale.pairs} connect + disconnect pairs per strategy")
    warmup = await w.db(w.create_users)(50)
    times = await bookkeeping(strategies, warmup, users, receiver)
    rows = [("pair", "connect + disconnect"), ("register", "  connect"), ("unregister", "  disconnect")]
    for step, label in rows:
        m, g = summary(times["mapping"][step]), summary(times["groups"][step])
        table.add(label, m["p50"], m["p99"], g["p50"], g["p99"], ratio(m["p50"], g["p50"]), ratio(m["p99"], g["p99"]))
        table.data[step] = {"mapping": m, "groups": g}
    progress("target 4: floors, a bare psycopg connection and Redis PINGs")
    floors = await bookkeeping_floors(users, receiver)
    for step, label in rows:
        m, g = summary(floors["mapping"][step]), summary(floors["groups"][step])
        table.add(f"floor: {label.strip()}", m["p50"], m["p99"], g["p50"], g["p99"], ratio(m["p50"], g["p50"]),
                  ratio(m["p99"], g["p99"]))  # fmt: skip
        table.data[f"floor/{step}"] = {"mapping": m, "groups": g}
    for stat in ("p50", "p99"):
        r = ratio(table.data["pair"]["mapping"][stat], table.data["pair"]["groups"][stat])
        floor = ratio(table.data["floor/pair"]["mapping"][stat], table.data["floor/pair"]["groups"][stat])
        table.check(f"connect + disconnect {stat} ≤ 2x group_add + group_discard", r <= 2,
                    f"{r:.2f}x (bare-client floor {floor:.2f}x)")
    table.notes.append("floor, mapping columns: a bare psycopg connection running what a connect and a disconnect "
                       "must do at least, one simple query each: BEGIN; SET LOCAL synchronous_commit TO OFF; lock "
                       "the user row; INSERT (or DELETE) the channel row; COMMIT. Groups columns: Redis PINGs, "
                       "one per round trip channels_redis makes (group_add: ZADD then EXPIRE; group_discard: ZREM).")
    if (override := orm_path()) is not None:
        progress("target 4: the same over the ORM path (NATIVE_POSTGRES=False)")
        with override:
            orm = await bookkeeping(strategies, warmup, users[: len(users) // 2], receiver)
        for step, label in rows:
            m, g = summary(orm["mapping"][step]), summary(orm["groups"][step])
            table.add(f"{label}, NATIVE_POSTGRES=False", m["p50"], m["p99"], g["p50"], g["p99"],
                      ratio(m["p50"], g["p50"]), ratio(m["p99"], g["p99"]))  # fmt: skip
            table.data[f"{step}/orm"] = {"mapping": m, "groups": g}

    # Reconnect storm: every socket of the process reconnects at once (2 per user).
    progress(f"target 4: reconnect storm of {scale.storm} sockets")
    storm_users = await w.db(w.create_users)(scale.storm // 2)
    sockets = [(user, await receiver.new_channel()) for user in storm_users for _ in range(2)]
    storm = {}
    for name, strategy in strategies.items():
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(strategy.register(u, c) for u, c in sockets), return_exceptions=True)
        elapsed = time.perf_counter() - start
        errors = Counter(type(o).__name__ for o in outcomes if isinstance(o, BaseException))
        reachable = await reachable_sockets(name, storm_users, layer)
        storm[name] = {"seconds": elapsed, "errors": dict(errors), "reachable": reachable}
    table.add(f"storm of {len(sockets):,}: seconds", storm["mapping"]["seconds"], None,
              storm["groups"]["seconds"], None, ratio(storm["mapping"]["seconds"], storm["groups"]["seconds"]), None)
    table.add("storm: reachable sockets", storm["mapping"]["reachable"], None, storm["groups"]["reachable"], None,
              None, None)
    table.add("storm: errors", sum(storm["mapping"]["errors"].values()), None,
              sum(storm["groups"]["errors"].values()), None, None, None)
    table.data["storm"] = storm
    m = storm["mapping"]
    table.check(f"storm of {len(sockets):,} sockets fully registered and reachable in < 1 s",
                m["seconds"] < 1 and m["reachable"] == len(sockets) and not m["errors"],
                f"{m['seconds']:.2f} s, {m['reachable']}/{len(sockets)} reachable, errors {m['errors'] or 0}")
    for name, r in storm.items():
        if r["errors"]:
            table.notes.append(f"storm, {name}: {r['errors']}")
    table.notes.append("groups' storm reachability counts group members in Redis (ZCARD); mapping's counts "
                       "channels send_to_user reached (Delivery.sent).")
    # Leave nothing registered in this process: the heartbeat would keep refreshing it.
    await run_bounded(sockets, lambda s: strategies["mapping"].unregister(*s), 20)
    for user, channel in sockets:
        await strategies["groups"].unregister(user, channel)
    heartbeat.stop()
    return table


async def bookkeeping(strategies: dict, warmup: list[int], users: list[int], receiver) -> dict:
    """register + unregister of a fresh channel for each user (its first and last connection)."""
    times = {name: {"register": [], "unregister": [], "pair": []} for name in strategies}
    clock = time.perf_counter
    rounds = [warmup] + [users[i::5] for i in range(5)]  # interleaved so drift hits both alike
    for rnd, chunk in enumerate(rounds):
        for name, strategy in strategies.items():
            for user in chunk:
                channel = await receiver.new_channel()
                start = clock()
                await strategy.register(user, channel)
                middle = clock()
                await strategy.unregister(user, channel)
                end = clock()
                if rnd:  # round 0 is the warm-up
                    times[name]["register"].append(middle - start)
                    times[name]["unregister"].append(end - middle)
                    times[name]["pair"].append(end - start)
    return times


async def bookkeeping_floors(users: list[int], receiver) -> dict:
    """The least a connect and a disconnect cost on each side, without the library."""
    import psycopg
    from django.contrib.auth import get_user_model
    from django.db import connection

    from channel_registry.models import UserChannel

    quote = connection.ops.quote_name
    user_meta = get_user_model()._meta
    table = quote(UserChannel._meta.db_table)
    lock = (f"BEGIN; SET LOCAL synchronous_commit TO OFF; SELECT 1 FROM {quote(user_meta.db_table)} "
            f"WHERE {quote(user_meta.pk.column)} = %s FOR UPDATE")  # fmt: skip
    insert = (f"{lock}; INSERT INTO {table} (user_id, channel_name, server, connected_at, last_seen) "
              "VALUES (%s, %s, 'bench-floor', now(), now()); COMMIT")  # fmt: skip
    delete = f"{lock}; DELETE FROM {table} WHERE channel_name = %s; COMMIT"
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    redis = w.get_layer("default").connection(0)

    async def postgres_pair(user: int, name: str, cursor) -> tuple[float, float]:
        start = time.perf_counter()
        await cursor.execute(insert, [user, user, name])
        middle = time.perf_counter()
        await cursor.execute(delete, [user, name])
        return middle - start, time.perf_counter() - middle

    async def redis_pair(*_) -> tuple[float, float]:
        start = time.perf_counter()
        await redis.ping()
        await redis.ping()
        middle = time.perf_counter()
        await redis.ping()
        return middle - start, time.perf_counter() - middle

    times = {name: {"register": [], "unregister": [], "pair": []} for name in ("mapping", "groups")}
    async with await psycopg.AsyncConnection.connect(autocommit=True, **params) as conn:
        cursor = psycopg.AsyncClientCursor(conn)
        for rnd, chunk in enumerate([users[:50]] + [users[i::5] for i in range(5)]):
            for name, pair in (("mapping", postgres_pair), ("groups", redis_pair)):
                for user in chunk:
                    connect, disconnect = await pair(user, await receiver.new_channel(), cursor)
                    if rnd:  # round 0 is the warm-up
                        times[name]["register"].append(connect)
                        times[name]["unregister"].append(disconnect)
                        times[name]["pair"].append(connect + disconnect)
    return times


async def reachable_sockets(strategy: str, users: list[int], layer) -> int:
    if strategy == "mapping":
        total = 0

        async def reach(user) -> None:
            nonlocal total
            delivery = await dispatch.mapping.asend_to_user(user, EVENT, recover=ROUTING_ONLY)
            total += delivery.sent  # not `total += await …`: that reads total before awaiting

        await run_bounded(users, reach, 20)
        return total
    pipe = layer.connection(0).pipeline()
    for user in users:
        pipe.zcard(layer._group_key(group_name(user)))
    return sum(await pipe.execute())


# --- target 5 ----------------------------------------------------------------------------


def count_beat_statements(server: str, count: int, prune_first: bool) -> tuple[int, int, float]:
    """(statements, rows refreshed, ms) of one ``beat()`` with ``count`` local channels."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from channel_registry.models import UserChannel
    from channel_registry.registry.liveness import beat

    if prune_first:  # as if prune_channels had removed this process's rows during a stall
        UserChannel.objects.filter(server=server).delete()
    with CaptureQueriesContext(connection) as queries:
        start = time.perf_counter()
        refreshed = beat()
        spent = time.perf_counter() - start
    return len(queries.captured_queries), refreshed, spent * 1000


async def target_5(scale: Scale) -> Table:
    title = "Target 5 — heartbeat statements per process per interval (CaptureQueriesContext around beat())"
    table = Table("5", title, [
        "local connections", "statements", "rows refreshed", "ms", "after a prune: statements", "ms",
    ])  # fmt: skip
    for count in (10, 10_000):
        progress(f"target 5: beat() with {count:,} local connections")
        await w.db(w.reset_tables)()
        users = await w.db(w.create_users)(max(1, count // 2))
        channels = {f"specific.beat{os.getpid()}!{i}": users[i % len(users)] for i in range(count)}
        await w.db(w.add_rows)([(u, c) for c, u in channels.items()], process.server)
        process.open.clear()
        process.open.update({c: process.registration(u, "") for c, u in channels.items()})
        try:
            steady = await w.db(count_beat_statements)(process.server, count, False)
            restored = await w.db(count_beat_statements)(process.server, count, True)
        finally:
            process.open.clear()
        table.add(f"{count:,}", steady[0], steady[1], steady[2], restored[0], restored[2])
        table.data[str(count)] = {"statements": steady[0], "refreshed": steady[1], "ms": steady[2],
                                  "after_prune_statements": restored[0], "after_prune_ms": restored[2]}
        table.check(f"{count:,} connections: one statement per beat", steady[0] == 1, f"{steady[0]} statement(s)")
    table.notes.append("'after a prune': the process's rows were deleted while it stalled; beat() re-inserts them "
                       "(UPDATE, then BEGIN; INSERT … ON CONFLICT DO NOTHING; COMMIT: 4 captured).")
    return table


# --- target 6 ----------------------------------------------------------------------------


def insert_stale_rows(rows: int, users: list[int]) -> float:
    """``rows`` rows last seen a day ago, spread over ``users``, in one statement. Returns seconds."""
    from django.db import connection

    from channel_registry.models import UserChannel

    table = connection.ops.quote_name(UserChannel._meta.db_table)
    start = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (user_id, channel_name, server, connected_at, last_seen)"
            " SELECT %s + (g %% %s), 'specific.dead' || (g %% 50) || '!' || g, 'dead-' || (g %% 50),"
            " now() - interval '1 day', now() - interval '1 day' FROM generate_series(1, %s) AS g",
            [users[0], len(users), rows],
        )
        cursor.execute(f"ANALYZE {table}")
    return time.perf_counter() - start


def count_rows() -> tuple[int, int]:
    from channel_registry.models import UserChannel

    return UserChannel.objects.stale().count(), UserChannel.objects.live().count()


async def target_6(scale: Scale) -> Table:
    table = Table("6", f"Target 6 — prune_channels over {scale.prune_rows:,} stale rows, send_to_user meanwhile", [
        "phase", "seconds", "rows deleted", "send p50 ms", "send p99 ms", "send max ms", "sends",
    ])  # fmt: skip
    progress(f"target 6: {scale.prune_users:,} users, {scale.prune_rows:,} stale rows")
    users = await w.db(w.create_users)(scale.prune_users)
    insert_seconds = await w.db(insert_stale_rows)(scale.prune_rows, users)
    progress(f"  inserted in {insert_seconds:.1f} s")
    # Live users among those with stale rows (a crashed process's rows plus today's sockets).
    world = await live_world(users[:200])
    live_users = list(world.users)
    send = to_user(dispatch.mapping, live_users)
    before = await sample(send, 1000 if not scale.quick else 300, warmup=50, rounds=5, between=world.drain)
    b = summary(before)
    table.add("send_to_user, 1 M stale rows in the table" if scale.prune_rows >= 10**6 else
              "send_to_user, stale rows in the table", None, None, b["p50"], b["p99"], b["max"], b["n"])

    progress("  prune_stale() in its own process (as prune_channels runs), send_to_user meanwhile")
    during: list[float] = []
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.prune_worker", stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "benchmarks.settings"},
    )
    reader = asyncio.create_task(worker.stdout.read())
    clock = time.perf_counter
    i = 0
    while not reader.done():
        start = clock()
        await send(i)
        during.append(clock() - start)
        i += 1
        if i % 200 == 0:
            await world.drain()
    await worker.wait()
    await world.drain()
    report = json.loads(reader.result().decode().strip().splitlines()[-1])
    d = summary(during)
    stale_left, live_left = await w.db(count_rows)()
    table.add("prune_stale(), send_to_user meanwhile", report["seconds"], report["deleted"],
              d["p50"], d["p99"], d["max"], d["n"])  # fmt: skip
    for kind, stats in report["statements"].items():
        table.add(f"  {kind}", stats["seconds"], stats["count"], stats["p50_ms"], stats["p99_ms"], stats["max_ms"],
                  None)
    table.data = {"insert_seconds": insert_seconds, "before": b, "during": d, "prune": report,
                  "stale_left": stale_left, "live_left": live_left}
    table.check(f"{scale.prune_rows:,} stale rows removed in < 30 s",
                report["seconds"] < 30 and stale_left == 0 and report["deleted"] == scale.prune_rows,
                f"{report['seconds']:.1f} s, {report['deleted']:,} deleted, {stale_left} stale left")
    table.check("send_to_user p99 < 10 ms while prune runs", d["p99"] < 10, f"p99 {d['p99']:.2f} ms")
    table.check("live rows untouched", live_left == world.channel_count, f"{live_left}/{world.channel_count}")
    table.notes.append(f"stale rows inserted with one INSERT … SELECT generate_series in {insert_seconds:.1f} s. "
                       "Indented rows: the prune's own statements by kind (seconds = total, rows column = count, "
                       "then per-statement p50/p99/max ms).")
    return table


async def live_world(users: list[int]) -> w.World:
    """1-3 live channels for each of ``users`` (already created), mapping only."""
    layer = w.get_layer("default")
    world = w.World("default", layer, receivers=w.receivers_for("default", layer))
    rng = random.Random(6)
    for user in users:
        world.users[user] = [await rng.choice(world.receivers).new_channel() for _ in range(rng.randint(1, 3))]
    await w.db(w.add_rows)([(u, c) for u, names in world.users.items() for c in names])
    await w.db(w.analyze)()
    return world


# --- channels_redis#221 ------------------------------------------------------------------


async def received_channels(receivers, quiet: float = 0.5) -> set[str]:
    """Every channel name ``receive`` would hand a message to, read the way ``receive`` reads."""
    got: set[str] = set()

    async def drain(receiver) -> None:
        local = f"specific.{receiver.client_prefix}!"
        while True:
            try:
                channel, _ = await asyncio.wait_for(receiver.receive_single(local), quiet)
            except TimeoutError:
                return
            got.update(channel if isinstance(channel, list) else [channel])

    await asyncio.gather(*(drain(r) for r in receivers))
    return got


async def target_receive(scale: Scale) -> Table:
    """Issue 11: one process receiving on 1,000 local channels, the library's layer against channels_redis's."""
    from channels_redis.core import RedisChannelLayer

    from channel_registry.layers import redis_host
    from channel_registry.redis.layer import BatchedRedisChannelLayer

    table = Table("receive", "Issue 11 — raw receive, one process, 1,000 local channels (messages/s)", [
        "layer", "messages", "seconds", "messages/s", "ratio",
    ])  # fmt: skip
    per_channel = 5 if scale.quick else 20
    config = {"hosts": [redis_host(settings.REDIS_URL)], "prefix": f"{settings.KEY_PREFIX}rx",
              "capacity": settings.CAPACITY}  # fmt: skip
    sender = BatchedRedisChannelLayer(**config)  # its send: one EVAL on the right shard
    rates = {}
    for label, cls in (("RedisChannelLayer (stock)", RedisChannelLayer),
                       ("BatchedRedisChannelLayer (library)", BatchedRedisChannelLayer)):  # fmt: skip
        receiver = cls(**config)
        channels = [await receiver.new_channel() for _ in range(1000)]
        for n in range(per_channel):  # one message per channel, as a direct message is (send_many would coalesce)
            await run_bounded(channels, lambda channel: sender.send(channel, {**EVENT, "n": n}), 50)  # noqa: B023

        async def drain(channel: str, receiver=receiver) -> None:
            for n in range(per_channel):
                assert (await receiver.receive(channel))["n"] == n

        progress(f"receive: {label}, {per_channel * len(channels):,} messages")
        started = time.perf_counter()
        await asyncio.gather(*(drain(channel) for channel in channels))
        seconds = time.perf_counter() - started
        rates[label] = per_channel * len(channels) / seconds
        table.add(label, per_channel * len(channels), seconds, rates[label], rates[label] / next(iter(rates.values())))
        await receiver.close_pools()
    await sender.close_pools()
    stock, batched = rates.values()
    table.data = {"per_channel": per_channel, "channels": 1000, "per_second": rates, "ratio": batched / stock}
    table.check("library layer's receive >= 10x channels_redis's (1,000 local channels)", batched >= 10 * stock,
                f"{batched / stock:.1f}x")
    table.notes.append("one message per channel and round sent first, then 1,000 concurrent receive loops "
                       "drain them, each checking its order.")
    return table


async def target_sharding(scale: Scale) -> Table:
    from channels_redis.core import RedisChannelLayer

    from channel_registry.layers import redis_host
    from tests.redis_servers import RedisServer

    table = Table("sharding", "channels_redis#221 — delivery to channels on a layer sharded over two Redis servers", [
        "method", "sent", "received", "lost", "delivered %",
    ])  # fmt: skip
    progress("sharding: two private redis-server processes")
    with RedisServer() as first, RedisServer() as second:
        config = {"hosts": [redis_host(first.url), redis_host(second.url)], "prefix": f"{settings.KEY_PREFIX}sh",
                  "capacity": settings.CAPACITY}
        sender = RedisChannelLayer(**config)
        receivers = [RedisChannelLayer(**config) for _ in range(w.RECEIVERS)]
        names = [await receivers[i % len(receivers)].new_channel() for i in range(scale.shard_channels)]

        async def plain() -> None:
            await run_bounded(names, lambda name: sender.send(name, EVENT), 50)

        async def batched() -> None:
            assert not await send_many(sender, names, EVENT)

        async def grouped() -> None:
            await run_bounded(names, lambda name: sender.group_add("bench221", name), 50)
            await sender.group_send("bench221", EVENT)

        results = {}
        for label, send in (("plain layer.send", plain), ("send_many (mapping)", batched), ("group_send", grouped)):
            await send()
            got = len(await received_channels(receivers) & set(names))
            results[label] = got
            table.add(label, len(names), got, len(names) - got, 100 * got / len(names))
        for layer in (sender, *receivers):
            await layer.close_pools()
    table.data = {"channels": len(names), "received": results}
    table.check("send_many delivers 100 % on a sharded layer", results["send_many (mapping)"] == len(names),
                f"{results['send_many (mapping)']}/{len(names)}")
    table.notes.append("received = channels whose message receive() returns (receive_single on the receiving "
                       "process's key, the shard receive reads); plain send hashes the full name instead.")
    return table


# --- history -----------------------------------------------------------------------------


async def target_history(scale: Scale) -> Table:
    from channel_registry.history.cursor import Cursor
    from channel_registry.history.log import RedisHistory, history_for

    table = Table("history", "History — send_to_user with the per-user history vs without (ms), resume cost", [
        "case", "p50", "p99", "ratio p50", "ratio p99",
    ])  # fmt: skip
    progress("history: send_to_user with and without, on Redis")
    world = await w.build_world("default", [1] * 400, seed=7)
    users = world.with_channels(1)

    def send(recover: bool):
        async def call(i: int):
            return await dispatch.mapping.asend_to_user(users[i % len(users)], EVENT, recover=recover)

        return call

    times = await interleaved({"without": send(False), "with": send(True)}, scale.sends, between=world.drain)
    without, with_history = summary(times["without"]), summary(times["with"])
    r50, r99 = ratio(with_history["p50"], without["p50"]), ratio(with_history["p99"], without["p99"])
    table.add("send_to_user, 1 channel, recover=False", without["p50"], without["p99"], None, None)
    table.add("send_to_user, 1 channel, recover=True (default)", with_history["p50"], with_history["p99"], r50, r99)
    for which, value in (("p50", r50), ("p99", r99)):
        table.check(f"send_to_user with history / without, {which} ≤ 1.5", value <= 1.5, f"{value:.2f}x")

    async def fan_out(recover: bool) -> None:
        await dispatch.mapping.asend_to_users(users, EVENT, recover=recover)

    fan = {label: summary(await sample(lambda _, r=recover: fan_out(r), 20, warmup=3, between=world.drain))
           for label, recover in (("without", False), ("with", True))}  # fmt: skip
    table.add(f"send_to_users, {len(users)} users, recover=False", fan["without"]["p50"], fan["without"]["p99"],
              None, None)  # fmt: skip
    table.add(f"send_to_users, {len(users)} users, recover=True", fan["with"]["p50"], fan["with"]["p99"],
              ratio(fan["with"]["p50"], fan["without"]["p50"]), ratio(fan["with"]["p99"], fan["without"]["p99"]))

    history = history_for(world.layer)
    assert isinstance(history, RedisHistory)
    reader = users[0]
    since = (await history.read(reader, None)).head
    for _ in range(100):
        await history.append([reader], EVENT)

    async def resume(_):
        events = await Cursor(history, reader).start(str(since))
        assert len(events) == 101  # 100 events and "recovered"

    async def new_client(_):
        await Cursor(history, reader).start(None)

    resumed, fresh = summary(await sample(resume, 500, warmup=20)), summary(await sample(new_client, 500, warmup=20))
    table.add("resume: read and decode 100 missed events", resumed["p50"], resumed["p99"], None, None)
    table.add("connect of a new client: read the position", fresh["p50"], fresh["p99"], None, None)

    full = users[1]
    for _ in range(300):
        await history.append([full], EVENT)
    shard, head_key, stream_key = history.keys(full)
    connection = world.layer.connection(shard)
    stream_bytes = await connection.memory_usage(stream_key)
    head_bytes = await connection.memory_usage(head_key)
    table.data = {"without": without, "with": with_history, "fan_out": fan, "resume_100": resumed, "new_client": fresh,
                  "bytes_300_events": stream_bytes, "bytes_head": head_bytes}  # fmt: skip
    table.notes.append(
        f"Redis memory for one user with the default 300 events of {len(EVENT['text'])}-character text: "
        f"{stream_bytes:,} bytes of stream + {head_bytes:,} bytes of head (MEMORY USAGE)."
    )
    await world.drain()
    return table


TARGETS = {
    "1": target_1,
    "2": target_2,
    "3": target_3,
    "4": target_4,
    "5": target_5,
    "6": target_6,
    "sharding": target_sharding,
    "receive": target_receive,
    "history": target_history,
}
