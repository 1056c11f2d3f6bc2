"""A direct message's way out, in named phases, each backend chosen once per channel layer.

``DirectMessages.send`` resolves the recipient and its live channels first (one
registry statement, ``DeliveryStrategy.resolve``), having noted the recipient's
history head as this process last saw it (``History.last_seen``). Then
:meth:`Stepwise.commit` runs the rest, one phase each:

1. pay: the sender's message budget, then one copy-budget token per channel found;
2. record: the append to the recipient's history, which answers the head it made;
3. send: the event, stamped with its position, to the channels found — unless a
   connection joined the history since the lookup (the head's ``joins`` moved):
   then to the channels of a second lookup, made after the append. ``cursor.py``
   has the proof that this order loses nothing.

:class:`Folded` runs all three as ONE Lua script on a Redis layer whose keys for
the message (the sender's buckets, the recipient's history, the receiving
processes' queues) are on one shard. The message is serialized before the
script runs, so it carries the position the script will hand out if the head is
still the one this process last saw; a script that finds another head (another
process appended, or a connection joined) appends without sending, and the
message goes out stepwise with its real position: one more call, never a wrong
number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import metrics
from ..exceptions import HistoryShareExceeded, layer_unavailable
from ..history.log import APPEND_FUNCTION, HEAD_SCRIPT, Head, Position, RedisHistory, history_for, new_epoch, stamped
from . import budget
from .fanout import SEND_FUNCTION, PerLayer, is_redis_layer, layer_slots, process_entries, send_tail
from .strategy import Delivery, DeliveryStrategy


@dataclass(frozen=True)
class Outgoing:
    """One direct message, resolved: who sends it to whom, where it goes, what it costs."""

    sender: Any
    recipient: Any
    event: dict[str, Any]
    #: The recipient's live channels found by the lookup; ``None`` for a strategy that cannot list them (groups).
    routes: list[str] | None
    #: The recipient's history head as this process knew it before the lookup.
    seen: Head | None
    #: The message budget (``RATE_LIMIT``, ``HISTORY_SENDER_LIMIT``): all or nothing.
    sending: list[budget.Spend]
    #: One ``FANOUT_LIMIT`` token per channel found; ``None`` when free.
    copies: budget.Spend | None
    #: Over the copies budget, keep the message in the history without sending it
    #: (acks are private: a refusal would tell the sender the recipient is online).
    keep_unpaid: bool


class Refused(Exception):
    """A budget refused the message; ``retry_after`` seconds until it would not."""

    def __init__(self, names: str, retry_after: float) -> None:
        super().__init__(f"too many {names}")
        self.names = names
        self.retry_after = retry_after


class Stepwise:
    """The phases as one call each: any channel layer, and every case ``Folded`` leaves out."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    async def commit(self, out: Outgoing, strategy: DeliveryStrategy) -> Delivery:
        """Pay, record and send ``out``; raises ``Refused`` or ``HistoryShareExceeded``, sending nothing."""
        await self.pay(out.sender, out.sending)
        paid = out.copies is None or await self.pay_copies(out, out.copies)
        head = await self.record(out)
        if not paid:
            return Delivery(channels=0, sent=0)
        return await self.send(out, head, strategy)

    async def pay(self, sender: Any, items: list[budget.Spend]) -> None:
        verdict = await budget.spend(self.layer, sender, items)
        if not verdict.allowed:
            raise Refused(" or ".join(item.name for item in items), verdict.retry_after)

    async def pay_copies(self, out: Outgoing, copies: budget.Spend) -> bool:
        """Whether the copies were paid; ``False`` (keep, don't send) or ``Refused`` when not."""
        if not out.keep_unpaid:
            await self.pay(out.sender, [copies])
            return True
        return (await budget.spend(self.layer, out.sender, [copies])).allowed

    async def record(self, out: Outgoing) -> Head | None:
        """Append to the recipient's history; its head after the append, ``None`` without a history."""
        history = history_for(self.layer)
        if history is None:
            return None
        head = (await history.append_heads([out.recipient], out.event, out.sender)).get(out.recipient)
        if head is None:
            raise HistoryShareExceeded(f"a history holds the share of {out.sender!r} already")
        metrics.history_appended(1)
        return head

    async def send(self, out: Outgoing, head: Head | None, strategy: DeliveryStrategy) -> Delivery:
        """To the channels found, when no connection joined since the lookup; else to a fresh lookup's."""
        positions = None if head is None else {out.recipient: head.position}
        if out.routes is None or (head is not None and not head.same_connections(out.seen)):
            return metrics.copies(await strategy.route([out.recipient], out.event, positions))
        # Without a history there is no position and no order to keep: at most once, like any such event.
        event = out.event if positions is None else stamped(out.event, positions)
        return metrics.copies(await strategy.send_to(out.routes, event))


