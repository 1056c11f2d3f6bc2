"""No event lost in the reconnect gap: resume by position through real daphne processes.

Real daphne processes (``tests.fault_settings``), a private Redis per test, the
shared PostgreSQL, and ``websockets`` clients that close and reopen their
socket with the position of the last event they got (``?since=``). The test
process sends through the public API on the same Redis and database.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest
from websockets.exceptions import WebSocketException

from channel_registry import ChannelLayerUnavailable, asend_to_user
from channel_registry.protocol import PROTOCOL_VERSION

from . import test_faults
from .processes import HandshakeRefused, Tab, await_until
from .test_faults import NOTIFY, direct, pytestmark  # noqa: F401 (pytestmark: the fault tests' marks)

# The fault tests' fixtures: daphne processes, private Redis servers, a throw-away database.
demo_database = test_faults.demo_database
stack = test_faults.stack
collect_garbage_after_the_loop_closed = test_faults.collect_garbage_after_the_loop_closed


def since_path(position: str | None) -> str:
    return f"/ws/registry/?since={position}" if position else "/ws/registry/"


def position_of(frame: dict) -> str:
    return f"{frame['epoch']}:{frame['seq']}"


async def first_frame(tab: Tab) -> dict:
    return await tab.wait_for(lambda f: f.get("type") in ("position", "recovered", "reset"), 10)


def seqs(tab: Tab) -> list[int]:
    """The seq of every recoverable frame the tab received, in arrival order."""
    return [f["seq"] for f in tab.frames if f.get("type") in ("notification", "direct")]


async def test_a_socket_closed_for_3_s_gets_the_100_events_it_missed_once_in_order(stack):
    stack.start_redis()
    stack.configure(rate_limit="none")
    first, second = stack.daphnes(2)
    alice, bob = await stack.users("alice", "bob")
    tab = await stack.open_tab(first, bob)
    assert (await first_frame(tab))["seq"] == 0
    sender = await stack.open_tab(first, alice)
    await first_frame(sender)
    await asend_to_user(bob, {"type": NOTIFY, "data": "before"})
    since = position_of(await tab.wait_for(lambda f: f.get("data") == "before"))
    await tab.close()

    async def bob_gone() -> bool:
        return not await stack.rows(user_id=bob.pk)

    await await_until(bob_gone, 5)

    # 100 events over 3 s while bob has no socket: half notifications, half direct messages.
    for n in range(100):
        if n % 2:
            assert (await sender.request(direct(bob, f"missed {n}", f"m{n}")))["delivered"] == 0
        else:
            assert (await asend_to_user(bob, {"type": NOTIFY, "data": f"missed {n}"})).sent == 0
        await asyncio.sleep(0.03)

    # Back on the other process, while live events keep coming: the boundary is crossed under load.
    async def live() -> None:
        for n in range(20):
            await asend_to_user(bob, {"type": NOTIFY, "data": f"live {n}"})
            await asyncio.sleep(0.005)

    sending = asyncio.ensure_future(live())
    back = await stack.open_tab(second, bob, path=since_path(since))
    recovered = await back.wait_for(lambda f: f.get("type") == "recovered", 10)
    await sending
    await back.wait_for(lambda f: f.get("data") == "live 19", 10)
    await asyncio.sleep(0.3)  # a duplicate would have arrived by now

    assert seqs(back) == list(range(2, 122)), "every event once, in order, none before the position"
    assert 100 <= recovered["count"] <= 120
    replayed = [f.get("data") or f.get("message") for f in back.frames[: recovered["count"]]]
    assert replayed[:100] == [f"missed {n}" for n in range(100)]
    assert back.frames[recovered["count"]]["type"] == "recovered"


async def test_positions_that_cannot_be_honoured_get_an_explicit_reset(stack):
    [redis] = stack.start_redis()
    stack.configure(rate_limit="none", history_size=5)
    [daphne] = stack.daphnes(1)
    [bob] = await stack.users("bob")
    tab = await stack.open_tab(daphne, bob)
    epoch = (await first_frame(tab))["epoch"]
    await tab.close()
    for n in range(8):
        await asend_to_user(bob, {"type": NOTIFY, "data": n})

    async def reset_for(since: str) -> dict:
        for _ in range(10):
            tab = await stack.tab(daphne, bob, path=since_path(since))
            try:
                frame = await first_frame(tab)
                break
            except ConnectionError:  # 4503 right after a Redis restart: the demo's group_add on a dead connection
                assert tab.close_code == 4503
                await asyncio.sleep(0.2)
        await tab.close()
        return frame

    head = {"epoch": epoch, "seq": 8, "protocol": PROTOCOL_VERSION}
    assert await reset_for(f"{epoch}:1") == {"type": "reset", "reason": "expired", **head}
    assert await reset_for("0123456789ab:3") == {"type": "reset", "reason": "epoch", **head}
    assert (await reset_for(f"{epoch}:99"))["reason"] == "invalid"
    assert (await reset_for(f"{epoch}:6")) == {"type": "recovered", "count": 2, **head}

    # A Redis restart loses the history: a returning client and an open socket both hear it.
    open_tab = await stack.open_tab(daphne, bob, path=since_path(f"{epoch}:8"))
    await first_frame(open_tab)
    redis.stop()
    redis.start()

    async def sent_after_restart() -> bool:
        try:  # this process's pooled connections died with the server: the first use may fail
            return bool(await asend_to_user(bob, {"type": NOTIFY, "data": "after restart"}))
        except ChannelLayerUnavailable:
            return False

    await await_until(sent_after_restart, 15, interval=0.2)
    reset = await open_tab.wait_for(lambda f: f.get("type") == "reset", 15)
    assert reset["reason"] == "epoch" and reset["epoch"] != epoch and reset["seq"] == 0
    after = await open_tab.wait_for(lambda f: f.get("data") == "after restart", 5)
    assert (after["epoch"], after["seq"]) == (reset["epoch"], 1)
    assert (await reset_for(f"{epoch}:8"))["reason"] == "epoch"


class Client:
    """One user's browser tab that drops its socket every 1 to 3 s and comes back with its position."""

    def __init__(self, stack, user, servers: list) -> None:
        self.stack, self.user, self.servers = stack, user, servers
        self.position: str | None = None
        self.seqs: list[int] = []
        self.resets = 0
        self.reconnects = 0

    @property
    def seq(self) -> int:
        return int(self.position.rpartition(":")[2]) if self.position else -1

    async def run(self, until) -> None:
        while not until(self):
            server = random.choice([s for s in self.servers if s.running])
            try:
                tab = await Tab.open(server.port, self.user.session, path=since_path(self.position))
            except (OSError, TimeoutError, HandshakeRefused, WebSocketException):  # e.g. killed mid-handshake
                await asyncio.sleep(0.1)
                continue
            self.reconnects += 1
            await self.read(tab, time.monotonic() + random.uniform(1, 3), until)
            await tab.close()

    async def read(self, tab: Tab, deadline: float, until) -> None:
        seen = 0
        while True:
            for frame in tab.frames[seen:]:
                self.take(frame)
            seen = len(tab.frames)
            if until(self) or not tab.is_open or time.monotonic() >= deadline:
                return
            await tab.more_than(seen, min(0.5, deadline - time.monotonic()))

    def take(self, frame: dict) -> None:
        if "seq" not in frame:
            return
        if frame["type"] == "reset":
            self.resets += 1
        elif frame["type"] not in ("position", "recovered"):
            self.seqs.append(frame["seq"])
        self.position = position_of(frame)


