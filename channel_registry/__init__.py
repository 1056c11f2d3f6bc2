"""Reach every live connection of a user in Django Channels, through an explicit registry.

The dispatch and presence functions are importable from here; they are loaded on
first use because they need Django's app registry to be ready.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "Delivery": "strategy",
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


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'channel_registry' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
