"""Per-user history: what lets a reconnecting client get the events it missed.

Every recoverable event sent to a user is first appended to that user's
history, where it gets the next number of a gap-free per-user sequence
(``seq``) within an ``epoch``. The epoch names one unbroken history: it changes
when the history is lost (Redis restarted or flushed, keys evicted or expired),
so a position from before can never be mistaken for one after.

Why a history that lost writes always gets a new epoch, on one Redis or across
a Sentinel failover. Redis can come back holding an *older* copy of a head
than the one that handed out positions: a replica promoted after it missed the
master's last writes, or a restart that reloaded a snapshot taken before them.
That head would hand out the same numbers again, and a connection that already
passed them would drop the new events as duplicates (``cursor.py``): a silent
loss. So every head records the *term* that wrote it: the server's ``run_id``
(new with each process) and its ``master_replid`` (new each time a server
becomes master, including a replica's promotion). Every append and read is one
script that first compares the head's term with the server's own and, when they
differ, starts a new epoch. The proof: while a server is master within one term,
its data set changes only through the commands it executes itself (a master
takes no replication stream), so a head carrying its term is the last one it
wrote, and each later number of that epoch is handed out once, by that server.
A head carrying another term may be behind what was handed out: it is never
continued. Every epoch therefore lives within one term of one server, where its
numbers only grow. Waiting for a replica on each append (``WAIT``) could not
make the same promise: a read may still hand out a position the replica never
got, and a timed-out ``WAIT`` leaves the append on the master anyway.

The cost: a failover or a restart of Redis resets every history once, also when
the new master had every write; each user's clients get one ``reset`` (reason
``epoch``) instead of a replay. And every append and read makes two ``INFO``
calls, about 10 µs of Redis time (measured in docs/operations.md, "Redis Sentinel").

Kept on the channel layer's own server, so it needs no new service: a Redis
stream per user (on ``RedisChannelLayer`` and its subclasses, on the shard that
owns the user's key), or a process-local one on ``InMemoryChannelLayer``. Other
layers have no history: events go out without a position.

A history keeps at most ``HISTORY_SIZE`` events and ``HISTORY_MAX_BYTES`` bytes,
each for at most ``HISTORY_TTL`` seconds after it was sent; the oldest go first.
An event is stored as JSON text, about the size of the frame that carried it
(msgpack spends 9 bytes on every float that JSON writes as ``0.0``: a frame of
floats grew 2.25x). An event larger than ``HISTORY_EVENT_MAX_BYTES`` keeps its
number but not its body, so a resume across it is a reset, not a replay of
megabytes. A position it cannot honour (another epoch, an event since dropped,
more than ``RECOVERY_LIMIT`` events or ``RECOVERY_MAX_BYTES`` bytes behind) is
answered with a reset and the reason, never with a silent gap. Every stored event
carries the byte count of the history before it, so the bytes a resume would
replay are known before any is read: one Redis reply never holds more than
``RECOVERY_MAX_BYTES``.

Whose events a history takes. An offline recipient's history does take direct
messages from anyone: being offline, between two sockets or with the laptop
asleep, is what the history is for, and keeping it only for users online now
would lose exactly the messages it exists to replay. What one sender can make
others' histories hold is bounded instead, twice:

- in one recipient's history, a sender's direct messages hold at most
  ``HISTORY_SENDER_SHARE`` of its bytes and of its events (every event weighs at
  least ``HISTORY_MAX_BYTES / HISTORY_SIZE``, so a flood of tiny messages counts
  against the event window too); past that share the message is refused with
  ``rate_limited`` until the sender's older ones leave the window, and the
  recipient's events from everyone else stay;
- over all recipients, ``HISTORY_SENDER_LIMIT`` bytes of direct messages per
  period (see ``messaging.py``), so spraying many recipients keeps at most about
  three times its burst live in Redis (an event lives up to two ``HISTORY_TTL``
  after it was sent when its stream keeps being written).
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..conf import registry_settings
from ..delivery.fanout import PerLayer
from ..exceptions import layer_unavailable
from ..protocol import POSITION_KEY

try:  # channels_redis is optional
    from channels_redis.core import RedisChannelLayer
except ImportError:  # pragma: no cover
    RedisChannelLayer = None


#: Why a position could not be honoured (the ``reason`` of a ``reset`` frame).
RESET_EPOCH = "epoch"  # another history: lost since, or never this user's
RESET_EXPIRED = "expired"  # an event after it is no longer kept (HISTORY_SIZE, HISTORY_TTL)
RESET_TOO_MANY = "too_many"  # more than RECOVERY_LIMIT events or RECOVERY_MAX_BYTES bytes behind
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
class Head:
    """A user's history as one script saw it: its newest position, and how many connections joined it.

    ``joins`` counts the connections that started reading this history (``Cursor.start``):
    a sender that saw the same epoch and ``joins`` before its route lookup and at its
    append knows that no connection registered in between (see ``cursor.py``).
    """

    epoch: str
    seq: int
    joins: int

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.seq)

    def same_connections(self, earlier: Head | None) -> bool:
        """No connection joined this history between ``earlier`` and this head."""
        return earlier is not None and (earlier.epoch, earlier.joins) == (self.epoch, self.joins)


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


#: ``HISTORY_SENDER_SHARE=None``: a share no sender can reach (every event weighs at most
#: twice the window: its size, or its part of the byte window for each kept event).
NO_SHARE = 3


@dataclass(frozen=True)
class Window:
    """What one user's history may hold (the ``HISTORY_*`` settings), as an append enforces it."""

    events: int
    bytes: int
    ttl: float
    event_bytes: int
    #: Most one sender's direct messages may weigh in it.
    share: int
    #: The least an event weighs against a sender's share: its part of the byte window,
    #: so a flood of tiny messages counts against the event window too.
    min_weight: int

    @classmethod
    def current(cls) -> Window:
        options = registry_settings()
        return cls(
            events=options.HISTORY_SIZE,
            bytes=options.HISTORY_MAX_BYTES,
            ttl=options.HISTORY_TTL,
            event_bytes=options.HISTORY_EVENT_MAX_BYTES,
            share=int((options.HISTORY_SENDER_SHARE or NO_SHARE) * options.HISTORY_MAX_BYTES),
            min_weight=options.HISTORY_MAX_BYTES // options.HISTORY_SIZE,
        )

    def weight(self, size: int) -> int:
        return max(size, self.min_weight)


