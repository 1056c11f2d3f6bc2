"""The public entry points for sending to users: async first, sync wrappers on top.

``asend_to_user`` and friends use the explicit registry; :mod:`channel_registry.groups`
exposes the same functions bound to the group strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from functools import partial
from typing import Any, TypeVar

from asgiref.sync import async_to_sync

from .delivery.mapping import MappingStrategy
from .delivery.strategy import Delivery, DeliveryStrategy
from .models import user_pk
from .protocol import CLOSE_FORBIDDEN, DISCONNECT_EVENT, NOTIFY_EVENT, POSITION_KEY
from .registry.postgres import sync_caller

T = TypeVar("T")


def check_event(event: Any) -> dict[str, Any]:
    """Refuse what the channel layer would reject later, far from the caller."""
    if not isinstance(event, dict):
        raise TypeError(f"event must be a dict with a 'type' key, not {type(event).__name__}")
    event_type = event.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ValueError("event needs a 'type' key holding a non-empty string, e.g. 'chat.message'")
    if "__asgi_channel__" in event:
        raise ValueError("'__asgi_channel__' is reserved by the channel layer")
    if POSITION_KEY in event:
        raise ValueError(f"{POSITION_KEY!r} is set by the history, not by the sender")
    return event


class Dispatcher:
    """``send_to_user``, ``send_to_users`` and ``notify_user`` over one strategy."""

    def __init__(self, strategy: DeliveryStrategy) -> None:
        self.strategy = strategy

    async def asend_to_user(self, user: Any, event: dict[str, Any], *, recover: bool = True) -> Delivery:
        """Send a Channels event to every live connection of ``user`` (instance or pk).

        ``recover``: keep it in the user's history, so a connection that was
        reconnecting gets it when it comes back. ``False`` for ephemeral events
        (typing, presence) that are worthless late.
        """
        return await self.strategy.deliver([user_pk(user)], check_event(event), recover=recover)

    async def asend_to_users(self, users: Iterable[Any], event: dict[str, Any], *, recover: bool = True) -> Delivery:
        """Send one event to many users with one registry lookup; one ``Delivery`` for all."""
        user_ids = {user_pk(u) for u in users}
        if not user_ids:
            return Delivery(channels=0, sent=0, failed=[])
        return await self.strategy.deliver(user_ids, check_event(event), recover=recover)

    async def anotify_user(self, user: Any, data: Any) -> Delivery:
        """Send ``data`` as a ``{"type": "notification"}`` frame to ``user``'s sockets; recoverable."""
        return await self.asend_to_user(user, {"type": NOTIFY_EVENT, "data": data})

    async def adisconnect_user(self, user: Any, code: int = CLOSE_FORBIDDEN) -> int | None:
        """Close every live connection of ``user``, on every process; returns how many were reached.

        Sockets close with ``code``; event streams end. ``None`` when the strategy
        cannot count (groups).
        """
        delivery = await self.asend_to_user(user, {"type": DISCONNECT_EVENT, "code": code}, recover=False)
        return delivery.sent

    async def adisconnect_session(self, session_key: str, code: int) -> int | None:
        """Close every live connection opened by the session ``session_key``; how many were reached."""
        delivery = await self.strategy.deliver_to_session(session_key, {"type": DISCONNECT_EVENT, "code": code})
        return delivery.sent

    def send_to_user(self, user: Any, event: dict[str, Any], *, recover: bool = True) -> Delivery:
        """Sync wrapper for views, management commands and Celery tasks."""
        return _from_sync(partial(self.asend_to_user, recover=recover), user, event)

    def send_to_users(self, users: Iterable[Any], event: dict[str, Any], *, recover: bool = True) -> Delivery:
        return _from_sync(partial(self.asend_to_users, recover=recover), users, event)

    def notify_user(self, user: Any, data: Any) -> Delivery:
        return _from_sync(self.anotify_user, user, data)

    def disconnect_user(self, user: Any, code: int = CLOSE_FORBIDDEN) -> int | None:
        return _from_sync(self.adisconnect_user, user, code)

    def disconnect_session(self, session_key: str, code: int) -> int | None:
        return _from_sync(self.adisconnect_session, session_key, code)


def _from_sync(function: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Run an async entry point for sync code, reading the registry on the caller's own connection."""
    token = sync_caller.set(True)
    try:
        return async_to_sync(function)(*args)
    finally:
        sync_caller.reset(token)


mapping = Dispatcher(MappingStrategy())

asend_to_user = mapping.asend_to_user
asend_to_users = mapping.asend_to_users
anotify_user = mapping.anotify_user
send_to_user = mapping.send_to_user
send_to_users = mapping.send_to_users
notify_user = mapping.notify_user
adisconnect_user = mapping.adisconnect_user
disconnect_user = mapping.disconnect_user
