"""Redis Sentinel failover under traffic: a master, a replica, three sentinels, two daphne processes.

The master is killed with ``kill -9`` while one user sends direct messages to
another's two tabs (one on each daphne), either with a replica that had every
write or with one that missed the master's last ones (``CLIENT PAUSE`` on the
replica holds back the replication stream; the master dies before it resumes,
so what it held is never applied). Whatever happened, each receiving tab must
see either every acknowledged message or a ``reset``: never a gap within an
epoch, never a number twice. The figures each run measures are printed (``-s``)
and quoted in the docs (docs/operations.md, "Redis Sentinel").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import pytest
import redis

from channel_registry.layers import redis_layer

from . import test_faults
from .processes import Tab, await_until
from .redis_servers import RedisServer, SentinelServer
from .test_faults import HEARTBEAT, STALE_AFTER, direct

# The fault tests' fixtures and marks: a throw-away database for the module, a stack per test.
demo_database = test_faults.demo_database
stack = test_faults.stack
collect_garbage_after_the_loop_closed = test_faults.collect_garbage_after_the_loop_closed
pytestmark = test_faults.pytestmark

MASTER_NAME = "main"
#: A direct message every this many seconds, from one tab.
SEND_EVERY = 0.05


class SentinelSet:
    """A master, its replica and three sentinels watching them, on free loopback ports."""

    def __init__(self) -> None:
        self.master, self.replica = RedisServer(), RedisServer()
        self.sentinels = [SentinelServer(self.master.port, MASTER_NAME) for _ in range(3)]

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=5, protocol=2)

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        self.client(self.replica).replicaof("127.0.0.1", self.master.port)
        for sentinel in self.sentinels:
            sentinel.start()

    def ready(self) -> bool:
        """Each sentinel knows the replica and the two other sentinels, and the replica is in sync."""
        if self.client(self.master).execute_command("WAIT", 1, 100) < 1:  # a replica is attached
            return False
        for sentinel in self.sentinels:
            state = self.client(sentinel).execute_command("SENTINEL", "MASTER", MASTER_NAME)
            fields = dict(zip(state[::2], state[1::2], strict=True))
            if fields[b"num-slaves"] != b"1" or fields[b"num-other-sentinels"] != b"2":
                return False
        return True

    def master_port(self) -> int | None:
        """The master's port as a majority of the sentinels name it, once they agree."""
        ports = []
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                ports.append(int(self.client(sentinel).sentinel_get_master_addr_by_name(MASTER_NAME)[1]))
        port = max(set(ports), key=ports.count, default=None)
        return port if ports.count(port) >= 2 else None

    @property
    def host(self) -> dict:
        return {"sentinels": [("127.0.0.1", s.port) for s in self.sentinels], "master_name": MASTER_NAME}

    def stop(self) -> None:
        for server in [*self.sentinels, self.master, self.replica]:
            server.__exit__(None, None, None)


@pytest.fixture
def sentinel_set():
    servers = SentinelSet()
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@dataclass
class Receiver:
    """What one receiving tab was shown: the ids of the messages, in order, and the resets."""

    ids: list[str] = field(default_factory=list)
    resets: list[dict] = field(default_factory=list)


def read_receiver(tab: Tab) -> Receiver:
    """Walk a tab's frames as the JS client does; fails on a gap or a number seen twice within an epoch."""
    seen = Receiver()
    first = next(f for f in tab.frames if f["type"] == "position")
    epoch, seq = first["epoch"], first["seq"]
    for frame in tab.frames:
        if frame["type"] == "reset":
            seen.resets.append(frame)
            epoch, seq = frame["epoch"], frame["seq"]
        elif frame["type"] == "direct":
            assert (frame["epoch"], frame["seq"]) == (epoch, seq + 1), f"{tab.label}: {frame} after {epoch}:{seq}"
            seq += 1
            seen.ids.append(frame["id"])
    return seen


