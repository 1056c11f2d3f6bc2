"""Settings for demo_site processes started by the fault tests and the load script.

    DJANGO_SETTINGS_MODULE=tests.fault_settings CRF_DATABASE_URL=postgres://… \
    CRF_REDIS_URLS=redis://127.0.0.1:7001,redis://127.0.0.1:7002 \
    .venv/bin/daphne -b 127.0.0.1 -p 8001 demo_site.asgi:application

Everything of the demo site, with the services and the registry options taken
from the environment (``tests/processes.py`` writes it):

``CRF_DATABASE_URL``  PostgreSQL URL (required: processes must share a database).
``CRF_REDIS_URLS``    one or more Redis URLs, comma-separated (several = a sharded layer).
``CRF_REDIS_SENTINELS`` / ``CRF_REDIS_MASTER``  instead: ``host:port`` of each sentinel, comma-separated,
                      and the master's name (one Sentinel host, see ``redis_layer()``).
``CRF_REDIS_PREFIX``  channel layer key prefix (default ``crfaults``).
``CRF_LAYER_EXPIRY``  channel layer ``expiry`` in seconds (default: channels_redis's 60).
``CRF_LAYER_CAPACITY`` channel layer ``capacity`` (default: the layer's own).
``CRF_LAYER_BACKEND`` ``library`` (default: ``redis_layer()``'s batched layer), ``stock``
                      (channels_redis's ``RedisChannelLayer``), ``pubsub`` (``RedisPubSubChannelLayer``)
                      or ``memory`` (Channels' ``InMemoryChannelLayer``: the load script's rivals).
``CRF_HEARTBEAT`` / ``CRF_STALE_AFTER``  ``HEARTBEAT_INTERVAL`` / ``STALE_AFTER`` (0.5 / 2).
``CRF_MAX_CONNECTIONS`` / ``CRF_ON_LIMIT``  ``MAX_CONNECTIONS_PER_USER`` / ``ON_LIMIT``.
``CRF_RATE_LIMIT``    ``"messages,seconds"`` or ``"none"`` (default: the library's 20 per 10 s).
``CRF_FANOUT_LIMIT``  ``"copies,seconds"`` or ``"none"`` (default: the library's 200 per 10 s).
``CRF_HISTORY_SENDER_LIMIT`` / ``CRF_HISTORY_SENDER_SHARE``  ``"bytes,seconds"`` / a fraction, or ``"none"``.
``CRF_INBOUND_USER_LIMIT``  ``"bytes,seconds"`` or ``"none"`` (default: the library's 512 KiB per 10 s).
``CRF_ACK_DELIVERED`` / ``CRF_REVEAL_REFUSALS``  ``0`` or ``1``.
``CRF_CAN_MESSAGE``   dotted path of a ``CAN_MESSAGE`` policy.
``CRF_HISTORY_SIZE``  ``HISTORY_SIZE`` and ``RECOVERY_LIMIT`` (default: the library's 300).
``CRF_SECRET_KEY``    must match the process that writes the sessions.
``CRF_CSRF_TRUSTED_ORIGINS``  comma-separated ``CSRF_TRUSTED_ORIGINS`` (also trusted for WebSockets).
``CRF_PRESENCE``      ``0`` disconnects the demo's presence broadcast (the load script's option).
``CRF_STORE_MESSAGES`` ``0`` (with ``CRF_PRESENCE=0``) stores no copy of direct messages (load ``--no-store``).
"""

import os

from channel_registry.layers import STOCK_LAYER, redis_host, redis_layer
from demo_site.settings import *  # noqa: F403
from demo_site.settings import database_from_url


