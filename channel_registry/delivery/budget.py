"""Per-user send budgets: token buckets shared by all of a user's connections, on every process.

A limit per connection is no limit: one account opening ten sockets gets ten
budgets. The buckets here are keyed by user. With channels_redis they live in
Redis, next to the layer's own keys (under its ``prefix``), and one small Lua
script checks and spends them atomically, so a user's sockets on three server
processes draw from one budget. With any other layer (the in-memory one serves
a single process by definition) they live in this process, one set per layer.

A bucket holds ``rate`` tokens and refills continuously over ``per`` seconds.
A spend names what it ``needs`` now and what it ``costs``. The two differ only
when one cost is larger than the whole bucket (a message to a user with more
connections than ``FANOUT_LIMIT`` allows copies): it may then take the bucket
into debt, which later spends wait out in full, so the average holds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import metrics
from ..conf import registry_settings
from ..exceptions import layer_unavailable
from .fanout import PerLayer, is_redis_layer, layer_slots

#: ``spend(keys, args, now)``: keys the buckets, args per bucket rate, period (ms), cost, need;
#: ``now`` from ``clock_ms()``, Redis's own clock, so every process sees the same time.
#: All or nothing: returns {1, 0} after spending, or {0, ms until every bucket has what it needs}.
#: Lua functions, so that ``pipeline.FOLD_SCRIPT`` runs the same steps as the script of its own.
SPEND_FUNCTION = """
local function clock_ms()
    local clock = redis.call('TIME')
    return tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local function spend(keys, args, now)
    local levels, wait = {}, 0
    for i, key in ipairs(keys) do
        local rate, period, need = tonumber(args[4 * i - 3]), tonumber(args[4 * i - 2]), tonumber(args[4 * i])
        local state = redis.call('HMGET', key, 'tokens', 'stamp')
        local tokens, stamp = tonumber(state[1]) or rate, tonumber(state[2]) or now
        tokens = math.min(rate, tokens + math.max(0, now - stamp) * rate / period)
        levels[i] = tokens
        if tokens < need then
            wait = math.max(wait, math.ceil((need - tokens) * period / rate))
        end
    end
    if wait > 0 then
        return {0, wait}
    end
    for i, key in ipairs(keys) do
        local rate, period, cost = tonumber(args[4 * i - 3]), tonumber(args[4 * i - 2]), tonumber(args[4 * i - 1])
        local tokens = levels[i] - cost
        redis.call('HSET', key, 'tokens', tostring(tokens), 'stamp', now)
        redis.call('PEXPIRE', key, math.ceil((rate - tokens) * period / rate) + 1000)
    end
    return {1, 0}
end
"""

#: KEYS: the buckets. ARGV: per bucket rate, period (ms), cost, need (see ``SPEND_FUNCTION``).
SPEND_SCRIPT = SPEND_FUNCTION + "return spend(KEYS, ARGV, clock_ms())\n"


@dataclass(frozen=True)
class Spend:
    """One bucket of one user: ``name`` with ``rate`` tokens per ``per`` seconds."""

    name: str
    rate: float
    per: float
    cost: float = 1
    need: float = 1


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    #: Seconds until the refused spend would succeed; 0 when allowed.
    retry_after: float = 0


def connection_costs(resuming: bool) -> list[Spend]:
    """What opening a connection spends: a handshake (``HANDSHAKE_LIMIT``), and a resume
    (``RESUME_LIMIT``) when it gives a position to replay from. Both transports pay it
    before registering, so a refused loop costs one small script per attempt."""
    options = registry_settings()
    costs = [Spend("handshakes", *options.HANDSHAKE_LIMIT)] if options.HANDSHAKE_LIMIT else []
    if resuming and options.RESUME_LIMIT:
        costs.append(Spend("resumes", *options.RESUME_LIMIT))
    return costs


#: Longest a connection over its handshake or resume budget is held before it is refused.
REFUSAL_HOLD_BACK = 1.0


async def held_back(verdict: Verdict) -> int:
    """Wait before refusing a connection over budget; the whole seconds the client should still wait.

    A client that honours the answer loses nothing; a loop that reconnects as soon as
    it is refused gets about one refusal a second per socket, instead of costing its
    process a handshake, a session lookup and a Redis round trip as fast as it can.
    """
    held = min(verdict.retry_after, REFUSAL_HOLD_BACK)
    await asyncio.sleep(held)
    return math.ceil(verdict.retry_after - held)


async def spend(layer: Any, user_id: Any, spends: Sequence[Spend]) -> Verdict:
    """Spend from ``user_id``'s buckets, all or none. Raises ``ChannelLayerUnavailable`` when Redis is down."""
    if not spends:
        return Verdict(True)
    if is_redis_layer(layer):
        verdict = await _spend_redis(layer, user_id, spends)
        mirror(layer, user_id, spends, verdict)
    else:
        verdict = _local_buckets(layer).spend(user_id, spends, time.monotonic())
    if not verdict.allowed:
        metrics.budget_refused([item.name for item in spends])
    return verdict


def likely_refused(layer: Any, user_id: Any, spends: Sequence[Spend]) -> bool:
    """Whether ``spend`` would refuse, as far as this process knows without a round trip.

    Exact on a layer whose buckets live in this process. On Redis, from a copy of
    the verdicts this process was given (``mirror``): other processes' spends only
    take tokens, so a bucket the copy finds short is short in Redis too (up to the
    two clocks' drift), and one it finds full may not be: then Redis decides.
    What lets a sender over budget be refused before the registry is asked.
    """
    return bool(spends) and not _local_buckets(layer).affords(user_id, spends, time.monotonic())