@pytest.mark.long
# 10,000 events through two daphne processes: about 20 s on a quiet machine, several times that next
# to the other suites of make test on 2 CPUs; the default 120 s is a hang guard, not a bound.
@pytest.mark.timeout(300)
async def test_random_drops_and_a_kill_9_lose_no_event_and_duplicate_none(stack, capsys):
    stack.start_redis()
    stack.configure(rate_limit="none")
    servers = stack.daphnes(2)
    users = await stack.users(*(f"u{i}" for i in range(50)))
    clients = [Client(stack, user, servers) for user in users]
    sent: Counter = Counter()
    finished = asyncio.Event()

    def done(client: Client) -> bool:
        return finished.is_set() and client.seq >= sent[client.user.pk]

    running = [asyncio.ensure_future(client.run(done)) for client in clients]
    await await_until(lambda: all(c.position for c in clients), 30, message="every client got a position")

    total = 10_000
    queue = list(range(total))

    async def sender() -> None:
        while queue:
            n = queue.pop()
            user = users[n % len(users)]
            await asend_to_user(user, {"type": NOTIFY, "data": n})
            sent[user.pk] += 1
            if n == total // 2:
                servers[1].kill()  # kill -9, midway

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(8)))  # concurrent senders: per user, live arrivals interleave
    sending_took = time.monotonic() - started
    finished.set()
    await asyncio.wait_for(asyncio.gather(*running), 60)

    received = sum(len(c.seqs) for c in clients)
    duplicates = sum(len(c.seqs) - len(set(c.seqs)) for c in clients)
    out_of_order = sum(sum(1 for a, b in zip(c.seqs, c.seqs[1:], strict=False) if b <= a) for c in clients)
    resets = sum(c.resets for c in clients)
    with capsys.disabled():
        print(
            f"\n  recovery under churn: sent {sum(sent.values())} in {sending_took:.1f} s, received {received}, "
            f"duplicates {duplicates}, out of order {out_of_order}, resets {resets}, "
            f"reconnects {sum(c.reconnects for c in clients)}"
        )
    assert sum(sent.values()) == total
    for client in clients:
        assert client.seqs == list(range(1, sent[client.user.pk] + 1)), client.user.username
    assert (duplicates, out_of_order, resets) == (0, 0, 0)
