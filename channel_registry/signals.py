"""Presence signals.

Both are sent with ``sender=UserChannel`` and ``user_id=<pk>``, after the change is
committed, from a synchronous context (a receiver may use the ORM directly). A receiver
that raises is logged and does not affect the connection.

A receiver must not wait for the event loop (``async_to_sync``): when daphne
shuts down, a consumer cancelled while it unregisters lets the loop stop while
its database thread is still in the receiver, which then waits forever and the
process never exits. Schedule loop work instead (``loop.call_soon_threadsafe``);
``demo_site/inbox/presence.py`` shows how.

For each user they strictly alternate — ``user_online``, ``user_offline``,
``user_online`` … — because both follow the user's row count going from 0 to 1
and from 1 to 0, under a lock on the user's row. A crashed process's rows keep a
user "online" for the signals until ``prune_channels`` removes them, even though
``is_online()`` (which ignores stale rows) already says offline.
"""

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger(__name__)

#: The user's first connection registered.
user_online = Signal()
#: The user's last connection gone, by disconnect or by prune.
user_offline = Signal()


def send_presence(signal: Signal, user_id: Any) -> None:
    """Send a presence signal; a receiver's error is logged, never raised.

    Raised into a connect, a disconnect or a prune, it would leave rows behind
    for connections that are gone.
    """
    from .models import UserChannel

    for receiver, result in signal.send_robust(sender=UserChannel, user_id=user_id):
        if isinstance(result, Exception):
            logger.error("channel_registry: presence receiver %r failed", receiver, exc_info=result)
