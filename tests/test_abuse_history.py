"""Abuse suite, the per-user history (issue 17, findings 2 and 3), with the shipped defaults.

Real daphne serving ``demo_site``, a private Redis, the shared PostgreSQL and
``websockets`` clients, as in ``tests/test_abuse.py``. The test process fills
histories through the public API on the same Redis and database.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter

import pytest
import redis
import redis.asyncio as aioredis

from channel_registry import asend_to_user
from channel_registry.conf import registry_settings

from . import test_faults
from .processes import ClientProcess, Tab
from .test_abuse import converse, direct, p99, pytestmark  # noqa: F401 (pytestmark: the abuse marks)

demo_database = test_faults.demo_database
stack = test_faults.stack

NOTIFY = "registry.notify"
BIG = "x" * 15_000


async def first_frame(tab: Tab, within: float = 10) -> dict:
    return await tab.wait_for(lambda f: f.get("type") in ("position", "recovered", "reset"), within)


class PingProbe:
    """Redis ``PING`` round trips every 10 ms, in latencies of ms: a thread of its own with a plain
    client, so this process's busy event loop (the attack's clients) does not count as Redis's."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.latencies: list[float] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopped.wait(0.01):
            started = time.perf_counter()
            self.client.ping()
            self.latencies.append((time.perf_counter() - started) * 1000)

    def __enter__(self) -> PingProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()
        self.client.close()


class ResumeStorm(ClientProcess):
    """``tests/resume_client.py``: one socket looping resumes per position; ``outcomes`` by kind
    ("recovered", "expired", "4430", ...) and "replayed": each replay's count."""

    def __init__(self, server, user, positions: list[str]) -> None:
        super().__init__("resume_client", server.port, user.session, *positions)

    @property
    def outcomes(self) -> dict:
        return self.result


@pytest.mark.timing
async def test_a_resume_storm_is_bounded_and_bystanders_keep_their_latency(stack):
    """Finding 2: 10 sockets of one account resumed a full history from its oldest position in a
    loop (399 resumes in 8 s, each an unbounded XRANGE of up to 11 MB): daphne's RSS went from 87 to
    531 MiB and bystanders' p99 from 32 to 1,203 ms.

    With the defaults: the history keeps at most HISTORY_MAX_BYTES (1 MiB), a resume replays at most
    RECOVERY_MAX_BYTES (256 KiB, one Redis reply) and the account's resumes draw from RESUME_LIMIT
    (100 a minute over all processes; refused with 4430). Half the loopers resume from the oldest
    position (an ``expired`` reset: nothing read), half from the oldest one that still replays
    (as many 15 KB events as RECOVERY_MAX_BYTES allows: the most the server sends for one resume).
    """
    [redis_server] = stack.start_redis()
    [server] = stack.daphnes(1)
    mallory, *bystanders = await stack.users("mallory", *(f"bystander{n}" for n in range(8)))
    first = await stack.open_tab(server, mallory)
    epoch = (await first_frame(first))["epoch"]
    await first.close()
    for n in range(300):
        await asend_to_user(mallory, {"type": NOTIFY, "data": f"{n} {BIG}"})
    most = registry_settings().RECOVERY_MAX_BYTES // (len(BIG) + 100)  # events of a replay at its largest
    worst = f"{epoch}:{300 - most}"
    people = [(await stack.open_tab(server, user), user) for user in bystanders]
    pairs = list(zip(people[::2], people[1::2], strict=True))

    with PingProbe(redis_server.url) as probe:
        quiet, quiet_acks = await converse(pairs, 6, "q")
    quiet_pings = probe.latencies

    rss_before, rss_peak = server.rss_kb(), 0
    storm_over = asyncio.Event()

    async def watch_rss() -> None:
        nonlocal rss_peak
        while not storm_over.is_set():
            rss_peak = max(rss_peak, server.rss_kb())
            await asyncio.sleep(0.1)

    started = time.monotonic()
    positions = [f"{epoch}:0" if n % 2 else worst for n in range(10)]
    with PingProbe(redis_server.url) as probe:
        watching = asyncio.ensure_future(watch_rss())
        async with ResumeStorm(server, mallory, positions) as storm:
            await asyncio.sleep(0.5)  # the storm builds up before the bystanders measure
            loud, loud_acks = await converse(pairs, 6, "l")
            await asyncio.sleep(max(0.0, 5 - (time.monotonic() - started)))  # the storm lasts 5 s
        storm_over.set()
        await watching
    storm_seconds = time.monotonic() - started
    replayed = storm.outcomes.pop("replayed")
    outcomes = Counter(storm.outcomes)

    grown_mib = (rss_peak - rss_before) / 1024
    resumes = outcomes["recovered"] + outcomes["expired"]
    print(f"\n  resume storm {storm_seconds:.1f} s: {dict(outcomes)}; daphne RSS +{grown_mib:.1f} MiB; "
          f"Redis PING p99 quiet {p99(quiet_pings):.2f} ms, storm {p99(probe.latencies):.2f} ms; bystander "
          f"p50/p99 ms quiet {statistics.median(quiet):.1f}/{p99(quiet):.1f}, "
          f"storm {statistics.median(loud):.1f}/{p99(loud):.1f}")  # fmt: skip
    burst, per = registry_settings().RESUME_LIMIT
    assert resumes <= burst + burst * storm_seconds / per + 1
    assert outcomes["4430"] > 0, "the loop went past the resume budget"
    assert replayed and set(replayed) == {most}, "a replay never goes past RECOVERY_MAX_BYTES"
    assert grown_mib <= 64
    assert p99(probe.latencies) <= 20
    assert [a.get("delivered") for a in quiet_acks + loud_acks] == [1] * (len(quiet_acks) + len(loud_acks))
    assert p99(loud) <= max(250, 3 * p99(quiet)), (sorted(quiet), sorted(loud))