@pytest.mark.long
@pytest.mark.parametrize("replica_missed_writes", [False, True], ids=["replica-in-sync", "replica-missed-writes"])
async def test_kill_9_the_master_under_traffic_loses_no_acknowledged_message_silently(
    stack, sentinel_set, replica_missed_writes
):
    await await_until(sentinel_set.ready, within=20, message="the sentinels did not find each other and the replica")
    stack.options = {
        "heartbeat": HEARTBEAT, "stale_after": STALE_AFTER, "rate_limit": "10000,10", "fanout_limit": "none",
        "redis_sentinels": ",".join(f"127.0.0.1:{s.port}" for s in sentinel_set.sentinels),
        "redis_master": MASTER_NAME,
    }  # fmt: skip
    stack.settings.CHANNEL_LAYERS = {"default": redis_layer(sentinel_set.host, prefix=stack.prefix)}
    first, second = stack.daphnes(2)
    alice, bob = await stack.users("alice", "bob")
    sender = await stack.open_tab(first, alice)
    receivers = [await stack.open_tab(first, bob), await stack.open_tab(second, bob)]
    for tab in receivers:
        await tab.wait_for(lambda f: f["type"] == "position", 10)

    sent_at: dict[str, float] = {}
    sending = True

    async def send_directs() -> None:
        while sending:
            frame_id = f"m{len(sent_at)}"
            sent_at[frame_id] = time.monotonic()
            await sender.send(direct(bob, "hello", frame_id))
            await asyncio.sleep(SEND_EVERY)

    traffic = asyncio.ensure_future(send_directs())
    await asyncio.sleep(1)  # a second of traffic before the failover
    if replica_missed_writes:
        sentinel_set.client(sentinel_set.replica).client_pause(1000)  # its master link is held back too
        await asyncio.sleep(0.4)  # writes the replica misses
    old_master = sentinel_set.master.port
    killed_at = time.monotonic()
    sentinel_set.master.stop(kill=True)
    await await_until(lambda: sentinel_set.master_port() not in (None, old_master), within=30, interval=0.1)
    promoted_at = time.monotonic()
    # Delivery is back within 10 s of the promotion: an ack for a message sent after it.
    await sender.wait_for(
        lambda f: f["type"] == "ack" and sent_at[f["id"]] > promoted_at and f["delivered"] == 2, within=10
    )
    back_at = time.monotonic()
    await asyncio.sleep(1)  # and a second after it
    sending = False
    await traffic

    def replies() -> dict[str, dict]:
        return {f["id"]: f for f in sender.frames if f["type"] in ("ack", "error") and f.get("id") in sent_at}

    await await_until(lambda: len(replies()) == len(sent_at), within=15, message="a message was never answered")
    replies = replies()
    acked = [i for i, reply in replies.items() if reply["type"] == "ack"]
    refused = [i for i, reply in replies.items() if reply["type"] == "error"]
    assert {replies[i]["code"] for i in refused} <= {"unavailable"}, [replies[i] for i in refused]
    last_id = acked[-1]
    for tab in receivers:
        await tab.wait_for(lambda f: f.get("id") == last_id, 10)
    assert all(tab.is_open for tab in [sender, *receivers])
    # A new tab's handshake spends from its budget and reads the history, both on the new master.
    late = await stack.open_tab(second, bob)
    await late.wait_for(lambda f: f["type"] == "position", 10)

    outcomes = []
    for tab in receivers:
        seen = read_receiver(tab)
        missing = [i for i in acked if i not in seen.ids]
        assert not missing or seen.resets, f"{tab.label}: acknowledged, never shown and no reset: {missing}"
        assert len(seen.ids) == len(set(seen.ids)), f"{tab.label} was shown a message twice"
        outcomes.append(f"tab {tab.label[-1]}: {len(missing)} missing, resets {[r['reason'] for r in seen.resets]}")
    unavailable = [sent_at[i] for i in refused]
    print(
        f"\n[{'missed' if replica_missed_writes else 'in sync'}] promoted {promoted_at - killed_at:.1f} s after "
        f"the kill, first delivery {back_at - promoted_at:.1f} s after that; {len(sent_at)} sent, "
        f"{len(acked)} acked, {len(refused)} refused unavailable"
        + (f" over {max(unavailable) - min(unavailable):.1f} s" if unavailable else "")
        + f"; {'; '.join(outcomes)}"
    )
