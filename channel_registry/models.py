"""The registry table: one row per live connection (socket or event stream)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.utils import timezone

from .conf import registry_settings


def stale_cutoff(older_than: float | None = None) -> datetime:
    """The instant before which a row's ``last_seen`` makes it stale."""
    seconds = registry_settings().STALE_AFTER if older_than is None else older_than
    return timezone.now() - timedelta(seconds=seconds)


def session_digest(session_key: str | None) -> str:
    """What a row keeps of the session that opened it: enough to find its connections
    at logout, useless to anyone reading the table (the key itself would let them in)."""
    return hashlib.sha256(session_key.encode()).hexdigest() if session_key else ""


def user_pk(user: Any) -> Any:
    """Accept a user instance or a primary key, as every public function does."""
    return getattr(user, "pk", user)


def active_field() -> Any:
    """The user model's ``is_active`` field, or ``None`` (``AbstractBaseUser`` alone has none)."""
    try:
        return get_user_model()._meta.get_field("is_active")
    except FieldDoesNotExist:
        return None


def active_users() -> models.QuerySet[Any]:
    """Users who may receive messages: ``is_active``, where the user model has that field."""
    users = get_user_model()._default_manager.all()
    return users if active_field() is None else users.filter(is_active=True)


class UserChannelQuerySet(models.QuerySet):
    def for_user(self, user: Any) -> UserChannelQuerySet:
        return self.filter(user_id=user_pk(user))

    def for_users(self, users: Iterable[Any]) -> UserChannelQuerySet:
        return self.filter(user_id__in={user_pk(u) for u in users})

    def live(self) -> UserChannelQuerySet:
        """Rows refreshed within ``STALE_AFTER``: connections that can be reached."""
        return self.filter(last_seen__gte=stale_cutoff())

    def stale(self, older_than: float | None = None) -> UserChannelQuerySet:
        """Rows whose process stopped refreshing them: left by a crash or a restart."""
        return self.filter(last_seen__lt=stale_cutoff(older_than))

    def channel_names(self) -> UserChannelQuerySet:
        return self.values_list("channel_name", flat=True)


class Transport:
    """What a row's connection is; "" for rows of processes from before 0.3, which did not say."""

    SOCKET = "socket"
    STREAM = "stream"
    choices = [(SOCKET, "WebSocket"), (STREAM, "event stream"), ("", "unknown")]


class UserChannel(models.Model):
    """A live consumer's channel name, and the user it belongs to.

    A user has as many rows as open tabs, devices and event streams; every
    lookup returns all of them, never ``get()`` one.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="live_channels",
    )
    # 100 is the channel layer's own limit on channel names.
    channel_name = models.CharField(max_length=100, unique=True)
    # Identifies the server process that serves the connection, so a dead
    # process's rows can be found (and removed) as a whole.
    server = models.CharField(max_length=100, db_index=True)
    # ``session_digest()`` of the session that opened the connection ("" without
    # one), so logging out closes that session's connections only. A database
    # default too: processes of the previous release insert rows without it
    # during a rolling deploy.
    session = models.CharField(max_length=64, blank=True, default="", db_default="", db_index=True)
    # A database default for the same reason as ``session``.
    transport = models.CharField(max_length=10, choices=Transport.choices, blank=True, default="", db_default="")
    connected_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now, db_index=True)

    objects = UserChannelQuerySet.as_manager()

    class Meta:
        verbose_name = "user channel"
        ordering = ["user_id", "connected_at"]

    def __str__(self) -> str:
        return f"{self.channel_name} (user {self.user_id})"

    @property
    def is_stale(self) -> bool:
        return self.last_seen < stale_cutoff()