def as_json(event: dict[str, Any], default: Any = None) -> bytes:
    """Compact JSON: what the client is sent, so about the size of the frame that carried the event."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=default).encode(
        "utf-8", "surrogatepass"
    )


class History:
    """Where a layer's per-user histories live."""

    async def append(
        self, user_ids: Collection[Any], event: dict[str, Any], sender: Any = None
    ) -> dict[Any, Position]:
        """Add ``event`` to each user's history; each user's new position.

        With ``sender`` (a direct message's), a user whose history already holds
        the sender's share (``HISTORY_SENDER_SHARE``) does not take it and is left
        out of the answer.
        """
        heads = await self.append_heads(user_ids, event, sender)
        return {user_id: head.position for user_id, head in heads.items()}

    async def append_heads(
        self, user_ids: Collection[Any], event: dict[str, Any], sender: Any = None
    ) -> dict[Any, Head]:
        """``append``, answering each user's head right after the event went in."""
        raise NotImplementedError

    async def read(self, user_id: Any, since: Position | None, joining: bool = False) -> Recovery:
        """The head, and with ``since`` the events after it (at most ``RECOVERY_LIMIT`` and ``RECOVERY_MAX_BYTES``).

        ``joining``: a connection starts reading this history (counted in ``Head.joins``).
        """
        raise NotImplementedError

    def last_seen(self, user_id: Any) -> Head | None:
        """The newest head of ``user_id`` this process knows of, without a round trip; ``None`` if none."""
        raise NotImplementedError


@dataclass
class Kept:
    """One event in a ``MemoryHistory``; ``event`` is ``None`` when it was too large to keep."""

    seq: int
    sent: float
    size: int
    sender: Any
    event: dict[str, Any] | None