def mirror(layer: Any, user_id: Any, spends: Sequence[Spend], verdict: Verdict) -> None:
    """Copy a verdict Redis gave into this process's buckets for ``likely_refused``."""
    _local_buckets(layer).copy_verdict(user_id, spends, verdict, time.monotonic())


def bucket_shard(layer: Any, user_id: Any) -> int:
    """The Redis shard holding ``user_id``'s buckets."""
    return int(layer.consistent_hash(f"registry.budget.{user_id}"))


def bucket_keys(layer: Any, user_id: Any, spends: Sequence[Spend]) -> list[str]:
    return [f"{layer.prefix}registry.budget.{user_id}.{item.name}" for item in spends]


def bucket_args(spends: Sequence[Spend]) -> list[Any]:
    """``SPEND_FUNCTION``'s arguments for ``spends``."""
    return [value for item in spends for value in (item.rate, round(item.per * 1000), item.cost, item.need)]


async def _spend_redis(layer: Any, user_id: Any, spends: Sequence[Spend]) -> Verdict:
    refusals = _refusals(layer)
    refusal = (user_id, tuple((item.name, item.rate, item.per, item.need) for item in spends))
    asked = time.monotonic()
    wait = refusals.wait(refusal, asked)
    if wait:
        return Verdict(False, wait)
    keys, args = bucket_keys(layer, user_id, spends), bucket_args(spends)
    with layer_unavailable(layer):
        async with layer_slots():
            connection = layer.connection(bucket_shard(layer, user_id))
            allowed, wait_ms = await connection.register_script(SPEND_SCRIPT)(keys=keys, args=args)
    if not allowed:
        refusals.note(refusal, asked + wait_ms / 1000)
    return Verdict(bool(allowed), wait_ms / 1000)


class Refusals:
    """The spends Redis refused lately in this process, and until when: ``{(user, needs): deadline}``.

    A refused spend takes nothing, and nothing but time fills a bucket, so the same
    spend (same buckets, same needs) asked again before its ``retry_after`` is refused
    again on every process: answered here, without a Redis round trip. A flooding
    connection's frames that its inbound budget still pays for (``inbound.py``) are
    then refused by ``RATE_LIMIT`` at the price of a dict lookup. The deadline counts
    from when the spend was asked, before Redis answered, so it is never later than Redis's.
    """

    #: Most refusals kept; past it, expired ones go, and new ones are not kept while it is full.
    KEEP = 10_000

    def __init__(self) -> None:
        self.until: dict[tuple[Any, tuple[Any, ...]], float] = {}

    def wait(self, refusal: tuple[Any, tuple[Any, ...]], now: float) -> float:
        """Seconds until ``refusal`` may succeed, rounded up to the millisecond as Redis does; 0 if it may now."""
        left = self.until.get(refusal, now) - now
        if left <= 0:
            self.until.pop(refusal, None)
            return 0
        return math.ceil(left * 1000) / 1000

    def note(self, refusal: tuple[Any, tuple[Any, ...]], until: float) -> None:
        if len(self.until) >= self.KEEP:
            now = time.monotonic()
            self.until = {key: deadline for key, deadline in self.until.items() if deadline > now}
            if len(self.until) >= self.KEEP:
                return
        self.until[refusal] = until


_refusals = PerLayer(lambda layer: Refusals())


class LocalBuckets:
    """The buckets of one process (any layer but channels_redis; on channels_redis, the copy
    ``likely_refused`` reads): ``{(user, name): (tokens, stamp)}``."""

    #: Forget buckets that refilled completely once this many are held.
    PRUNE_AT = 10_000

    def __init__(self) -> None:
        self.levels: dict[tuple[Any, str], tuple[float, float]] = {}

    def spend(self, user_id: Any, spends: Sequence[Spend], now: float) -> Verdict:
        if len(self.levels) >= self.PRUNE_AT:
            self.prune(now, {item.name: item for item in spends})
        levels = [(item, self.level((user_id, item.name), item, now)) for item in spends]
        wait = max(((item.need - tokens) * item.per / item.rate for item, tokens in levels), default=0.0)
        if wait > 0:
            return Verdict(False, math.ceil(wait * 1000) / 1000)
        for item, tokens in levels:
            self.levels[(user_id, item.name)] = (tokens - item.cost, now)
        return Verdict(True)

    def affords(self, user_id: Any, spends: Sequence[Spend], now: float) -> bool:
        return all(self.level((user_id, item.name), item, now) >= item.need for item in spends)

    def copy_verdict(self, user_id: Any, spends: Sequence[Spend], verdict: Verdict, now: float) -> None:
        """Spent: take the cost. Refused: at most what refills to ``need`` in ``retry_after``."""
        if len(self.levels) >= self.PRUNE_AT:
            self.prune(now, {item.name: item for item in spends})
        for item in spends:
            key = (user_id, item.name)
            tokens = self.level(key, item, now)
            if verdict.allowed:
                self.levels[key] = (tokens - item.cost, now)
            else:
                self.levels[key] = (min(tokens, item.need - verdict.retry_after * item.rate / item.per), now)

    def level(self, key: tuple[Any, str], item: Spend, now: float) -> float:
        tokens, stamp = self.levels.get(key, (item.rate, now))
        return min(item.rate, tokens + (now - stamp) * item.rate / item.per)

    def prune(self, now: float, known: dict[str, Spend]) -> None:
        for key in list(self.levels):
            item = known.get(key[1])
            if item is None or self.level(key, item, now) >= item.rate:
                del self.levels[key]


_local_buckets = PerLayer(lambda layer: LocalBuckets())  # a new layer's buckets start full
