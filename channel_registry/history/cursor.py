"""One connection's place in its user's history: what it has been sent, what comes next.

Why a connection gets every recoverable event exactly once, in order:

- a connection registers (row written, or group joined), *then* reads the
  history after the client's position; that read counts it in the history's
  ``joins`` (the same script, so atomically);
- a sender notes the user's head as it last saw it (``seen``: epoch and joins, a
  value Redis answered before), *then* looks up the live connections, *then*
  appends the event (which gives it its ``seq``) and learns the head's epoch and
  ``joins`` at that moment, atomically with the append, *then* sends: to the
  connections it found if ``joins`` is still ``seen``'s, else to those of a
  second lookup made after the append. Without a ``seen`` (a user this process
  never saw), always the second lookup.

Take any event E and connection C. If the sender's lookup ran after C's
registration, C is found and E arrives live. If it ran before, C registered after
the lookup, so after ``seen`` was read. Either C's history read (and its count in
``joins``) came before E's append: then the append finds ``joins`` moved past
``seen`` (it only grows within an epoch; a new epoch differs from ``seen``'s too),
and the second lookup, after the append and so after C's registration, finds C;
or C's read came after the append and returns E. Either way C gets E. Both can
happen, so the cursor drops a ``seq`` it has already passed. (``seen`` may be
older than the newest head: any value Redis answered before the lookup will do,
as ``joins`` only grows within an epoch.) Groups (and every send of ``send_to_user``) take the second lookup always: the
proof is then the first half alone, the append before the lookup.

Two senders to one user can race: the event numbered 7 may arrive live before
6. Numbers are handed out by the append, so 6 was in the history before 7
existed; a gap is filled from the history at once, and the late 6 is dropped.
A history that cannot fill it (trimmed, lost) produces a ``reset``, never a
silent gap. (Centrifugo's subscribe and Mercure's ``AddSubscriber`` close the
same race with a buffer; here the consumer's queue is the buffer.)

A copy for a channel of the sender's own process may skip Redis
(``pipeline.Folded``: put straight into the receive buffer). It is made only when
the script answered "sent", so under the same conditions as a copy through Redis
(the channels found are complete, the position is the one the append handed
out); the proof above never used how long a copy travels. It only makes the race
of two senders more likely: the local copy of 7 can overtake a copy of 6 still
queued in Redis (another process's, or this process's own that took the second
lookup). 6 was appended before 7 was numbered, so before the local copy existed:
the gap fill finds it, and the late copy is dropped. A local copy refused by a
full buffer is a lost copy like one refused as ``ChannelFull``: the next event's
gap or the next resume brings it back.

``tests/test_history.py::test_a_tab_that_joins_between_the_lookup_and_the_append_gets_the_message_live_once``
makes the rare interleaving happen on purpose, and
``tests/test_history.py::test_a_copy_put_straight_into_a_local_buffer_overtakes_copies_still_in_redis_and_loses_none``
the overtaking.
"""

from __future__ import annotations

from typing import Any

from .. import metrics
from ..exceptions import ChannelLayerUnavailable
from ..protocol import PROTOCOL_VERSION
from .log import RESET_EPOCH, RESET_INVALID, RESET_UNAVAILABLE, History, Position, position_for, resolved

#: Channels events the cursor emits for the connection to turn into frames.
POSITION_EVENT = "registry.position"
RECOVERED_EVENT = "registry.recovered"
RESET_EVENT = "registry.reset"
HISTORY_EVENTS = frozenset({POSITION_EVENT, RECOVERED_EVENT, RESET_EVENT})


def control(event_type: str, head: Position, **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "epoch": head.epoch, "seq": head.seq, **fields}


def opening(event_type: str, head: Position, **fields: Any) -> dict[str, Any]:
    """The event that starts a connection's history: it also announces the protocol version,
    so a client learns it before any live event (after the replayed ones when it resumes)."""
    return control(event_type, head, protocol=PROTOCOL_VERSION, **fields)


class Cursor:
    """Orders, de-duplicates and completes the recoverable events of one connection."""

    def __init__(self, history: History, user_id: Any) -> None:
        self.history = history
        self.user_id = user_id
        #: The position of the last event passed on; set by ``start``.
        self.position: Position | None = None

    async def start(self, since: str | None) -> list[dict[str, Any]]:
        """The connection's first events, each carrying a position: for a new client
        (``since`` is ``None``) the current one; for a returning client (``since`` is
        its ``"<epoch>:<seq>"``) what it missed then ``recovered``, or a ``reset``
        saying why that cannot be had.

        Call it once registered; raises ``ChannelLayerUnavailable`` if the history
        cannot be read.
        """
        try:
            asked = Position.parse(since) if since is not None else None
        except ValueError:
            asked = None
        recovery = await self.history.read(self.user_id, asked, joining=True)
        self.position = recovery.head
        if since is None:
            return [opening(POSITION_EVENT, recovery.head)]
        reason = RESET_INVALID if asked is None else recovery.reset
        metrics.resumed(reason, len(recovery.events))
        if reason:
            return [opening(RESET_EVENT, recovery.head, reason=reason)]
        return [*recovery.events, opening(RECOVERED_EVENT, recovery.head, count=len(recovery.events))]

    async def admit(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """What to pass on for one incoming event: usually itself, nothing for a
        duplicate, the missing events before it for a gap."""
        position = position_for(event, self.user_id)
        if position is None or self.position is None:
            return [event]
        if position.epoch != self.position.epoch:
            # The history was lost and started again while this connection was open.
            self.position = Position(position.epoch, 0)
            return [control(RESET_EVENT, self.position, reason=RESET_EPOCH), *await self.admit(event)]
        if position.seq <= self.position.seq:
            return []
        if position.seq == self.position.seq + 1:
            self.position = position
            return [resolved(event, position)]
        return await self.fill_gap(event, position)

    async def fill_gap(self, event: dict[str, Any], position: Position) -> list[dict[str, Any]]:
        assert self.position is not None
        try:
            recovery = await self.history.read(self.user_id, self.position)
        except ChannelLayerUnavailable:
            self.position = position
            return [control(RESET_EVENT, position, reason=RESET_UNAVAILABLE), resolved(event, position)]
        # The head may be past this event: the later ones arrive live too, and are dropped then.
        self.position = recovery.head
        if recovery.reset:
            return [control(RESET_EVENT, recovery.head, reason=recovery.reset)]
        return recovery.events