#: KEYS: message buckets (ns), copy buckets (nc), history head and stream, queue keys (m).
#: ARGV: ns, nc, m, keep ("1": over the copies budget, append without sending), the seen head's
#: epoch, seq and joins, predicted ("1": copies carry the position after the seen head, in the
#: queues or to be put into this process's buffers), then ``spend``'s args for each bucket,
#: ``appender``'s args and a new epoch, then ``send``'s args. Each phase commits before the next,
#: as the stepwise calls do. Returns {"messages"|"copies", ms to wait}, {"share"}, or
#: {"kept"|"unsent"|"sent", epoch, seq, joins, then for "sent" the 1-based positions of the full
#: queues}. "unsent": appended, but the head was not the one seen (the copies carry a position
#: the script did not hand out); nothing was sent.
FOLD_SCRIPT = HEAD_SCRIPT + budget.SPEND_FUNCTION + APPEND_FUNCTION + SEND_FUNCTION + """
local function slice(list, from, count)
    local out = {}
    for i = 1, count do
        out[i] = list[from + i - 1]
    end
    return out
end
local ns, nc, m, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local arg, now = 9, (ns + nc > 0) and clock_ms()
if ns > 0 then
    local paid = spend(slice(KEYS, 1, ns), slice(ARGV, arg, 4 * ns), now)
    if paid[1] == 0 then
        return {'messages', paid[2]}
    end
    arg = arg + 4 * ns
end
local sending = true
if nc > 0 then
    local paid = spend(slice(KEYS, ns + 1, nc), slice(ARGV, arg, 4 * nc), now)
    if paid[1] == 0 then
        if not keep then
            return {'copies', paid[2]}
        end
        sending = false
    end
    arg = arg + 4 * nc
end
local key = ns + nc
local epoch, seq, joins = appender(slice(ARGV, arg, 10))(KEYS[key + 1], KEYS[key + 2], ARGV[arg + 10])
if not epoch then
    return {'share'}
end
if not sending then
    return {'kept', epoch, seq, joins}
end
local same = epoch == ARGV[5] and joins == tonumber(ARGV[7])
if not same or (ARGV[8] == '1' and seq ~= tonumber(ARGV[6]) + 1) then
    return {'unsent', epoch, seq, joins}
end
return {'sent', epoch, seq, joins, unpack(send(slice(KEYS, key + 3, m), slice(ARGV, arg + 11, 2 * m + 3)))}
"""


class Folded(Stepwise):
    """Redis: pay, record and send in one script when the message's keys share a shard.

    On a layer that can put a copy into this process's receive buffers
    (``BatchedRedisChannelLayer.put_local``), the copies for this process's own
    channels skip Redis: the script pays for them and appends the message, and
    they go into the buffers when it answers "sent" (``cursor.py``: why the
    order still holds).
    """

    def __init__(self, layer: Any) -> None:
        super().__init__(layer)
        #: Chosen once: whether copies for this process's channels can skip Redis.
        self.local = callable(getattr(layer, "put_local", None))

    async def commit(self, out: Outgoing, strategy: DeliveryStrategy) -> Delivery:
        history = history_for(self.layer)
        if not isinstance(history, RedisHistory) or out.routes is None:
            return await super().commit(out, strategy)
        shard, head_key, stream_key = history.keys(out.recipient)
        seen = out.seen or Head("", -1, -1)  # nothing seen: the script appends, the send goes stepwise
        predicted = stamped(out.event, {out.recipient: Position(seen.epoch, seen.seq + 1)})
        local = self.local_channels(out.routes) if out.seen else []
        remote = [channel for channel in out.routes if channel not in local]
        queues = process_entries(self.layer, [(predicted, remote)] if out.seen else [])
        if {budget.bucket_shard(self.layer, out.sender), *(entry_shard for entry_shard, _ in queues)} != {shard}:
            return await super().commit(out, strategy)
        copies = [out.copies] if out.copies else []
        entries = [entry for _, entry in queues]
        keys = [
            *budget.bucket_keys(self.layer, out.sender, out.sending),
            *budget.bucket_keys(self.layer, out.sender, copies), head_key, stream_key, *(entry[0] for entry in entries),
        ]  # fmt: skip
        args = [
            len(out.sending), len(copies), len(entries), int(out.keep_unpaid), seen.epoch, seen.seq, seen.joins,
            int(bool(entries or local)),
            *budget.bucket_args(out.sending), *budget.bucket_args(copies),
            *history.append_args(out.event, out.sender), new_epoch(),
            *(entry[1] for entry in entries), *(entry[2] for entry in entries), *send_tail(self.layer),
        ]  # fmt: skip
        with layer_unavailable(self.layer):
            async with layer_slots():
                answer = await self.layer.connection(shard).register_script(FOLD_SCRIPT)(keys=keys, args=args)
        status = answer[0].decode()
        verdict = budget.Verdict(False, answer[1] / 1000) if status == "messages" else budget.Verdict(True)
        budget.mirror(self.layer, out.sender, out.sending, verdict)
        if status in ("messages", "copies"):
            refused = out.sending if status == "messages" else copies
            metrics.budget_refused([item.name for item in refused])
            raise Refused(" or ".join(item.name for item in refused), answer[1] / 1000)
        if status == "share":
            raise HistoryShareExceeded(f"a history holds the share of {out.sender!r} already")
        head = Head(answer[1].decode(), int(answer[2]), int(answer[3]))
        history.saw(out.recipient, head)
        metrics.history_appended(1)
        if status == "kept":
            metrics.budget_refused(["copies"])
            return Delivery(channels=0, sent=0)
        if status == "unsent":
            return await self.send(out, head, strategy)
        failed = [channel for position in answer[4:] for channel in entries[position - 1][3]]
        if local:
            failed += self.layer.put_local(local, predicted)
        return metrics.copies(await strategy.account(len(out.routes), failed))

    def local_channels(self, routes: list[str]) -> list[str]:
        """The routes this process's own buffers receive, when its layer can put a copy there."""
        return self.layer.local_channels(routes) if self.local else []


#: The way direct messages leave through a layer: chosen once per layer instance.
pipeline_for: PerLayer[Stepwise] = PerLayer(lambda layer: Folded(layer) if is_redis_layer(layer) else Stepwise(layer))
