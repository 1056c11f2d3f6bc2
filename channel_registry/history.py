"""Per-user history: what lets a reconnecting client get the events it missed.

Every recoverable event sent to a user is first appended to that user's
history, where it gets the next number of a gap-free per-user sequence
(``seq``) within an ``epoch``. The epoch names one unbroken history: it changes
when the history is lost (Redis restarted or flushed, keys evicted or expired),
so a position from before can never be mistaken for one after.

Kept on the channel layer's own server, so it needs no new service: a Redis
stream per user (on ``RedisChannelLayer`` and its subclasses, on the shard that
owns the user's key), or a process-local one on ``InMemoryChannelLayer``. Other
layers have no history: events go out without a position.

A history keeps ``HISTORY_SIZE`` events for at most ``HISTORY_TTL`` seconds
after they were sent; a position it cannot honour (another epoch, an event
since dropped, more than ``RECOVERY_LIMIT`` behind) is answered with a reset
and the reason, never with a silent gap.
"""

from __future__ import annotations

import secrets
import time
import weakref
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .conf import registry_settings
from .exceptions import layer_unavailable
from .protocol import POSITION_KEY

try:  # channels_redis is optional
    from channels_redis.core import RedisChannelLayer
except ImportError:  # pragma: no cover
    RedisChannelLayer = None


#: Why a position could not be honoured (the ``reason`` of a ``reset`` frame).
RESET_EPOCH = "epoch"  # another history: lost since, or never this user's
RESET_EXPIRED = "expired"  # an event after it is no longer kept (HISTORY_SIZE, HISTORY_TTL)
RESET_TOO_MANY = "too_many"  # more than RECOVERY_LIMIT events behind
RESET_INVALID = "invalid"  # malformed, or ahead of the history
RESET_UNAVAILABLE = "unavailable"  # the history could not be read

#: Users per append script: bounds how long one script holds Redis during a large fan-out.
CHUNK_USERS = 500

#: How long a user's epoch and counter outlive their last event or connection, in seconds:
#: far longer than the events, so a quiet user's tab resumes without a reset.
HEAD_TTL = 24 * 3600


@dataclass(frozen=True)
class Position:
    """A point in one user's history: the last ``seq`` seen within ``epoch``."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """``"<epoch>:<seq>"`` as sent in ``?since=`` or ``Last-Event-ID``; ``ValueError`` if malformed."""
        epoch, _, seq = text.rpartition(":")
        if not epoch or len(text) > 64 or not seq.isdigit():
            raise ValueError(f"not a history position: {text[:64]!r}")
        return cls(epoch, int(seq))


@dataclass(frozen=True)
class Recovery:
    """The answer to "what came after this position": the events, or why not."""

    #: The newest position of the history when it was read.
    head: Position
    #: The events after the asked position, oldest first, each carrying its position.
    events: list[dict[str, Any]] = field(default_factory=list)
    #: ``None`` when the events are exactly what was missed, else one of the ``RESET_*`` reasons.
    reset: str | None = None


def stamped(event: dict[str, Any], positions: dict[Any, Position]) -> dict[str, Any]:
    """The event as sent: a copy carrying each addressed user's position.

    One message reaches all of a server process's channels it names, whichever
    user they belong to (``__asgi_channel__``), so it carries the position of
    every user it is for; each connection picks its own (``position_for``).
    Keys are strings: msgpack refuses other map keys by default.
    """
    return {**event, POSITION_KEY: {str(user): [p.epoch, p.seq] for user, p in positions.items()}}


def resolved(event: dict[str, Any], position: Position) -> dict[str, Any]:
    """The event as one connection passes it on: carrying its own ``[epoch, seq]``."""
    return {**event, POSITION_KEY: [position.epoch, position.seq]}


def position_for(event: dict[str, Any], user_id: Any) -> Position | None:
    """``user_id``'s position in a sent event; ``None`` for an event that is not recoverable."""
    positions = event.get(POSITION_KEY)
    value = positions.get(str(user_id)) if isinstance(positions, dict) else None
    return Position(value[0], value[1]) if value else None


def new_epoch() -> str:
    return secrets.token_hex(6)


