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
"""

from __future__ import annotations

import logging

from django.db import DatabaseError, transaction

from .conf import registry_settings
from .exceptions import ChannelLayerUnavailable
from .protocol import CLOSE_REAUTHENTICATE, CLOSE_SESSION_ENDED

logger = logging.getLogger(__name__)


def _dispatchers():
    from .dispatch import mapping
    from .groups import groups

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