@dataclass
class UserLog:
    """One user's ``MemoryHistory``: the head, the events kept and the weight each sender holds."""

    epoch: str = field(default_factory=new_epoch)
    seq: int = 0
    events: deque[Kept] = field(default_factory=deque)
    bytes: int = 0
    held: dict[Any, int] = field(default_factory=dict)
    joins: int = 0
    #: ``time.time()`` of the newest event, and of the last append or read.
    appended: float = 0.0
    used: float = 0.0

    def trim(self, window: Window, now: float) -> None:
        """Drop the oldest events until the window holds: events, bytes, age."""
        while self.events and (
            len(self.events) > window.events or self.bytes > window.bytes or self.events[0].sent < now - window.ttl
        ):
            oldest = self.events.popleft()
            self.bytes -= oldest.size
            if oldest.sender is not None:
                self.held[oldest.sender] -= window.weight(oldest.size)
                if self.held[oldest.sender] <= 0:
                    del self.held[oldest.sender]


class MemoryHistory(History):
    """For ``InMemoryChannelLayer``: one process, like the layer itself.

    Forgets as Redis expires a :class:`RedisHistory`'s keys, so a process that
    served many users does not keep them all: a user's events ``HISTORY_TTL``
    after the newest one, the user (epoch and seq) ``HEAD_TTL`` after their
    history was last used. The head outlives the events so that a quiet open
    tab is not reset. One pass over all users, at most every ``PRUNE_EVERY`` seconds.
    """

    PRUNE_EVERY = 60.0

    def __init__(self) -> None:
        self.users: dict[Any, UserLog] = {}
        self.pruned_at = time.time()

    def _user(self, user_id: Any, now: float) -> UserLog:
        self.forget_expired(now)
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = UserLog()
        user.used = now
        return user

    def forget_expired(self, now: float) -> None:
        ttl = registry_settings().HISTORY_TTL
        if now - self.pruned_at < min(ttl, self.PRUNE_EVERY):
            return
        self.pruned_at = now
        window = Window.current()
        for user_id, user in list(self.users.items()):
            if now - user.used > HEAD_TTL:
                del self.users[user_id]
            elif now - user.appended > ttl:
                user.trim(window, now)  # every event is older than the window: all go

    async def append_heads(
        self, user_ids: Collection[Any], event: dict[str, Any], sender: Any = None
    ) -> dict[Any, Head]:
        window, now = Window.current(), time.time()
        size = len(as_json(event, default=repr))
        kept = event if size <= window.event_bytes else None
        size = size if kept else 0
        heads = {}
        for user_id in user_ids:
            log = self._user(user_id, now)
            log.trim(window, now)
            if sender is not None and log.held.get(sender, 0) + window.weight(size) > window.share:
                continue
            log.seq += 1
            log.events.append(Kept(log.seq, now, size, sender, kept))
            log.bytes += size
            if sender is not None:
                log.held[sender] = log.held.get(sender, 0) + window.weight(size)
            log.trim(window, now)
            log.appended = now
            heads[user_id] = Head(log.epoch, log.seq, log.joins)
        return heads

    def last_seen(self, user_id: Any) -> Head | None:
        log = self.users.get(user_id)
        return None if log is None else Head(log.epoch, log.seq, log.joins)

    async def read(self, user_id: Any, since: Position | None, joining: bool = False) -> Recovery:
        now = time.time()
        log = self._user(user_id, now)
        log.joins += joining
        head = Position(log.epoch, log.seq)
        options = registry_settings()
        if since is None:
            return Recovery(head)
        reset = check_limits(head, since)
        if reset:
            return Recovery(head, reset=reset)
        missed = [kept for kept in log.events if kept.seq > since.seq]
        if len(missed) != head.seq - since.seq or (missed and missed[0].sent < now - options.HISTORY_TTL):
            return Recovery(head, reset=RESET_EXPIRED)
        if sum(kept.size for kept in missed) > options.RECOVERY_MAX_BYTES:
            return Recovery(head, reset=RESET_TOO_MANY)
        if any(kept.event is None for kept in missed):
            return Recovery(head, reset=RESET_EXPIRED)
        return Recovery(head, [
            resolved(kept.event, Position(log.epoch, kept.seq)) for kept in missed if kept.event is not None
        ])


