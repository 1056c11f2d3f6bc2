"""Safe ``CHANNEL_LAYERS`` entries for channels_redis.

redis-py 8 gives every connection a 5 s ``socket_timeout``, exactly as long as
channels_redis's blocking read, so an idle consumer's ``receive()`` times out
and daphne closes every quiet WebSocket with 1011 after ~5.8 s
(redis/redis-py#4091). Its async pool also refuses the 101st concurrent command
(``MaxConnectionsError``) instead of waiting: a burst of connects, each running
``group_add`` in its handshake, fails with HTTP 500. And redis-py 8.1 speaks
RESP3 by default with "maintenance notifications" on ``auto``, which makes its
pool skip the check for connections the server closed: after a Redis restart,
every connection pooled before it fails its next command with "Connection
closed by server" (redis/redis-py#4252). These helpers set the timeouts, a
larger pool and RESP2 explicitly.

Both take channels_redis's Sentinel host format too,
``{"sentinels": [(host, port), ...], "master_name": name}``: the same options
go to the master's connections, and ``sentinel_kwargs`` gets timeouts as well,
since channels_redis hands the sentinels none (a sentinel that stops answering
would otherwise hang every look-up of the master). What a failover costs and
what the history promises across one: docs/operations.md, "Redis Sentinel".

``redis_layer()`` selects :class:`~channel_registry.redis.layer.BatchedRedisChannelLayer`
(channels_redis with a batched receive path, see ``redis/layer.py``) with its
``capacity`` of 5,000 messages per server process; ``backend=STOCK_LAYER`` keeps
channels_redis's own class (and its capacity of 100).
"""

from __future__ import annotations

from typing import Any

#: Above channels_redis's 5 s blocking read, yet bounded: a dead server is noticed.
SOCKET_TIMEOUT = 15
#: A down Redis is reported within this many seconds instead of hanging a send.
CONNECT_TIMEOUT = 3
#: Connections per process and event loop; Redis accepts 10,000 clients by default.
MAX_CONNECTIONS = 500
#: RESP2, as channels_redis and redis-py before 8 always used: its pool replaces a
#: connection the server closed before sending on it (RESP3's does not, see above).
PROTOCOL = 2

#: The library's layer: channels_redis with a receive that takes a batch per round trip.
BATCHED_LAYER = "channel_registry.redis.layer.BatchedRedisChannelLayer"
#: channels_redis's own class.
STOCK_LAYER = "channels_redis.core.RedisChannelLayer"


#: What a connection to a sentinel gets: it only answers look-ups, so a short read is enough.
SENTINEL_OPTIONS = {"socket_timeout": CONNECT_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT, "protocol": PROTOCOL}


def redis_host(host: str | dict[str, Any], **options: Any) -> dict[str, Any]:
    """One channels_redis host entry with timeouts that survive idle sockets and a Redis restart.

    ``host`` is a Redis URL or a Sentinel host (``sentinels`` and ``master_name``);
    its own keys and ``options`` win over the library's.
    """
    protections = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "max_connections": MAX_CONNECTIONS,
        "protocol": PROTOCOL,
    }
    if isinstance(host, str):
        return {"address": host, **protections, **options}
    if not host.get("sentinels") or not host.get("master_name"):
        raise ValueError("a Sentinel host needs 'sentinels' (a list of (host, port)) and 'master_name'")
    sentinel_options = {**SENTINEL_OPTIONS, **host.get("sentinel_kwargs", {})}
    return {**protections, **host, "sentinel_kwargs": sentinel_options, **options}


def redis_layer(*hosts: str | dict[str, Any], backend: str = BATCHED_LAYER, **config: Any) -> dict[str, Any]:
    """A ``CHANNEL_LAYERS`` entry for ``backend`` over one or more Redis hosts; ``config`` is its CONFIG.

    Each host is a Redis URL or a Sentinel host (see ``redis_host``). Several
    shard the layer; channel_registry's delivery (and the batched layer's own
    ``send``) picks the shard the receiving process reads, so direct sends are
    not lost (channels_redis#221).
    """
    if not hosts:
        raise ValueError("redis_layer() needs at least one Redis URL or Sentinel host")
    return {
        "BACKEND": backend,
        "CONFIG": {"hosts": [redis_host(host) for host in hosts], **config},
    }