def _number(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


DATABASES = {"default": database_from_url(os.environ["CRF_DATABASE_URL"])}

_layer_options = {"prefix": os.environ.get("CRF_REDIS_PREFIX", "crfaults")}
if os.environ.get("CRF_LAYER_EXPIRY"):
    _layer_options["expiry"] = int(os.environ["CRF_LAYER_EXPIRY"])
if os.environ.get("CRF_LAYER_CAPACITY"):
    _layer_options["capacity"] = int(os.environ["CRF_LAYER_CAPACITY"])
_redis_urls = os.environ["CRF_REDIS_URLS"].split(",")
_redis_hosts: list = _redis_urls
if os.environ.get("CRF_REDIS_SENTINELS"):
    _sentinels = [address.split(":") for address in os.environ["CRF_REDIS_SENTINELS"].split(",")]
    _redis_hosts = [{
        "sentinels": [(host, int(port)) for host, port in _sentinels],
        "master_name": os.environ["CRF_REDIS_MASTER"],
    }]  # fmt: skip
_backend = os.environ.get("CRF_LAYER_BACKEND") or "library"
if _backend == "pubsub":  # no capacity or expiry: messages are published, never stored
    CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [redis_host(url) for url in _redis_urls], "prefix": _layer_options["prefix"]},
    }}  # fmt: skip
elif _backend == "memory":
    CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels.layers.InMemoryChannelLayer",
        "CONFIG": {key: value for key, value in _layer_options.items() if key != "prefix"},
    }}  # fmt: skip
else:
    _backend_options = {"backend": STOCK_LAYER} if _backend == "stock" else {}
    CHANNEL_LAYERS = {"default": redis_layer(*_redis_hosts, **_backend_options, **_layer_options)}

CHANNEL_REGISTRY = {
    "HEARTBEAT_INTERVAL": _number("CRF_HEARTBEAT", 0.5),
    "STALE_AFTER": _number("CRF_STALE_AFTER", 2),
}
if os.environ.get("CRF_MAX_CONNECTIONS"):
    CHANNEL_REGISTRY["MAX_CONNECTIONS_PER_USER"] = int(os.environ["CRF_MAX_CONNECTIONS"])
    CHANNEL_REGISTRY["ON_LIMIT"] = os.environ.get("CRF_ON_LIMIT", "close_newest")
if os.environ.get("CRF_HISTORY_SIZE"):
    CHANNEL_REGISTRY["HISTORY_SIZE"] = CHANNEL_REGISTRY["RECOVERY_LIMIT"] = int(os.environ["CRF_HISTORY_SIZE"])
for _name in ("RATE_LIMIT", "FANOUT_LIMIT", "HISTORY_SENDER_LIMIT", "INBOUND_USER_LIMIT"):
    _rate = os.environ.get(f"CRF_{_name}")
    if _rate:
        CHANNEL_REGISTRY[_name] = None if _rate == "none" else tuple(float(x) for x in _rate.split(","))
for _name in ("ACK_DELIVERED", "REVEAL_REFUSALS"):
    if os.environ.get(f"CRF_{_name}"):
        CHANNEL_REGISTRY[_name] = os.environ[f"CRF_{_name}"] == "1"
if os.environ.get("CRF_HISTORY_SENDER_SHARE"):
    _share = os.environ["CRF_HISTORY_SENDER_SHARE"]
    CHANNEL_REGISTRY["HISTORY_SENDER_SHARE"] = None if _share == "none" else float(_share)
if os.environ.get("CRF_CAN_MESSAGE"):
    CHANNEL_REGISTRY["CAN_MESSAGE"] = os.environ["CRF_CAN_MESSAGE"]

SECRET_KEY = os.environ.get("CRF_SECRET_KEY") or SECRET_KEY  # noqa: F405
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
if os.environ.get("CRF_CSRF_TRUSTED_ORIGINS"):
    CSRF_TRUSTED_ORIGINS = os.environ["CRF_CSRF_TRUSTED_ORIGINS"].split(",")
# The tests create users with Django's test hasher; the login form must accept them quickly.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if os.environ.get("CRF_PRESENCE") == "0":
    INSTALLED_APPS = [
        "tests.fault_apps.QuietInboxConfig" if app == "demo_site.inbox" else app
        for app in INSTALLED_APPS  # noqa: F405
    ]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
