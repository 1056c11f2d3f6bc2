"""The ``CHANNEL_REGISTRY`` settings dict: defaults, validation and typed access.

Nothing else in the library reads ``django.conf.settings`` for its own options;
everything goes through :func:`registry_settings`, which is cached and reset when
tests change settings (``override_settings``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

SETTINGS_NAME = "CHANNEL_REGISTRY"


@dataclass(frozen=True)
class RegistrySettings:
    """Every option with its default. The settings table of docs/operations.md mirrors this."""

    #: Alias in ``CHANNEL_LAYERS`` the registry sends through.
    CHANNEL_LAYER: str = "default"
    #: Seconds between two heartbeats of a server process (one UPDATE each).
    HEARTBEAT_INTERVAL: float = 30
    #: A row whose ``last_seen`` is older than this many seconds is stale:
    #: dispatch skips it, ``prune_channels`` deletes it.
    STALE_AFTER: float = 90
    #: On PostgreSQL with psycopg 3, run the hot statements (lookup, connect,
    #: disconnect) over native async connections instead of Django's
    #: thread-bound ORM (see ``postgres.py``).
    NATIVE_POSTGRES: bool = True
    #: Rows deleted per statement by ``prune_stale``.
    PRUNE_BATCH_SIZE: int = 5000
    #: Most channel layer commands the library has in flight at once, per process
    #: and event loop (redis-py 8 refuses the 101st concurrent command of its default pool).
    SEND_CONCURRENCY: int = 50
    #: Largest text frame a consumer accepts, in bytes of UTF-8.
    MAX_MESSAGE_BYTES: int = 16 * 1024
    #: ``(bytes, seconds)``: what one connection may send, checked in its process as
    #: each frame arrives (see ``inbound.py``); a frame costs its length plus 1 KiB.
    #: 128 KiB per 10 s: 7 frames of the largest size at once, or about 120 pings.
    #: Its size bounds what a flooding socket makes its process hold (paid frames wait
    #: for the consumer). Over it a frame is refused; more than a quarter budget sent
    #: before the wait it was told is over closes the connection with 4420. ``None``
    #: disables it.
    INBOUND_LIMIT: tuple[int, float] | None = (128 * 1024, 10)
    #: ``(bytes, seconds)``: what all of one user's connections in one process may send
    #: together, on top of each one's ``INBOUND_LIMIT``: opening more sockets does not buy
    #: more. 512 KiB per 10 s: the user's 20 messages of the largest size and the pings of
    #: 50 tabs fit. ``None`` disables it.
    INBOUND_USER_LIMIT: tuple[int, float] | None = (512 * 1024, 10)
    #: ``(messages, seconds)``: direct messages per user, over all their connections
    #: and processes (a token bucket in Redis with channels_redis). ``None`` disables it.
    RATE_LIMIT: tuple[int, float] | None = (20, 10)
    #: ``(copies, seconds)``: connections a user's direct messages may reach, per user.
    #: A message to someone with 40 tabs costs 40: flooding a many-tab user is what
    #: fills a server process's shared queue. ``None`` disables it.
    FANOUT_LIMIT: tuple[int, float] | None = (200, 10)
    #: Whether a direct message's ack says how many connections it reached
    #: (``delivered``). ``False``: ``null``, so a sender learns neither whether the
    #: recipient is online nor how many devices they use.
    ACK_DELIVERED: bool = True
    #: Whether a recipient that ``CAN_MESSAGE`` refuses answers ``forbidden``. ``False``:
    #: ``unknown_recipient``, the same as an id without an active account, so the
    #: answer is no oracle for which accounts exist.
    REVEAL_REFUSALS: bool = False
    #: Dotted path to ``callable(sender, recipient_id) -> bool`` (sync or async)
    #: deciding whether a direct message is allowed. ``None``: any active user.
    CAN_MESSAGE: str | None = None
    #: Whether the default policy lets a user message themself.
    ALLOW_SELF_MESSAGE: bool = False
    #: Prefix of the per-user group names used by the group strategy.
    GROUP_PREFIX: str = "registry.user."
    #: Seconds between two comment heartbeats on a Server-Sent Events stream.
    SSE_HEARTBEAT: float = 15
    #: Most live connections per user, counted over all processes. ``None``: no limit.
    #: More than a person keeps open (tabs and devices), few enough that one account
    #: cannot hold thousands of sockets (~44 KB each) or multiply every message it receives.
    MAX_CONNECTIONS_PER_USER: int | None = 50
    #: Over the limit: ``"close_newest"`` (4429 to the new one) or ``"close_oldest"``.
    ON_LIMIT: str = "close_newest"
    #: On logout (``user_logged_out``), close with 4410 the connections of
    #: ``"session"``: the session that logged out; ``"user"``: every session of
    #: the user; ``None``: none.
    CLOSE_ON_LOGOUT: str | None = "session"
    #: On a password change (``set_password`` then ``save``), close every
    #: connection of the user with 4409: clients reconnect and each session is
    #: checked again, so only sessions Django still accepts come back.
    CLOSE_ON_PASSWORD_CHANGE: bool = True
    #: When a user is saved with ``is_active=False``, close all their connections with 4410.
    CLOSE_ON_DEACTIVATION: bool = True
    #: Keep a per-user history of recoverable events, so a client that reconnects
    #: gets what it missed (see ``history.py``). Needs the Redis or in-memory layer.
    HISTORY: bool = True
    #: Events kept per user (Centrifugo's per-user example: 300 events for 10 minutes).
    HISTORY_SIZE: int = 300
    #: Seconds an event stays recoverable after it was sent.
    HISTORY_TTL: float = 600
    #: Most events one reconnect replays; further behind, the client gets a reset.
    RECOVERY_LIMIT: int = 300
    #: Most bytes one reconnect replays (one Redis reply at most); further behind, a
    #: ``too_many`` reset. A client that far behind reloads its state anyway.
    RECOVERY_MAX_BYTES: int = 256 * 1024
    #: Most bytes kept per user's history (stored as JSON, about the frames' size): with
    #: ``HISTORY_SIZE`` events of a 3.4 KiB average, or 60 direct messages of the largest size.
    HISTORY_MAX_BYTES: int = 1024 * 1024
    #: Largest event kept in a history. A larger one keeps its number but not its body:
    #: a resume across it gets an ``expired`` reset. Twice a ``MAX_MESSAGE_BYTES`` frame.
    HISTORY_EVENT_MAX_BYTES: int = 32 * 1024
    #: Most of one user's history (its bytes and events) one sender's direct messages may
    #: hold; past it, that sender's messages to them are refused with ``rate_limited``.
    #: ``None`` disables it.
    HISTORY_SENDER_SHARE: float | None = 0.25
    #: ``(bytes, seconds)``: bytes of direct messages a user may put into others' histories,
    #: over all recipients and processes (a token bucket like ``RATE_LIMIT``; refusal:
    #: ``rate_limited``). What one account spraying many recipients keeps live in Redis
    #: is about three times the first number. ``None`` disables it.
    HISTORY_SENDER_LIMIT: tuple[int, float] | None = (2 * 1024 * 1024, 600)
    #: ``(handshakes, seconds)``: WebSocket and event stream connections a user may open,
    #: over all processes. 50 tabs reconnecting twice after a rolling deploy fit in the
    #: burst; then one every 0.5 s. Refusal: close 4430 / HTTP 429 with ``Retry-After``.
    HANDSHAKE_LIMIT: tuple[int, float] | None = (120, 60)
    #: ``(resumes, seconds)``: connections with a position (``?since=``, ``Last-Event-ID``)
    #: a user may open, over all processes; each replays up to ``RECOVERY_MAX_BYTES``.
    #: Every tab of 50 resuming twice in a minute fits. Refusal as ``HANDSHAKE_LIMIT``'s.
    RESUME_LIMIT: tuple[int, float] | None = (100, 60)


OPTION_NAMES = frozenset(f.name for f in fields(RegistrySettings))


def _close_on_logout(disconnect: bool) -> str | None:
    # 0.1 closed every connection of the user on logout; 0.2 defaults to the logged-out session only.
    return "user" if disconnect else None


#: Renamed options still read for one release: old name -> (new name, old value -> new value).
DEPRECATED_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "DISCONNECT_ON_LOGOUT": ("CLOSE_ON_LOGOUT", _close_on_logout),
}


def user_options() -> dict[str, Any]:
    """The raw dict from the project's settings (empty when it has none)."""
    return dict(getattr(settings, SETTINGS_NAME, None) or {})


def _renamed(options: dict[str, Any]) -> dict[str, Any]:
    """Options under their current names; a deprecated name warns and maps unless the new one is set."""
    current = dict(options)
    for old, (new, convert) in DEPRECATED_OPTIONS.items():
        if old in current:
            warnings.warn(
                f"{SETTINGS_NAME}[{old!r}] is deprecated and will be removed in 0.3; use {new!r}.",
                DeprecationWarning,
                stacklevel=3,
            )
            value = convert(current.pop(old))
            current.setdefault(new, value)
    return current


@cache
def registry_settings() -> RegistrySettings:
    """The effective settings; unknown keys are reported by the system check."""
    options = {k: v for k, v in _renamed(user_options()).items() if k in OPTION_NAMES}
    for name in (
        "RATE_LIMIT", "FANOUT_LIMIT", "INBOUND_LIMIT", "INBOUND_USER_LIMIT", "HISTORY_SENDER_LIMIT",
        "HANDSHAKE_LIMIT", "RESUME_LIMIT",
    ):  # fmt: skip
        if isinstance(options.get(name), list):
            options[name] = tuple(options[name])
    return RegistrySettings(**options)


@receiver(setting_changed)
def _reset_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTINGS_NAME:
        registry_settings.cache_clear()
