"""A user sends a direct message: the checks and the delivery every transport shares.

``RegistryConsumer`` uses :class:`DirectMessages` for its ``direct`` frames; an
HTTP view that lets a page send (the demo's ``POST /messages/``) uses the same
class, so the policy (``CAN_MESSAGE``), the sender's budgets and what the ack
discloses cannot differ between transports. In order:

1. the recipient: an active user the policy lets the sender reach, and their live
   connections (without hooks or a policy, one registry statement). A refusal
   answers ``unknown_recipient`` like a missing account unless ``REVEAL_REFUSALS``,
   after charging the sender's message budget as a message would (probing for
   recipients costs too: over the budget, the answer is ``rate_limited``);
2. the sender's message budget (``RATE_LIMIT``) and, in the same spend, the bytes
   the message will keep in the recipient's history (``HISTORY_SENDER_LIMIT``).
   A sender this process knows to be over it (``budget.likely_refused``) is
   refused before step 1, so a flood over budget costs no registry query;
3. the copies: the sender's ``FANOUT_LIMIT`` pays one token per connection found,
   before anything is stored or sent, so a refused flood never reaches the
   recipient's history or server process. With ``ACK_DELIVERED`` off, a refusal
   would tell the sender what the ack hides: the message is then kept in the
   history without being sent, and answered like any other;
4. delivery, refused with ``rate_limited`` when the recipient's history already
   holds the sender's share (``HISTORY_SENDER_SHARE``), and the ack, with
   ``delivered`` only if ``ACK_DELIVERED``.

Steps 2 to 4 are ``channel_registry.delivery.pipeline``'s: on a Redis layer, one script.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any, ClassVar

from channels.db import database_sync_to_async
from django.utils.module_loading import import_string

from . import metrics, protocol
from .conf import registry_settings
from .delivery import budget
from .delivery.pipeline import Outgoing, Refused, pipeline_for
from .delivery.strategy import Delivery, DeliveryStrategy, active_user_exists, channel_layer
from .exceptions import HistoryShareExceeded
from .history.log import Head, as_json, history_for
from .protocol import Direct, ProtocolError


class DirectMessages:
    """Direct messages from one signed-in user. Subclass to change a step.

    Extension points: ``get_recipient`` and ``can_message`` (with ``recipient_lookup =
    HOOKS_FIRST``), ``build_direct_message`` and ``delivered`` (runs once a message went
    out, e.g. to store it).
    """

    #: How the recipient is found and checked (:class:`RecipientLookup`). A subclass that
    #: overrides ``get_recipient`` or ``can_message`` sets :data:`HOOKS_FIRST`, or its hooks
    #: would not all run; ``None`` picks one per call (see :meth:`lookup`).
    recipient_lookup: ClassVar[RecipientLookup | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hooks = [name for name in ("get_recipient", "can_message") if name in vars(cls)]
        if hooks and cls.recipient_lookup is None:
            # Written before recipient_lookup existed: such a class relied on its hooks running.
            warnings.warn(
                f"{cls.__qualname__} overrides {' and '.join(hooks)}: set recipient_lookup = "
                "channel_registry.messaging.HOOKS_FIRST; it is assumed until 0.4.",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.recipient_lookup = HOOKS_FIRST

    def __init__(self, sender: Any, strategy: DeliveryStrategy) -> None:
        self.sender = sender
        self.strategy = strategy

    async def send(self, direct: Direct) -> dict[str, Any]:
        """Deliver ``direct`` and return the sender's ``ack`` frame; raise ``ProtocolError`` when refused."""
        with metrics.direct_message() as outcome:
            event = {"type": protocol.DIRECT_EVENT, "frame": self.build_direct_message(direct)}
            sending = self.sending_costs(event)
            if budget.likely_refused(channel_layer(), self.sender.pk, sending):
                # Decided before the registry is asked: a sender over budget costs no query.
                await self.spend(sending, direct)
                sending = []  # paid
            try:
                recipient_id, routes, seen = await self.recipient(direct)
            except ProtocolError:
                await self.spend(sending, direct)
                raise
            options = registry_settings()
            outgoing = Outgoing(
                self.sender.pk, recipient_id, event, routes, seen, sending,
                copies=copies_cost(routes), keep_unpaid=not options.ACK_DELIVERED,
            )  # fmt: skip
            try:
                delivery = await pipeline_for(channel_layer()).commit(outgoing, self.strategy)
            except Refused as refusal:
                raise ProtocolError(
                    protocol.RATE_LIMITED, f"too many {refusal.names}; slow down", direct.id,
                    retry_after=refusal.retry_after,
                ) from None  # fmt: skip
            except HistoryShareExceeded:
                detail = "too many of your messages are waiting for this user; try again later"
                raise ProtocolError(protocol.RATE_LIMITED, detail, direct.id) from None
            await self.delivered(direct, delivery)
            outcome.delivered(delivery)
            return protocol.ack_frame(direct.id, delivery.sent if options.ACK_DELIVERED else None)

    async def recipient(self, direct: Direct) -> tuple[Any, list[str] | None, Head | None]:
        """Who receives ``direct``, their live channels, and their history's head as seen before
        the lookup (see ``delivery/pipeline.py``); ``ProtocolError`` if refused. The way is ``lookup()``'s."""
        return await self.lookup().find(self, direct)

    def lookup(self) -> RecipientLookup:
        """``recipient_lookup`` if the class sets one; else one statement, or the hooks first under ``CAN_MESSAGE``."""
        if self.recipient_lookup is not None:
            return self.recipient_lookup
        return HOOKS_FIRST if registry_settings().CAN_MESSAGE is not None else ONE_STATEMENT

    async def check_recipient(self, direct: Direct, recipient_id: Any) -> None:
        """Refuse a missing or forbidden recipient, and oneself unless ``ALLOW_SELF_MESSAGE``."""
        if recipient_id is not None and recipient_id == self.sender.pk:
            if not registry_settings().ALLOW_SELF_MESSAGE:
                raise ProtocolError(protocol.FORBIDDEN, "you may not message yourself", direct.id)
        elif recipient_id is None or not await self.can_message(recipient_id):
            raise self.refusal(direct, found=recipient_id is not None)

    def sending_costs(self, event: dict[str, Any]) -> list[budget.Spend]:
        """One message of ``RATE_LIMIT``, and its stored size of ``HISTORY_SENDER_LIMIT``."""
        options = registry_settings()
        costs = [budget.Spend("messages", *options.RATE_LIMIT)] if options.RATE_LIMIT else []
        if options.HISTORY_SENDER_LIMIT:
            size = len(as_json(event, default=repr))  # an override may add what JSON cannot carry
            costs.append(budget.Spend("bytes", *options.HISTORY_SENDER_LIMIT, cost=size, need=size))
        return costs

    async def spend(self, items: list[budget.Spend], direct: Direct) -> None:
        """Charge a refused message's budget: ``rate_limited`` when it is spent."""
        verdict = await budget.spend(channel_layer(), self.sender.pk, items)
        if not verdict.allowed:
            names = " or ".join(item.name for item in items)
            raise ProtocolError(
                protocol.RATE_LIMITED, f"too many {names}; slow down", direct.id, retry_after=verdict.retry_after
            )

    def refusal(self, direct: Direct, found: bool) -> ProtocolError:
        """The same answer for "no such account" and "not for you", unless refusals may be revealed."""
        if found and registry_settings().REVEAL_REFUSALS:
            return ProtocolError(protocol.FORBIDDEN, "you may not message this user", direct.id)
        return ProtocolError(protocol.UNKNOWN_RECIPIENT, f"no user with id {direct.to} you can message", direct.id)

    async def get_recipient(self, user_id: int) -> Any:
        """The recipient's primary key if they may receive messages, else ``None``."""
        return user_id if await active_user_exists(user_id) else None

    async def can_message(self, recipient_id: Any) -> bool:
        """``CAN_MESSAGE(sender, recipient_id)``; any active user when it is not set."""
        path = registry_settings().CAN_MESSAGE
        if path is None:
            return True
        policy = import_string(path)
        if not asyncio.iscoroutinefunction(policy):
            policy = database_sync_to_async(policy)
        return bool(await policy(self.sender, recipient_id))

    def build_direct_message(self, direct: Direct) -> dict[str, Any]:
        """The frame every connection of the recipient receives; the sender comes from here, never the payload."""
        return protocol.direct_frame(self.sender.pk, direct)

    async def delivered(self, direct: Direct, delivery: Delivery) -> None:
        """Called once a message went out (to no connection, when the recipient is offline)."""


