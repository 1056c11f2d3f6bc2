"""Connections end with the session that opened them: logout, password change, deactivation.

A socket or event stream is authenticated once, at its handshake; afterwards
nothing in Channels looks at the session again. These receivers close what
Django itself would no longer let in:

- logout closes the connections of the session that logged out (4410), not
  the user's other devices (``CLOSE_ON_LOGOUT``);
- a password change closes every connection of the user with 4409: clients
  reconnect at once and the handshake checks each session again. The session
  that changed the password (kept by ``update_session_auth_hash``) comes back;
  every other one is refused with 4401 (``CLOSE_ON_PASSWORD_CHANGE``). The
  change alone cannot tell which open connection belongs to the session that
  made it: Django gives that session a new key after the save;
- ``is_active=False`` closes every connection of the user with 4410
  (``CLOSE_ON_DEACTIVATION``).

Both strategies are asked: a project may route some sockets through groups.
A failure is logged, never raised: logging out must work while Redis is down.

Access also ends where no signal is sent: ``QuerySet.update(is_active=False)``
or ``update(password=...)``, a deleted user or session row, a session that
expires. So each server process keeps, per open connection, what its handshake
saw (:class:`Access`), and :func:`ended` checks all of them at once — one query
for the users and one for the sessions, however many connections — on the
heartbeat, and once more for each new connection right after it registered:
a handshake that loaded its session just before a logout or password change
registers after the close went out, and would otherwise stay open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends import cache as cache_sessions
from django.contrib.sessions.backends import signed_cookies
from django.core.cache import caches
from django.db import DatabaseError, transaction
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from ..conf import registry_settings
from ..exceptions import ChannelLayerUnavailable
from ..protocol import CLOSE_REAUTHENTICATE, CLOSE_SESSION_ENDED

logger = logging.getLogger(__name__)


def _dispatchers():
    from ..dispatch import mapping
    from ..groups import groups

    return mapping, groups


def _close(method: str, target, code: int) -> None:
    for dispatcher in _dispatchers():
        try:
            getattr(dispatcher, method)(target, code)
        except (ChannelLayerUnavailable, DatabaseError):
            logger.warning("channel_registry: could not close the connections of %r", target, exc_info=True)


def close_on_logout(sender, request, user, **kwargs) -> None:
    scope = registry_settings().CLOSE_ON_LOGOUT
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if user is None or scope is None:
        return
    if scope == "session" and session_key:
        _close("disconnect_session", session_key, CLOSE_SESSION_ENDED)
    elif scope == "user":
        _close("disconnect_user", user.pk, CLOSE_SESSION_ENDED)


def close_on_credentials_change(sender, instance, created, **kwargs) -> None:
    """``post_save`` of the user model: password changed, or account deactivated.

    ``set_password`` leaves the new raw password in ``_password`` until the save
    completes (Django's own ``password_validation.password_changed`` reads it
    there). The connections close once the transaction commits: a client that
    reconnected before would still find the old password hash.
    """
    if created or instance.pk is None:
        return
    options = registry_settings()
    if options.CLOSE_ON_DEACTIVATION and getattr(instance, "is_active", True) is False:
        code = CLOSE_SESSION_ENDED
    elif options.CLOSE_ON_PASSWORD_CHANGE and getattr(instance, "_password", None) is not None:
        code = CLOSE_REAUTHENTICATE
    else:
        return
    user_id = instance.pk
    transaction.on_commit(lambda: _close("disconnect_user", user_id, code), using=kwargs.get("using"))


@dataclass(frozen=True)
class Access:
    """What one connection's handshake was let in with."""

    user_id: Any
    #: The session's key ("" without a session: a token-authenticated scope, say).
    session_key: str
    #: ``user.get_session_auth_hash()`` as the handshake saw it: it changes with the password.
    auth_hash: str | None

    @classmethod
    def of(cls, user: Any, session_key: str | None) -> Access:
        get_hash = getattr(user, "get_session_auth_hash", None)
        return cls(user.pk, session_key or "", get_hash() if get_hash else None)


def ended(accesses: Mapping[str, Access]) -> dict[str, int]:
    """The connections of ``accesses`` (by channel name) Django would no longer let in, with their close code.

    Two queries whatever the number of connections: the users, then the sessions.
    """
    if not accesses:
        return {}
    user_ids = {access.user_id for access in accesses.values()}
    users = {user.pk: user for user in get_user_model()._default_manager.filter(pk__in=user_ids)}
    # One HMAC per user, not per connection.
    auth_hashes = {pk: user.get_session_auth_hash() for pk, user in users.items()}
    keys = {access.session_key for access in accesses.values() if access.session_key}
    sessions = live_sessions(keys) if keys and registry_settings().CLOSE_ON_LOGOUT is not None else None
    codes = {}
    for channel_name, access in accesses.items():
        code = close_code(access, users.get(access.user_id), auth_hashes.get(access.user_id), sessions)
        if code is not None:
            codes[channel_name] = code
    return codes


def close_code(access: Access, user: Any, auth_hash: str | None, sessions: set[str] | None) -> int | None:
    """4410: the user is gone or inactive; 4409: the user's session auth hash changed (the
    password, by any path), or the session is gone or expired; ``None``: still in.

    A session that is gone is a 4409, not a 4410: the browser may hold a newer one (a new
    login rotates the key with ``cycle_key``), so the client reconnects once and its
    handshake decides. A logout's own close (4410) is sent by its signal, before this.
    A check runs only while its ``CLOSE_ON_*`` option is on; a deleted user always closes.
    """
    options = registry_settings()
    if user is None or (options.CLOSE_ON_DEACTIVATION and getattr(user, "is_active", True) is False):
        return CLOSE_SESSION_ENDED
    if options.CLOSE_ON_PASSWORD_CHANGE and access.auth_hash is not None and auth_hash is not None:
        if not constant_time_compare(auth_hash, access.auth_hash):
            return CLOSE_REAUTHENTICATE
    if sessions is not None and access.session_key and access.session_key not in sessions:
        return CLOSE_REAUTHENTICATE
    return None


def live_sessions(keys: Collection[str]) -> set[str] | None:
    """Which of ``keys`` name a session that still exists and has not expired; ``None``: the engine cannot say."""
    check = session_check()
    return None if check is None else check(keys)


def session_check() -> Callable[[Collection[str]], set[str]] | None:
    """How this project's session engine tells which sessions still exist; ``None`` when it cannot.

    Database engines (``db``, ``cached_db``): one query on the session table, the
    source of truth for both. ``cache``: one ``get_many`` (the cache expires them).
    ``signed_cookies``: the key is the signed session itself; its signature and
    age are checked in the process, without I/O (nothing on the server can end it
    earlier). Any other engine (``file``, your own) is not checked: system check W030.
    """
    store = import_module(settings.SESSION_ENGINE).SessionStore
    if hasattr(store, "get_model_class"):
        model = store.get_model_class()

        def in_table(keys: Collection[str]) -> set[str]:
            found = model.objects.filter(session_key__in=keys, expire_date__gt=timezone.now())
            return set(found.values_list("session_key", flat=True))

        return in_table
    if issubclass(store, cache_sessions.SessionStore):

        def in_cache(keys: Collection[str]) -> set[str]:
            by_cache_key = {store.cache_key_prefix + key: key for key in keys}
            return {by_cache_key[found] for found in caches[settings.SESSION_CACHE_ALIAS].get_many(list(by_cache_key))}

        return in_cache
    if issubclass(store, signed_cookies.SessionStore):
        return lambda keys: {key for key in keys if store(key).load()}
    return None