#: What both scripts start with: ``current_epoch(head, stream, new epoch)``, the epoch of a head
#: this server wrote in its current term (see the module's docstring); any other head, or none,
#: is replaced by a new epoch at seq 0 and its stream dropped.
HEAD_SCRIPT = """
local function server_term()
    local server, replication = redis.call('INFO', 'server'), redis.call('INFO', 'replication')
    return string.match(server, 'run_id:(%x+)') .. ':' .. string.match(replication, 'master_replid:(%x+)')
end
local term = server_term()
local function current_epoch(head, stream, new_epoch)
    local kept = redis.call('HMGET', head, 'epoch', 'term')
    if kept[1] and kept[2] == term then
        return kept[1]
    end
    if kept[1] then  -- another term's head: its seq, bytes and shares go with it
        redis.call('DEL', head)
    end
    redis.call('HSET', head, 'epoch', new_epoch, 'term', term, 'seq', 0)
    redis.call('DEL', stream)
    return new_epoch
end
"""

#: Per user: the head hash (epoch, term, seq, bytes: every byte appended in this epoch,
#: joins: connections that started reading it (see ``cursor.py``), and ``held:<sender>``: the
#: weight of a sender's direct messages kept), then the stream of events, id ``<seq>-0``,
#: fields t (sent, ms), b (the head's bytes before it), s (sender or ""), e (the event, or ""
#: when it was too large to keep).
#: ``appender(args)``, args: event, now (ms), most events, ttl (s), head ttl (s), oldest kept (ms),
#: most bytes, sender, sender share, least weight. Returns ``append(head, stream, new epoch)``,
#: which answers epoch, seq, joins; epoch and seq false when the history holds the sender's share.
#: A stream whose head is gone or of another term belongs to a lost epoch: it is dropped with it.
APPEND_FUNCTION = """
local function appender(args)
    local event, now, max_events, ttl, head_ttl = args[1], args[2], tonumber(args[3]), args[4], args[5]
    local oldest_kept, max_bytes, sender = tonumber(args[6]), tonumber(args[7]), args[8]
    local share, min_weight = tonumber(args[9]), tonumber(args[10])
    local function weight(body)
        return math.max(#body, min_weight)
    end
    local function trim(head, stream, total)
        local count = redis.call('XLEN', stream)
        while count > 0 do
            local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
            local fields = oldest[2]
            local fits = count <= max_events and total - tonumber(fields[4]) <= max_bytes
            if fits and tonumber(fields[2]) >= oldest_kept then
                return
            end
            redis.call('XTRIM', stream, 'MINID', (tonumber(string.match(oldest[1], '^%d+')) + 1) .. '-0')
            if fields[6] ~= '' and redis.call('HINCRBY', head, 'held:' .. fields[6], -weight(fields[8])) <= 0 then
                redis.call('HDEL', head, 'held:' .. fields[6])
            end
            count = count - 1
        end
    end
    return function(head, stream, new_epoch)
        local epoch = current_epoch(head, stream, new_epoch)
        if redis.call('EXISTS', stream) == 0 then
            -- Its events expired with the stream: so did every sender's share of them.
            for _, name in ipairs(redis.call('HKEYS', head)) do
                if string.sub(name, 1, 5) == 'held:' then
                    redis.call('HDEL', head, name)
                end
            end
        end
        local state = redis.call('HMGET', head, 'bytes', 'joins')
        local total, joins = tonumber(state[1]) or 0, tonumber(state[2]) or 0
        trim(head, stream, total)
        if sender ~= '' and tonumber(redis.call('HGET', head, 'held:' .. sender) or 0) + weight(event) > share then
            return false, false, joins
        end
        local seq = redis.call('HINCRBY', head, 'seq', 1)
        redis.call('XADD', stream, seq .. '-0', 't', now, 'b', total, 's', sender, 'e', event)
        redis.call('HSET', head, 'bytes', total + #event)
        if sender ~= '' then
            redis.call('HINCRBY', head, 'held:' .. sender, weight(event))
        end
        trim(head, stream, total + #event)
        redis.call('EXPIRE', stream, ttl)
        redis.call('EXPIRE', head, head_ttl)
        return epoch, seq, joins
    end
end
"""