class RecipientLookup:
    """How :class:`DirectMessages` finds a message's recipient and their live channels."""

    async def find(self, messages: DirectMessages, direct: Direct) -> tuple[Any, list[str] | None, Head | None]:
        raise NotImplementedError


class OneStatement(RecipientLookup):
    """The library's own rule, any active user, checked by the statement that lists their channels.

    ``can_message`` runs afterwards (it allows anyone without ``CAN_MESSAGE``).
    """

    async def find(self, messages: DirectMessages, direct: Direct) -> tuple[Any, list[str] | None, Head | None]:
        history = history_for(channel_layer())
        seen = history.last_seen(direct.to) if history else None
        found, routes = await messages.strategy.resolve(direct.to)
        await messages.check_recipient(direct, direct.to if found else None)
        return direct.to, routes, seen


class HooksFirst(RecipientLookup):
    """``get_recipient`` and ``can_message`` decide first; only an accepted recipient's channels are looked up."""

    async def find(self, messages: DirectMessages, direct: Direct) -> tuple[Any, list[str] | None, Head | None]:
        recipient_id = await messages.get_recipient(direct.to)
        await messages.check_recipient(direct, recipient_id)
        history = history_for(channel_layer())
        seen = history.last_seen(recipient_id) if history else None
        return recipient_id, await messages.strategy.routes(recipient_id), seen


ONE_STATEMENT = OneStatement()
HOOKS_FIRST = HooksFirst()


def copies_cost(routes: list[str] | None) -> budget.Spend | None:
    """One ``FANOUT_LIMIT`` token per connection reached: a user with many tabs costs more to flood.

    A recipient with more connections than the whole bucket can still be reached
    once it is full; the debt then holds the sender back. Groups cannot count: free.

    With ``ACK_DELIVERED`` off only an online recipient costs tokens, and a refusal's
    ``retry_after`` (exact to the millisecond) is what their connections cost: it
    would tell whether they are online and on how many tabs. There the answer is the
    ack any message gets, and the message is kept, not sent (``Outgoing.keep_unpaid``).
    """
    limit = registry_settings().FANOUT_LIMIT
    if not limit or not routes:
        return None
    return budget.Spend("copies", *limit, cost=len(routes), need=min(len(routes), limit[0]))