def check_limits(head: Position, since: Position) -> str | None:
    """The reset reason that needs no event to decide, or ``None``."""
    options = registry_settings()
    if since.epoch != head.epoch:
        return RESET_EPOCH
    if since.seq > head.seq:
        return RESET_INVALID
    if head.seq - since.seq > options.HISTORY_SIZE:
        return RESET_EXPIRED  # the events after it are no longer kept
    if head.seq - since.seq > options.RECOVERY_LIMIT:
        return RESET_TOO_MANY
    return None


class History:
    """Where a layer's per-user histories live."""

    async def append(self, user_ids: Collection[Any], event: dict[str, Any]) -> dict[Any, Position]:
        """Add ``event`` to each user's history; each user's new position."""
        raise NotImplementedError

    async def read(self, user_id: Any, since: Position | None) -> Recovery:
        """The head, and with ``since`` the events after it (at most ``RECOVERY_LIMIT``)."""
        raise NotImplementedError


class MemoryHistory(History):
    """For ``InMemoryChannelLayer``: one process, like the layer itself."""

    def __init__(self) -> None:
        self.users: dict[Any, tuple[str, int, deque[tuple[int, float, dict[str, Any]]]]] = {}

    def _user(self, user_id: Any) -> tuple[str, int, deque[tuple[int, float, dict[str, Any]]]]:
        if user_id not in self.users:
            self.users[user_id] = (new_epoch(), 0, deque(maxlen=registry_settings().HISTORY_SIZE))
        return self.users[user_id]

    async def append(self, user_ids: Collection[Any], event: dict[str, Any]) -> dict[Any, Position]:
        positions = {}
        for user_id in user_ids:
            epoch, seq, events = self._user(user_id)
            seq += 1
            events.append((seq, time.time(), event))
            self.users[user_id] = (epoch, seq, events)
            positions[user_id] = Position(epoch, seq)
        return positions

    async def read(self, user_id: Any, since: Position | None) -> Recovery:
        epoch, seq, events = self._user(user_id)
        head = Position(epoch, seq)
        options = registry_settings()
        if since is None:
            return Recovery(head)
        reset = check_limits(head, since)
        if reset:
            return Recovery(head, reset=reset)
        oldest_kept = time.time() - options.HISTORY_TTL
        missed = [(n, sent, e) for n, sent, e in events if n > since.seq]
        if len(missed) != head.seq - since.seq or (missed and missed[0][1] < oldest_kept):
            return Recovery(head, reset=RESET_EXPIRED)
        return Recovery(head, [resolved(e, Position(epoch, n)) for n, _, e in missed])


#: Per user: the head hash (epoch, seq), then the stream of events, id ``<seq>-0``.
#: KEYS: head, stream per user. ARGV: event, now (ms), max length, ttl (s), head ttl (s), one new epoch per user.
#: A stream whose head is gone belongs to a lost epoch: it is dropped before the first event of the new one.
APPEND_SCRIPT = """
local event, now, maxlen, ttl, head_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out = {}
for i = 1, #KEYS / 2 do
    local head, stream = KEYS[2 * i - 1], KEYS[2 * i]
    local epoch = redis.call('HGET', head, 'epoch')
    if not epoch then
        epoch = ARGV[5 + i]
        redis.call('HSET', head, 'epoch', epoch)
        redis.call('DEL', stream)
    end
    local seq = redis.call('HINCRBY', head, 'seq', 1)
    redis.call('XADD', stream, 'MAXLEN', maxlen, seq .. '-0', 't', now, 'e', event)
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', head, head_ttl)
    out[2 * i - 1] = epoch
    out[2 * i] = seq
end
return out
"""