#: KEYS: head, stream per user. ARGV: ``appender``'s args, then one new epoch per user.
#: Returns epoch, seq, joins per user (see ``APPEND_FUNCTION``).
APPEND_SCRIPT = HEAD_SCRIPT + APPEND_FUNCTION + """
local append = appender(ARGV)
local out = {}
for i = 1, #KEYS / 2 do
    out[3 * i - 2], out[3 * i - 1], out[3 * i] = append(KEYS[2 * i - 1], KEYS[2 * i], ARGV[10 + i])
end
return out
"""

#: KEYS: head, stream. ARGV: new epoch, head ttl (s), joining ("1" when a connection starts: counted
#: in ``joins``), then (when recovering) since epoch, since seq, oldest kept (ms), most events, most
#: bytes. Returns epoch, seq, joins, then — when the position is of this epoch, behind the head and
#: within the event limit — "expired" (an event after it is no longer kept), "too_many" (the events
#: after it hold more than the most bytes) or "ok" and the payloads after it, oldest first. The bytes
#: are counted before any event is read (the first one's ``b``).
READ_SCRIPT = HEAD_SCRIPT + """
local head, stream = KEYS[1], KEYS[2]
local epoch = current_epoch(head, stream, ARGV[1])
redis.call('EXPIRE', head, ARGV[2])
if ARGV[3] == '1' then
    redis.call('HINCRBY', head, 'joins', 1)
end
local seq = tonumber(redis.call('HGET', head, 'seq'))
local out = {epoch, seq, tonumber(redis.call('HGET', head, 'joins') or 0)}
if not ARGV[4] or ARGV[4] ~= epoch then
    return out
end
local since = tonumber(ARGV[5])
if since >= seq or seq - since > tonumber(ARGV[7]) then
    return out
end
local first = redis.call('XRANGE', stream, (since + 1) .. '-0', '+', 'COUNT', 1)[1]
if not first or first[1] ~= (since + 1) .. '-0' or tonumber(first[2][2]) < tonumber(ARGV[6]) then
    out[4] = 'expired'
    return out
end
if tonumber(redis.call('HGET', head, 'bytes')) - tonumber(first[2][4]) > tonumber(ARGV[8]) then
    out[4] = 'too_many'
    return out
end
out[4] = 'ok'
for i, entry in ipairs(redis.call('XRANGE', stream, (since + 1) .. '-0', '+', 'COUNT', seq - since)) do
    out[i + 4] = entry[2][8]
end
return out
"""

#: The key of a stored event that was kept as JSON text (any other was kept in the layer's own format).
JSON_KEY = "registry.json"


