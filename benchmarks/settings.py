"""Django settings for ``python -m benchmarks.run``.

``REDIS_URL`` (default ``redis://127.0.0.1:6379``) and ``DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432/channel_registry_bench``) pick the services.
The benchmark drops and fills its tables, so it only ever works in a database
whose name contains ``bench``: any other name gets ``_bench`` appended (the way
Django's test runner prefixes ``test_``), and that database is created if missing.

Connections are persistent (``CONN_MAX_AGE=None``; docs/operations.md, "Upstream traps"), and the Redis key
prefix carries the process id, so two runs on one machine never share keys.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from channel_registry.layers import redis_host, redis_layer

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/channel_registry_bench"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379"
DATABASE_URL = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
#: Prefix of every Redis key the benchmark writes (deleted again when it ends).
KEY_PREFIX = f"crbench{os.getpid()}"
#: Nobody reads the benchmark's receiving keys; the harness deletes them between
#: rounds, so a capacity this large only keeps ``ChannelFull`` out of timings.
CAPACITY = 1_000_000


def parse_database_url(url: str) -> dict:
    """``postgres://user:password@host:port/name`` -> a ``DATABASES`` entry."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"DATABASE_URL must be postgres://user@host:port/name, not {url!r}")
    name = unquote(parts.path.lstrip("/")) or "channel_registry_bench"
    return {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 5432),
        "USER": unquote(parts.username or "postgres"),
        "PASSWORD": unquote(parts.password or ""),
        "NAME": name if "bench" in name else f"{name}_bench",
        # Persistent connections, no CONN_HEALTH_CHECKS.
        "CONN_MAX_AGE": None,
    }


SECRET_KEY = "benchmarks-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "channel_registry",
]
DATABASES = {"default": parse_database_url(DATABASE_URL)}
CHANNEL_LAYERS = {
    "default": redis_layer(REDIS_URL, prefix=KEY_PREFIX, capacity=CAPACITY),
    "memory": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": CAPACITY}},
    "pubsub": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [redis_host(REDIS_URL)], "prefix": f"{KEY_PREFIX}ps"},
    },
}
#: Library defaults, except STALE_AFTER: fixtures built at the start of a 2-minute
#: run must still count as live at its end (only the cutoff's value changes).
CHANNEL_REGISTRY = {"STALE_AFTER": 900}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
