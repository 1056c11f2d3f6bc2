"""Reach every live connection of a user in Django Channels, through an explicit registry.

The dispatch and presence functions are importable from here; they are loaded on
first use because they need Django's app registry to be ready.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import _moved

if TYPE_CHECKING:  # what __getattr__ returns, for type checkers and editors; not imported at run time
    from .cleanup import aprune_stale, prune_stale  # noqa: F401
    from .delivery.strategy import Delivery  # noqa: F401
    from .dispatch import (  # noqa: F401
        adisconnect_user,
        anotify_user,
        asend_to_user,
        asend_to_users,
        disconnect_user,
        notify_user,
        send_to_user,
        send_to_users,
    )
    from .exceptions import ChannelLayerUnavailable  # noqa: F401
    from .presence import ais_online, aonline_user_ids, is_online, online_user_ids  # noqa: F401

__version__ = "0.2.0"

_moved.install()

_PUBLIC = {
    "Delivery": "delivery.strategy",
    "asend_to_user": "dispatch",
    "asend_to_users": "dispatch",
    "anotify_user": "dispatch",
    "send_to_user": "dispatch",
    "send_to_users": "dispatch",
    "notify_user": "dispatch",
    "adisconnect_user": "dispatch",
    "disconnect_user": "dispatch",
    "is_online": "presence",
    "ais_online": "presence",
    "online_user_ids": "presence",
    "aonline_user_ids": "presence",
    "prune_stale": "cleanup",
    "aprune_stale": "cleanup",
    "ChannelLayerUnavailable": "exceptions",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'channel_registry' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
