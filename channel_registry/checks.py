"""System checks: misconfigurations reported in words a user can act on."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from .conf import DEPRECATED_OPTIONS, OPTION_NAMES, SETTINGS_NAME, registry_settings, user_options

STOCK_LAYER = "channels_redis.core.RedisChannelLayer"
REDIS_LAYERS = {STOCK_LAYER, "channel_registry.redis_layer.BatchedRedisChannelLayer"}
# channels_redis's blocking read (RedisChannelLayer.brpop_timeout).
BLOCKING_READ = 5


@checks.register()
def check_options(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors = []
    unknown = sorted(set(user_options()) - OPTION_NAMES - set(DEPRECATED_OPTIONS))
    if unknown:
        errors.append(checks.Error(
            f"{SETTINGS_NAME} has unknown option(s): {', '.join(unknown)}.",
            hint=f"Valid options: {', '.join(sorted(OPTION_NAMES))}.",
            id="channel_registry.E001",
        ))
    for old in sorted(set(user_options()) & set(DEPRECATED_OPTIONS)):
        errors.append(checks.Warning(
            f"{SETTINGS_NAME}[{old!r}] is deprecated and will be removed in 0.3.",
            hint=f"Use {DEPRECATED_OPTIONS[old][0]!r} instead (see CHANGELOG.md).",
            id="channel_registry.W031",
        ))
    try:
        options = registry_settings()
    except TypeError as error:
        return [*errors, checks.Error(f"{SETTINGS_NAME} is not a valid dict: {error}", id="channel_registry.E002")]
    if options.STALE_AFTER <= options.HEARTBEAT_INTERVAL:
        errors.append(checks.Error(
            f"STALE_AFTER ({options.STALE_AFTER}) must be larger than HEARTBEAT_INTERVAL "
            f"({options.HEARTBEAT_INTERVAL}), or live connections are treated as stale.",
            hint="Use at least three heartbeats, e.g. HEARTBEAT_INTERVAL=30, STALE_AFTER=90.",
            id="channel_registry.E003",
        ))
    for name, unit in (
        ("RATE_LIMIT", "messages"), ("FANOUT_LIMIT", "copies"), ("INBOUND_LIMIT", "bytes"),
        ("INBOUND_USER_LIMIT", "bytes"), ("HISTORY_SENDER_LIMIT", "bytes"), ("HANDSHAKE_LIMIT", "handshakes"),
        ("RESUME_LIMIT", "resumes"),
    ):  # fmt: skip
        rate = getattr(options, name)
        if rate is not None and not (
            isinstance(rate, tuple) and len(rate) == 2 and all(isinstance(n, (int, float)) and n > 0 for n in rate)
        ):
            errors.append(checks.Error(
                f"{name} must be None or ({unit}, seconds) with two positive numbers, not {rate!r}.",
                id="channel_registry.E004",
            ))
    limit = options.MAX_CONNECTIONS_PER_USER
    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0):
        errors.append(checks.Error(
            f"MAX_CONNECTIONS_PER_USER must be None or a positive integer, not {limit!r}.",
            hint="None lets one account hold any number of sockets; the default is 50.",
            id="channel_registry.E007",
        ))
    if options.ON_LIMIT not in ("close_newest", "close_oldest"):
        errors.append(checks.Error(
            f"ON_LIMIT must be 'close_newest' or 'close_oldest', not {options.ON_LIMIT!r}.",
            id="channel_registry.E005",
        ))
    if options.CLOSE_ON_LOGOUT not in ("session", "user", None):
        errors.append(checks.Error(
            f"CLOSE_ON_LOGOUT must be 'session', 'user' or None, not {options.CLOSE_ON_LOGOUT!r}.",
            id="channel_registry.E013",
        ))
    if options.HISTORY and not 1 <= options.RECOVERY_LIMIT <= options.HISTORY_SIZE:
        errors.append(checks.Error(
            f"RECOVERY_LIMIT ({options.RECOVERY_LIMIT}) must be between 1 and HISTORY_SIZE "
            f"({options.HISTORY_SIZE}): a reconnect can only replay events the history keeps.",
            id="channel_registry.E014",
        ))
    replay = options.RECOVERY_MAX_BYTES
    if options.HISTORY and not options.HISTORY_EVENT_MAX_BYTES <= replay <= options.HISTORY_MAX_BYTES:
        errors.append(checks.Error(
            f"RECOVERY_MAX_BYTES ({options.RECOVERY_MAX_BYTES}) must be between HISTORY_EVENT_MAX_BYTES "
            f"({options.HISTORY_EVENT_MAX_BYTES}) and HISTORY_MAX_BYTES ({options.HISTORY_MAX_BYTES}): "
            "a resume must be able to replay one kept event, and can replay no more than is kept.",
            id="channel_registry.E040",
        ))
    share = options.HISTORY_SENDER_SHARE
    if share is not None and not (isinstance(share, (int, float)) and 0 < share <= 1):
        errors.append(checks.Error(
            f"HISTORY_SENDER_SHARE must be None or a fraction in (0, 1], not {share!r}.",
            id="channel_registry.E041",
        ))
    if options.CAN_MESSAGE is not None:
        try:
            import_string(options.CAN_MESSAGE)
        except ImportError as error:
            errors.append(checks.Error(f"CAN_MESSAGE cannot be imported: {error}", id="channel_registry.E006"))
    return errors


def _host_option(host: Any, name: str) -> Any:
    """A redis-py option of one channels_redis host, or ``...`` when unset.

    As in redis-py's ``from_url``, the URL's query string wins over the host dict's keys.
    """
    url = host.get("address", "") if isinstance(host, dict) else host if isinstance(host, str) else ""
    query = parse_qs(urlparse(url).query)
    if name in query:
        return query[name][0]
    return host.get(name, ...) if isinstance(host, dict) else ...


def _on_tcp(host: Any) -> bool:
    """redis-py turns maintenance notifications on only for TCP pools (not a Unix socket or Sentinel)."""
    if isinstance(host, dict):
        if "path" in host or "sentinels" in host:
            return False
        host = host.get("address", "")
    return not (isinstance(host, str) and host.startswith("unix://"))


def _redis_py_version() -> tuple[int, int]:
    import redis

    major, minor = redis.__version__.split(".")[:2]
    return int(major), int(minor)


@checks.register()
def check_channel_layer(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    alias = registry_settings().CHANNEL_LAYER
    layer = getattr(settings, "CHANNEL_LAYERS", {}).get(alias)
    if layer is None:
        return [checks.Error(
            f"CHANNEL_LAYERS has no {alias!r} layer; channel_registry cannot deliver anything.",
            hint="Add CHANNEL_LAYERS = {'default': channel_registry.layers.redis_layer(REDIS_URL)} "
            "(or the in-memory layer for a single process).",
            id="channel_registry.E010",
        )]
    messages = _check_history_support(layer.get("BACKEND", ""))
    if layer.get("BACKEND") not in REDIS_LAYERS:
        return messages
    hosts = layer.get("CONFIG", {}).get("hosts") or ["redis://localhost:6379"]
    for host in hosts:
        messages += _check_redis_host(host)
    if len(hosts) > 1 and layer["BACKEND"] == STOCK_LAYER:  # the batched layer's send picks the right shard
        messages.append(checks.Info(
            "Sharded RedisChannelLayer: channel_registry delivers to the right shard, but your own "
            "channel_layer.send() to a specific channel loses about half the messages "
            "(channels_redis#221). Use send_to_user() or group_send() instead.",
            id="channel_registry.I012",
        ))
    return messages


def _check_redis_host(host: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    timeout = _host_option(host, "socket_timeout")
    too_short = timeout not in (None, ...) and float(timeout) <= BLOCKING_READ
    if too_short or (timeout is ... and _redis_py_version() >= (8, 0)):
        messages.append(checks.Error(
            f"Redis host {host!r} keeps redis-py's 5 s socket_timeout: idle consumers are "
            "disconnected with 1011 after ~5.8 s (redis/redis-py#4091).",
            hint="Use channel_registry.layers.redis_layer(url), or give the host as "
            "{'address': url, 'socket_timeout': 15}.",
            id="channel_registry.E011",
        ))
    if str(_host_option(host, "protocol")) != "2" and _on_tcp(host) and _redis_py_version() >= (8, 1):
        messages.append(checks.Warning(
            f"Redis host {host!r} speaks RESP3 (redis-py 8's default), and on redis-py 8.1 or later "
            "every connection pooled before a Redis restart fails its next command with 'Connection "
            "closed by server': sends and direct messages fail once per pooled connection (redis/redis-py#4252).",
            hint="Use channel_registry.layers.redis_layer(url), or add 'protocol': 2 to the host.",
            id="channel_registry.W016",
        ))
    if isinstance(host, dict) and ("sentinels" in host or "master_name" in host):
        messages += _check_sentinel_host(host)
    return messages


def _check_sentinel_host(host: dict[str, Any]) -> list[checks.CheckMessage]:
    if not host.get("sentinels") or not host.get("master_name"):
        return [checks.Error(
            f"Sentinel host {host!r} needs both 'sentinels' (a list of (host, port)) and 'master_name': "
            "channels_redis connects to neither without them.",
            hint="Use channel_registry.layers.redis_layer({'sentinels': [...], 'master_name': ...}).",
            id="channel_registry.E060",
        )]
    sentinel_options = host.get("sentinel_kwargs") or {}
    if any(sentinel_options.get(name) is None for name in ("socket_timeout", "socket_connect_timeout")):
        return [checks.Error(
            f"Sentinel host {host!r} gives its sentinels no socket_timeout or socket_connect_timeout "
            "(channels_redis passes them nothing else): a sentinel that stops answering hangs every "
            "look-up of the master, and so every send after a failover.",
            hint="Use channel_registry.layers.redis_layer(host), or add "
            "'sentinel_kwargs': {'socket_timeout': 3, 'socket_connect_timeout': 3}.",
            id="channel_registry.E061",
        )]
    return []


def _check_history_support(backend: str) -> list[checks.CheckMessage]:
    if not registry_settings().HISTORY:
        return []
    from .history import history_layer_types

    try:
        if issubclass(import_string(backend), history_layer_types()):
            return []
    except ImportError:
        pass
    return [checks.Warning(
        f"HISTORY is on but {backend!r} keeps no history: clients that reconnect cannot recover "
        "the events they missed, and events carry no position.",
        hint="Use channel_registry.layers.redis_layer() or the in-memory layer, or set HISTORY=False.",
        id="channel_registry.W015",
    )]


@checks.register()
def check_persistent_connections(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    database = settings.DATABASES.get("default", {})
    pooled = bool(database.get("OPTIONS", {}).get("pool"))
    if database.get("CONN_MAX_AGE", 0) == 0 and not pooled:
        return [checks.Warning(
            "DATABASES['default'] has CONN_MAX_AGE=0: Channels closes the connection before every "
            "consumer handler, so each registry lookup opens a new database connection (~3 ms).",
            hint="Set CONN_MAX_AGE=None (with CONN_HEALTH_CHECKS=True) or use Django's psycopg pool "
            "(OPTIONS={'pool': True}, Django ≥ 5.1).",
            id="channel_registry.W020",
        )]
    return []


@checks.register()
def check_session_engine(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .sessions import session_check

    if registry_settings().CLOSE_ON_LOGOUT is None or session_check() is not None:
        return []
    return [checks.Warning(
        f"SESSION_ENGINE {settings.SESSION_ENGINE!r} cannot be asked which sessions still exist: "
        "an open connection is not closed when its session is deleted or expires other than "
        "through logout() (users deleted, deactivated or with a new password still are).",
        hint="Use the db, cached_db, cache or signed_cookies engine.",
        id="channel_registry.W030",
    )]