@pytest.mark.timing
async def test_one_account_spraying_recipients_keeps_a_bounded_share_of_each_history(stack):
    """Finding 3: every accepted direct went into the recipient's history, offline or not, with only
    the number of events capped: one account kept ~44 MB of Redis live and pushed victims' real
    events out of their window.

    With the defaults: a sender's directs hold at most HISTORY_SENDER_SHARE (a quarter) of one
    recipient's history, so the victim's events from everyone else stay recoverable; a message past
    the share is refused with ``rate_limited``, and what the account keeps in Redis is what it was
    allowed to send, stored at about the frame's size (JSON, not msgpack's 2.25x for floats).
    Bystanders chatting meanwhile get every message, their p99 within max(250 ms, 3x quiet).
    """
    [redis_server] = stack.start_redis()
    [server] = stack.daphnes(1)
    victim, alice, mallory, *others = await stack.users("victim", "alice", "mallory", "o1", "o2", "o3", "o4")
    bystanders = await stack.users(*(f"bystander{n}" for n in range(4)))
    people = [(await stack.open_tab(server, user), user) for user in bystanders]
    pairs = list(zip(people[::2], people[1::2], strict=True))
    quiet, acks = await converse(pairs, 6, "q.", gap=0.2)
    tab = await stack.open_tab(server, victim)
    epoch = (await first_frame(tab))["epoch"]
    await tab.close()  # offline: the history is what keeps the victim's messages now
    sender = await stack.open_tab(server, alice)
    for n in range(5):
        assert (await sender.request(direct(victim, f"from alice {n}", f"a{n}")))["type"] == "ack"

    redis = aioredis.from_url(redis_server.url)
    memory_before = (await redis.info("memory"))["used_memory"]
    # Five sockets, each with its own INBOUND_LIMIT: the user's budgets (their INBOUND_USER_LIMIT in this
    # process among them) are what paces the spray.
    sprays = [await stack.open_tab(server, mallory) for _ in range(5)]
    floats = [0.0] * 3_000  # 15 KB in the frame, 12 KB as compact JSON, 27 KB in msgpack
    stored = len(json.dumps(floats, separators=(",", ":")))
    answers: Counter = Counter()

    async def spray_all() -> None:
        for n in range(40):  # the victim first, then the others in turn, as fast as the budgets allow
            to = victim if n < 30 else others[n % len(others)]
            frame = direct(to, floats, f"m{n}")
            spray = sprays[n % len(sprays)]
            answer = await spray.request(frame, within=30)
            while answer["type"] == "error" and "retry_after" in answer:
                await asyncio.sleep(answer["retry_after"])
                answer = await spray.request(frame, within=30)
            answers["share" if answer["type"] == "error" else answer["type"]] += 1
            assert answer["type"] == "ack" or "waiting for this user" in answer["detail"], answer

    (loud, more_acks), _ = await asyncio.gather(converse(pairs, 12, "l.", gap=0.3), spray_all())
    assert [ack.get("delivered") for ack in acks + more_acks] == [1] * 36
    assert p99(loud) <= max(250, 3 * p99(quiet)), (sorted(quiet), sorted(loud))
    grown = (await redis.info("memory"))["used_memory"] - memory_before
    await redis.aclose()

    share = registry_settings().HISTORY_SENDER_SHARE * registry_settings().HISTORY_MAX_BYTES
    print(f"\n  spray: {dict(answers)}, {answers['ack'] * stored / 1024:.0f} KiB of messages kept, "
          f"Redis used_memory +{grown / 1024:.0f} KiB")  # fmt: skip
    assert answers == {"ack": 10 + share // stored, "share": 30 - share // stored}
    assert grown <= 1.25 * answers["ack"] * stored + 100_000, "stored at about the JSON's size, not 2.25x"
    assert (await sender.request(direct(victim, "still welcome", "a5")))["type"] == "ack"

    back = await stack.open_tab(server, victim, path=f"/ws/registry/?since={epoch}:0")
    recovered = await back.wait_for(lambda f: f.get("type") in ("recovered", "reset"), 10)
    assert recovered["type"] == "recovered", recovered
    replayed = [f for f in back.frames if f.get("type") == "direct"]
    assert [f["message"] for f in replayed if f["from"] == alice.pk] == [
        *(f"from alice {n}" for n in range(5)), "still welcome",
    ]  # fmt: skip
    assert len([f for f in replayed if f["from"] == mallory.pk]) == share // stored

async def test_redis_at_maxmemory_answers_unavailable_and_crashes_no_consumer(stack):
    """Finding 3: at ``maxmemory`` Redis's ``OOM command not allowed`` crashed consumers."""
    [redis_server] = stack.start_redis()
    [server] = stack.daphnes(1)
    alice, bob = await stack.users("alice", "bob")
    tab = await stack.open_tab(server, alice)
    epoch = (await first_frame(tab))["epoch"]
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("maxmemory", 1)  # below what is used: every write is refused
    try:
        answer = await tab.request(direct(bob, "hi", "d"))
        assert (answer["type"], answer["code"]) == ("error", "unavailable")
        assert await (await stack.tab(server, alice, path=f"/ws/registry/?since={epoch}:0")).closed_with(10) == 4503
        assert tab.is_open
    finally:
        client.config_set("maxmemory", 0)
        client.close()
    assert (await tab.request(direct(bob, "again", "e")))["type"] == "ack"
    assert "Exception inside application" not in server.log_tail(1_000_000)
