"""Presence signals.

Both are sent with ``sender=UserChannel`` and ``user_id=<pk>``, after the change is
committed, from a synchronous context (a receiver may use the ORM directly).

For each user they strictly alternate — ``user_online``, ``user_offline``,
``user_online`` … — because both follow the user's row count going from 0 to 1
and from 1 to 0, under a lock on the user's row. A crashed process's rows keep a
user "online" for the signals until ``prune_channels`` removes them, even though
``is_online()`` (which ignores stale rows) already says offline.
"""

from django.dispatch import Signal

#: The user's first connection registered.
user_online = Signal()
#: The user's last connection gone, by disconnect or by prune.
user_offline = Signal()