class RedisHistory(History):
    """For ``RedisChannelLayer``: a stream per user on the shard that owns the user's key."""

    #: Most users whose last seen head this process remembers.
    REMEMBERED = 10_000

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.heads: dict[Any, Head] = {}

    def last_seen(self, user_id: Any) -> Head | None:
        return self.heads.get(user_id)

    def saw(self, user_id: Any, head: Head) -> None:
        """Remember ``head`` as the newest of ``user_id`` this process knows of.

        Past ``REMEMBERED`` users all are forgotten at once (one atomic step: sync callers
        run on other threads), and each one's next send takes a second call once.
        """
        if len(self.heads) >= self.REMEMBERED:
            self.heads.clear()
        self.heads[user_id] = head

    def append_args(self, event: dict[str, Any], sender: Any) -> list[Any]:
        """``APPEND_FUNCTION``'s ``appender`` arguments."""
        window, now = Window.current(), time.time()
        return [
            self.encode(event, window), int(now * 1000), window.events, int(window.ttl), HEAD_TTL,
            int((now - window.ttl) * 1000), window.bytes, "" if sender is None else str(sender),
            window.share, window.min_weight,
        ]  # fmt: skip

    def keys(self, user_id: Any) -> tuple[int, str, str]:
        # "v2": the entries gained fields (b, s); a history of the old layout is simply another epoch.
        name = f"history.v2:{user_id}"
        return self.layer.consistent_hash(name), f"{self.layer.prefix}{name}:head", f"{self.layer.prefix}{name}"

    def encode(self, event: dict[str, Any], window: Window) -> bytes:
        """JSON text in the layer's serializer (its encryption, if set, applies); ``b""`` when too large.

        An event JSON cannot carry (bytes, say) is kept in the layer's own format.
        """
        try:
            payload = self.layer.serialize({JSON_KEY: as_json(event).decode("utf-8", "surrogatepass")})
        except (TypeError, ValueError):
            payload = self.layer.serialize(event)
        return payload if len(payload) <= window.event_bytes else b""

    def decode(self, payload: bytes) -> dict[str, Any]:
        value = self.layer.deserialize(payload)
        return json.loads(value[JSON_KEY]) if list(value) == [JSON_KEY] else value

    async def append_heads(
        self, user_ids: Collection[Any], event: dict[str, Any], sender: Any = None
    ) -> dict[Any, Head]:
        by_shard: dict[int, list[Any]] = {}
        for user_id in user_ids:
            by_shard.setdefault(self.keys(user_id)[0], []).append(user_id)
        heads = {}
        args = self.append_args(event, sender)
        with layer_unavailable(self.layer):
            for shard, users in by_shard.items():
                script = self.layer.connection(shard).register_script(APPEND_SCRIPT)
                for start in range(0, len(users), CHUNK_USERS):
                    chunk = users[start : start + CHUNK_USERS]
                    keys = [key for user_id in chunk for key in self.keys(user_id)[1:]]
                    answer = await script(keys=keys, args=args + [new_epoch() for _ in chunk])
                    for i, user_id in enumerate(chunk):
                        epoch, seq, joins = answer[3 * i : 3 * i + 3]
                        if epoch is not None:
                            heads[user_id] = Head(epoch.decode(), int(seq), int(joins))
                            self.saw(user_id, heads[user_id])
        return heads

    async def read(self, user_id: Any, since: Position | None, joining: bool = False) -> Recovery:
        options = registry_settings()
        shard, head_key, stream_key = self.keys(user_id)
        args: list[Any] = [new_epoch(), HEAD_TTL, int(joining)]
        if since is not None:
            oldest_kept = int((time.time() - options.HISTORY_TTL) * 1000)
            args += [since.epoch, since.seq, oldest_kept, options.RECOVERY_LIMIT, options.RECOVERY_MAX_BYTES]
        with layer_unavailable(self.layer):
            script = self.layer.connection(shard).register_script(READ_SCRIPT)
            answer = await script(keys=[head_key, stream_key], args=args)
        seen = Head(answer[0].decode(), int(answer[1]), int(answer[2]))
        self.saw(user_id, seen)
        head = seen.position
        if since is None:
            return Recovery(head)
        reset = check_limits(head, since)
        if reset:
            return Recovery(head, reset=reset)
        status, payloads = (answer[3].decode(), answer[4:]) if len(answer) > 3 else ("ok", [])
        if status != "ok":
            return Recovery(head, reset=status)
        if b"" in payloads:  # an event too large to keep
            return Recovery(head, reset=RESET_EXPIRED)
        return Recovery(head, [
            resolved(self.decode(payload), Position(head.epoch, since.seq + i))
            for i, payload in enumerate(payloads, start=1)
        ])


def history_layer_types() -> tuple[type, ...]:
    """The channel layer classes a history can be kept next to."""
    from channels.layers import InMemoryChannelLayer

    return (InMemoryChannelLayer,) if RedisChannelLayer is None else (InMemoryChannelLayer, RedisChannelLayer)


def _history_of(layer: Any) -> History | None:
    from channels.layers import InMemoryChannelLayer

    if isinstance(layer, InMemoryChannelLayer):
        return MemoryHistory()
    if RedisChannelLayer is not None and isinstance(layer, RedisChannelLayer):
        return RedisHistory(layer)
    return None


_histories = PerLayer(_history_of)


def history_for(layer: Any) -> History | None:
    """The history kept next to ``layer``, or ``None`` (``HISTORY`` off, or a layer without one)."""
    return _histories(layer) if registry_settings().HISTORY else None