#: KEYS: head, stream. ARGV: new epoch, head ttl (s), then (when recovering) since epoch, since seq,
#: oldest kept (ms), recovery limit. Returns epoch, seq, then — when the position is of this epoch,
#: behind the head and within the limit — the payloads after it, oldest first, or a single false
#: in their place when one of them is no longer kept (trimmed, expired).
READ_SCRIPT = """
local head, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', head, 'epoch')
if not epoch then
    epoch = ARGV[1]
    redis.call('HSET', head, 'epoch', epoch, 'seq', 0)
    redis.call('DEL', stream)
end
redis.call('EXPIRE', head, ARGV[2])
local seq = tonumber(redis.call('HGET', head, 'seq'))
local out = {epoch, seq}
if not ARGV[3] or ARGV[3] ~= epoch then
    return out
end
local since = tonumber(ARGV[4])
if since >= seq or seq - since > tonumber(ARGV[6]) then
    return out
end
local entries = redis.call('XRANGE', stream, (since + 1) .. '-0', '+')
if #entries ~= seq - since or tonumber(entries[1][2][2]) < tonumber(ARGV[5]) then
    out[3] = false
    return out
end
for i, entry in ipairs(entries) do
    out[i + 2] = entry[2][4]
end
return out
"""


class RedisHistory(History):
    """For ``RedisChannelLayer``: a stream per user on the shard that owns the user's key."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def keys(self, user_id: Any) -> tuple[int, str, str]:
        name = f"history:{user_id}"
        return self.layer.consistent_hash(name), f"{self.layer.prefix}{name}:head", f"{self.layer.prefix}{name}"

    async def append(self, user_ids: Collection[Any], event: dict[str, Any]) -> dict[Any, Position]:
        options = registry_settings()
        payload = self.layer.serialize(event)
        by_shard: dict[int, list[Any]] = {}
        for user_id in user_ids:
            by_shard.setdefault(self.keys(user_id)[0], []).append(user_id)
        positions = {}
        args = [payload, int(time.time() * 1000), options.HISTORY_SIZE, int(options.HISTORY_TTL), HEAD_TTL]
        with layer_unavailable(self.layer):
            for shard, users in by_shard.items():
                script = self.layer.connection(shard).register_script(APPEND_SCRIPT)
                for start in range(0, len(users), CHUNK_USERS):
                    chunk = users[start : start + CHUNK_USERS]
                    keys = [key for user_id in chunk for key in self.keys(user_id)[1:]]
                    answer = await script(keys=keys, args=args + [new_epoch() for _ in chunk])
                    for i, user_id in enumerate(chunk):
                        positions[user_id] = Position(answer[2 * i].decode(), int(answer[2 * i + 1]))
        return positions

    async def read(self, user_id: Any, since: Position | None) -> Recovery:
        options = registry_settings()
        shard, head_key, stream_key = self.keys(user_id)
        args: list[Any] = [new_epoch(), HEAD_TTL]
        if since is not None:
            oldest_kept = int((time.time() - options.HISTORY_TTL) * 1000)
            args += [since.epoch, since.seq, oldest_kept, options.RECOVERY_LIMIT]
        with layer_unavailable(self.layer):
            script = self.layer.connection(shard).register_script(READ_SCRIPT)
            answer = await script(keys=[head_key, stream_key], args=args)
        head = Position(answer[0].decode(), int(answer[1]))
        if since is None:
            return Recovery(head)
        reset = check_limits(head, since)
        if reset:
            return Recovery(head, reset=reset)
        payloads = answer[2:]
        if payloads and payloads[0] is None:
            return Recovery(head, reset=RESET_EXPIRED)
        return Recovery(head, [
            resolved(self.layer.deserialize(payload), Position(head.epoch, since.seq + i))
            for i, payload in enumerate(payloads, start=1)
        ])


def history_layer_types() -> tuple[type, ...]:
    """The channel layer classes a history can be kept next to."""
    from channels.layers import InMemoryChannelLayer

    return (InMemoryChannelLayer,) if RedisChannelLayer is None else (InMemoryChannelLayer, RedisChannelLayer)


_histories: weakref.WeakKeyDictionary[Any, History] = weakref.WeakKeyDictionary()


def history_for(layer: Any) -> History | None:
    """The history kept next to ``layer``, or ``None`` (``HISTORY`` off, or a layer without one)."""
    if not registry_settings().HISTORY:
        return None
    history = _histories.get(layer)
    if history is None:
        from channels.layers import InMemoryChannelLayer

        if isinstance(layer, InMemoryChannelLayer):
            history = MemoryHistory()
        elif RedisChannelLayer is not None and isinstance(layer, RedisChannelLayer):
            history = RedisHistory(layer)
        else:
            return None
        _histories[layer] = history
    return history
