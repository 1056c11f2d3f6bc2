"""Abuse suite: what one hostile user can do to the others, against real daphne, Redis and PostgreSQL.

Each test reproduces one finding of issue 12 (the number in its docstring) and
shows it refused or bounded. The processes, the database and the clients are
those of the fault tests (``tests/test_faults.py``): real daphne serving
``demo_site``, real sessions, the ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import threading
import time
from collections import Counter

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from channel_registry.conf import RegistrySettings
from channel_registry.inbound import FRAME_COST

from . import test_faults
from .processes import (
    ClientProcess,
    HandshakeRefused,
    await_until,
    close_all,
    csrf_token,
    http_request,
    real_services_only,
)

# The fault tests' fixtures: a throw-away database for the module, and a stack per test.
demo_database = test_faults.demo_database
stack = test_faults.stack

pytestmark = [
    pytest.mark.abuse,
    real_services_only,
]

TRUSTED = "https://app.example.com,https://*.trusted.example"

# (Origin header, whether the socket opens). PORT is the daphne process's port; the
# page is http://127.0.0.1:PORT. None sends no Origin header at all.
ORIGINS = [
    ("http://127.0.0.1:PORT", True),
    ("https://app.example.com", True),  # CSRF_TRUSTED_ORIGINS
    ("https://chat.trusted.example", True),  # its wildcard entry
    ("http://127.0.0.1:9999", False),  # another application on the same host
    ("http://127.0.0.1", False),  # the same host on port 80
    ("https://127.0.0.1:PORT", False),  # another scheme
    ("ws://127.0.0.1:PORT", False),
    ("http://localhost:PORT", False),  # an allowed host, but not this origin
    ("http://localhost:3000", False),
    ("null", False),  # sandboxed iframes, file:// pages
    (None, False),
    ("", False),
    ("http://evil.example", False),
    ("http://127.0.0.1.evil.example:PORT", False),  # look-alike host
    ("http://127.0.0.1:PORT@evil.example", False),  # userinfo tricks
    ("http://evil.example@127.0.0.1:PORT", False),
    ("http://127.0.0.1.:PORT", False),  # trailing dot
    ("HTTP://127.0.0.1:PORT", False),  # not as a browser writes it
    ("http://127.0.0.1:0PORT", False),
    ("http://127.0.0.1:PORT/", False),
    ("http://127.0.0.1:PORT/inbox", False),
    ("http://127.0.0.1:PORT, http://evil.example", False),
    ("http://app.example.com", False),  # a trusted origin on another scheme
    ("https://app.example.com:8443", False),  # ... or port
    ("https://app.example.com.evil.example", False),
    ("https://eviltrusted.example", False),  # a suffix, not a subdomain
    ("http://chat.trusted.example", False),
    ("http://[::1]:PORT", False),
]


async def test_only_the_exact_allowed_origins_open_a_socket(stack):
    """Finding 5: host-only origin checks let other ports and schemes of an allowed host in."""
    stack.start_redis()
    stack.configure(csrf_trusted_origins=TRUSTED)
    [server] = stack.daphnes(1)
    [alice] = await stack.users("alice")

    outcomes = {}
    for template, _ in ORIGINS:
        origin = None if template is None else template.replace("PORT", str(server.port))
        try:
            tab = await stack.tab(server, alice, origin=origin)
        except HandshakeRefused as refused:
            # 403 from the validator; 400 where daphne itself rejects a malformed header first.
            assert refused.status in (400, 403), (template, refused.status)
            outcomes[template] = "refused"
            continue
        await tab.send({"type": "ping"})
        await tab.wait_for(lambda f: f.get("type") == "pong")
        outcomes[template] = "open"
        await tab.close()

    assert outcomes == {template: "open" if opens else "refused" for template, opens in ORIGINS}
    assert await stack.rows() == []  # the refused ones never reached the registry


# --------------------------------------------------------------------------- helpers


def direct(to, message, frame_id) -> dict:
    return {"type": "direct", "to": getattr(to, "pk", to), "message": message, "id": frame_id}


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def open_tabs(stack, server, user, count: int) -> list:
    return await test_faults.bounded([stack.open_tab(server, user) for _ in range(count)], limit=10)


async def converse(pairs, rounds: int, label: str, gap: float = 0.05) -> tuple[list[float], list[dict]]:
    """Bystanders messaging each other, one message at a time per pair: (latencies in ms, acks).

    The latency is from sending the frame to the recipient's tab holding it; a message
    acknowledged as reaching no tab (a full queue says ``delivered: 0``) has none. Through
    groups (``delivered: null``) every acknowledged message is awaited at its recipient.
    """
    latencies, acks = [], []

    async def talk(pair_index, first, second) -> None:
        for i in range(rounds):
            (sender, _), (receiver, to) = (first, second) if i % 2 == 0 else (second, first)
            frame_id = f"{label}{pair_index}.{i}"
            started = time.perf_counter()
            await sender.send(direct(to, "hello", frame_id))
            ack = await sender.wait_for(lambda f, i=frame_id: f.get("id") == i and f["type"] in ("ack", "error"), 30)
            acks.append(ack)
            if ack["type"] == "ack" and ack.get("delivered") != 0:
                await receiver.wait_for(lambda f, i=frame_id: f.get("type") == "direct" and f.get("id") == i, 30)
                latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(gap)

    await asyncio.gather(*(talk(n, *pair) for n, pair in enumerate(pairs)))
    return latencies, acks


class Flood(ClientProcess):
    """``tests/flood_client.py``: ``sockets`` sockets sending back to back; ``answers`` by kind ("ack", …)."""

    def __init__(self, server, user, to, sockets: int, mode: str = "answered", niceness: int = 0) -> None:
        super().__init__("flood_client", server.port, user.session, to.pk, sockets, mode, niceness=niceness)

    @property
    def answers(self) -> Counter:
        return Counter(self.result)


# --------------------------------------------------------------------------- findings 1 to 4


async def test_one_account_cannot_hold_more_than_the_default_connection_limit(stack):
    """Finding 1: 2,000 sockets of one account were all accepted. The default limit is 50."""
    stack.start_redis()
    [server] = stack.daphnes(1)
    [mallory] = await stack.users("mallory")
    tabs = await test_faults.bounded([stack.tab(server, mallory) for _ in range(60)], limit=10)
    await await_until(lambda: sum(not tab.is_open for tab in tabs) >= 10, 10, message="fewer than 10 tabs closed")
    codes = Counter(tab.close_code if not tab.is_open else "open" for tab in tabs)
    assert codes == {"open": 50, 4429: 10}
    assert len(await stack.rows(user=mallory)) == 50


async def test_an_event_stream_over_the_limit_is_refused_at_once(stack):
    """Finding 4: the stream hung with no status line for 40 s; now 429 with an error body."""
    stack.start_redis()
    stack.configure(max_connections=2)
    [server] = stack.daphnes(1)
    [alice] = await stack.users("alice")
    await open_tabs(stack, server, alice, 2)
    started = time.monotonic()
    status, _, body = await asyncio.to_thread(
        http_request, server.port, "GET", "/events/", cookies={"sessionid": alice.session},
        headers={"Accept": "text/event-stream"}, timeout=10,
    )  # fmt: skip
    assert time.monotonic() - started < 2
    assert status == 429 and json.loads(body)["code"] == "too_many_connections"
    assert len(await stack.rows(user=alice)) == 2
    assert not [line for line in server.errors() if "ConnectionLimitExceeded" in line]


@pytest.mark.timing
@pytest.mark.parametrize("limits", ["none", "defaults"])
async def test_a_flood_into_many_tabs_is_bounded_and_bystanders_keep_their_latency(stack, limits):
    """Findings 2 and 3: a second account with 10 sockets on process B sent to a user holding
    many tabs on process A; bystanders on A slowed down and lost messages (a full queue).

    With the defaults the flooder's budget is per user (20 messages / 10 s) and pays for
    every copy before it is sent (200 per 10 s): its messages are refused on its own
    process, answered at once until the socket has sent on a quarter budget without waiting (then 4420),
    and the bystanders' p99 stays within max(250 ms, 3x the quiet run), all delivered.
    "none" turns the limits off and shows the harm: copies multiply, and bystanders'
    messages are slow or acknowledged as reaching no tab (the queue was full).
    """
    stack.start_redis()
    if limits == "none":
        stack.configure(
            rate_limit="none", fanout_limit="none", history_sender_limit="none", history_sender_share="none",
            max_connections=1000,
        )  # fmt: skip
    first, second = stack.daphnes(2)
    bob, mallory, *bystanders = await stack.users("bob", "mallory", *(f"bystander{n}" for n in range(8)))
    bob_tabs = await open_tabs(stack, first, bob, 50)
    people = [(await stack.open_tab(first, user), user) for user in bystanders]
    pairs = list(zip(people[::2], people[1::2], strict=True))

    # Quiet and flooded phases alternate, so the machine's background load (2 shared CPUs)
    # weighs on both alike. 4 pairs x 6 messages per phase, two phases each: every
    # bystander sends 12 in all, within their own budget. Without limits each message
    # takes seconds: one short phase shows the harm.
    rounds, phases = (6, 2) if limits == "defaults" else (4, 1)
    quiet, loud, acks, answers = [], [], [], Counter()
    first_flood, flood_seconds = None, 0.0
    for phase in range(phases):
        latencies, replies = await converse(pairs, rounds, f"q{phase}.")
        quiet += latencies
        acks += replies
        started = time.monotonic()
        first_flood = first_flood or started
        async with Flood(second, mallory, bob, sockets=10) as flood:
            await asyncio.sleep(0.3)  # the flood builds up before the bystanders measure
            latencies, replies = await converse(pairs, rounds, f"l{phase}.")
        flood_seconds += time.monotonic() - started
        loud += latencies
        acks += replies
        answers += flood.answers
    await asyncio.sleep(0.5)  # copies still in flight land: nothing tells how many the flood made
    copies = sum(len(tab.frames_of("direct")) for tab in bob_tabs)
    lost = sum(not ack.get("delivered") for ack in acks)
    print(f"\n[{limits}] bystander p50/p99 ms quiet {statistics.median(quiet):.1f}/{p99(quiet):.1f}, "
          f"flood {statistics.median(loud):.1f}/{p99(loud):.1f}, {lost} of {len(acks)} not delivered; "
          f"flooder answers {dict(answers)}; copies into bob's 50 tabs {copies}")  # fmt: skip

    if limits == "none":
        assert copies > 2000, "without limits the flood multiplies freely"
        assert lost or p99(loud) > 2 * p99(quiet), "and the bystanders notice"
        return
    assert lost == 0 and [a["delivered"] for a in acks] == [1] * 96
    # Issue 17's bound. Refusals used to be held back 1 s, which kept the flooder near idle (within
    # 2x of quiet) but stalled its socket while the server kept buffering; now each of its sockets
    # gets its refusals at once until it has sent on a quarter budget without waiting, and is closed.
    assert p99(loud) <= max(250, 3 * p99(quiet)), (sorted(quiet), sorted(loud))
    # Answered at once, but no more frames than each socket's inbound budget pays for, plus what it
    # may send without waiting once told (a quarter budget: then it is closed), plus what refills meanwhile.
    capacity, per = RegistrySettings().INBOUND_LIMIT
    frame_cost = len(json.dumps(direct(bob, "x" * 200, "f9.999"))) + FRAME_COST
    assert sum(answers.values()) <= 10 * (phases * 2 * capacity + capacity / per * flood_seconds) / frame_cost
    # Copies are paid before they are sent: 200 of burst, 20 a second after that.
    assert copies <= 200 + 20 * (time.monotonic() - first_flood)


# --------------------------------------------------------------------------- findings 5 to 8


def post_direct(server, user, frame: dict) -> tuple[int, dict, dict]:
    """``POST /messages/`` as ``user``, as the demo page does it: (status, headers, JSON body)."""
    token = csrf_token(server.port)
    status, headers, body = http_request(
        server.port, "POST", "/messages/", cookies={"sessionid": user.session, "csrftoken": token},
        headers={"X-CSRFToken": token, "Content-Type": "application/json"}, body=json.dumps(frame).encode(),
    )  # fmt: skip
    return status, dict(headers), json.loads(body)


def stored_for(user) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM inbox_notification WHERE recipient_id = %s", [user.pk])
        return cursor.fetchone()[0]


BLOCKING_POLICY = "tests.fault_apps.nobody_may_message_dave"


async def test_refusals_and_acks_tell_a_sender_nothing_the_policy_hides(stack):
    """Finding 6: ``forbidden`` (exists) vs ``unknown_recipient`` (does not) was an oracle for
    accounts, and ``delivered: N`` told anyone who is online and on how many devices."""
    stack.start_redis()
    stack.configure(can_message=BLOCKING_POLICY, ack_delivered=0)
    [server] = stack.daphnes(1)
    mallory, alice, carol, dave = await stack.users("mallory", "alice", "carol", "dave")
    await open_tabs(stack, server, alice, 2)
    await stack.open_tab(server, dave)
    sender = await stack.open_tab(server, mallory)
    missing = 10**9

    blocked = await sender.request(direct(dave, "hi", "x"))
    nobody = await sender.request(direct(missing, "hi", "x"))
    assert blocked["code"] == nobody["code"] == "unknown_recipient"
    assert blocked["detail"].replace(str(dave.pk), "N") == nobody["detail"].replace(str(missing), "N")
    # Online on two tabs, or offline: the same ack.
    assert await sender.request(direct(alice, "hi", "a")) == {"type": "ack", "id": "a", "delivered": None}
    assert await sender.request(direct(carol, "hi", "a")) == {"type": "ack", "id": "a", "delivered": None}

    (status, _, blocked), (other_status, _, nobody) = [
        await asyncio.to_thread(post_direct, server, mallory, direct(to, "hi", "h")) for to in (dave.pk, missing)
    ]
    assert status == other_status == 400 and blocked["code"] == nobody["code"] == "unknown_recipient"


async def test_the_http_send_path_obeys_the_policy_and_the_budget_of_the_socket_path(stack):
    """Finding 7: ``POST /messages/`` stored a message to a blocked recipient and had no rate limit."""
    stack.start_redis()
    # 20 messages an hour: no token comes back while the test runs, so the count is exact
    # (the default 20 per 10 s refills one every 0.5 s, and 21 POSTs take about that long).
    stack.configure(can_message=BLOCKING_POLICY, rate_limit="20,3600")
    [server] = stack.daphnes(1)
    mallory, alice, dave = await stack.users("mallory", "alice", "dave")
    alice_tab = await stack.open_tab(server, alice)
    dave_tab = await stack.open_tab(server, dave)

    # A refused message costs a token too: probing for recipients is not free.
    status, _, reply = await asyncio.to_thread(post_direct, server, mallory, direct(dave, "blocked?", "b"))
    assert (status, reply["code"]) == (400, "unknown_recipient")
    big = "x" * 10_000  # 19 of them stay within a quarter of alice's history (HISTORY_SENDER_SHARE)
    answers = [await asyncio.to_thread(post_direct, server, mallory, direct(alice, big, n)) for n in range(20)]
    assert [status for status, _, _ in answers] == [200] * 19 + [429]
    status, headers, refused = answers[-1]
    assert refused["code"] == "rate_limited" and 170 < refused["retry_after"] <= 180  # one token: 3600 s / 20
    assert int(headers["Retry-After"]) == math.ceil(refused["retry_after"])
    # The budget is the user's, whatever the transport: the socket is over it too.
    socket = await stack.open_tab(server, mallory)
    assert (await socket.request(direct(alice, "via the socket", "s")))["code"] == "rate_limited"

    assert await sync_to_async(stored_for)(dave) == 0 and dave_tab.frames_of("direct") == []
    assert await sync_to_async(stored_for)(alice) == 19
    assert len(alice_tab.frames_of("direct")) == 19


@pytest.mark.timing
async def test_presence_changes_are_coalesced_for_everyone_else(stack):
    """Finding 8: 200 connect/close cycles of one user pushed 228 presence frames to every tab."""
    stack.start_redis()
    [server] = stack.daphnes(1)
    alice, mallory = await stack.users("alice", "mallory")
    watcher = await stack.open_tab(server, alice)
    await watcher.wait_for(lambda f: f.get("type") == "demo.presence", 5)
    before = len(watcher.frames_of("demo.presence"))

    started = time.monotonic()
    for _ in range(40):
        tab = await stack.open_tab(server, mallory)
        await tab.close()
    churn_seconds = time.monotonic() - started
    await asyncio.sleep(1.5)  # the last coalesced broadcast

    frames = watcher.frames_of("demo.presence")[before:]
    # At most one broadcast per 0.5 s, plus the one that starts a burst and the trailing one.
    assert 1 <= len(frames) <= churn_seconds / 0.5 + 3, (len(frames), churn_seconds)
    assert [person["username"] for person in frames[-1]["online"]] == ["alice"]


# --------------------------------------------------------------------------- issue 17: origins and oracles


async def request_stream(port: int, headers: dict) -> tuple[int, asyncio.StreamWriter]:
    """``GET /events/`` over a raw connection: (status, the connection, still open to hold a stream)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["GET /events/ HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    status_line = await asyncio.wait_for(reader.readline(), 10)
    return int(status_line.split()[1]), writer


async def open_timed(stack, server, user, count: int) -> tuple[list, list[float]]:
    """``count`` tabs of ``user`` opened 10 at a time: (the tabs, each one's handshake time in ms)."""
    times = []

    async def timed():
        started = time.perf_counter()
        tab = await stack.open_tab(server, user)
        times.append((time.perf_counter() - started) * 1000)
        return tab

    return await test_faults.bounded([timed() for _ in range(count)], limit=10), times


@pytest.mark.timing
async def test_a_page_on_another_port_cannot_hold_the_victims_stream_slots(stack):
    """Issue 17, item 7: ``GET /events/`` with the victim's cookie from a page on another port of
    the same host got 200, and such streams could fill the victim's 50 connections until their own
    tabs got 4429. Shipped defaults: every such request is refused with 403 before it is registered,
    and the victim opens all 50 of their connections while the attack runs, as fast as when quiet."""
    stack.start_redis()
    [server] = stack.daphnes(1)
    [victim] = await stack.users("victim")
    cookie = f"sessionid={victim.session}"
    other_page = f"http://127.0.0.1:{server.port + 1}"
    attacks = [
        {"Cookie": cookie, "Origin": other_page, "Sec-Fetch-Site": "same-site"},  # its EventSource
        {"Cookie": cookie, "Sec-Fetch-Site": "same-site"},  # its <img src> or no-cors fetch: no Origin
        {"Cookie": cookie, "Sec-Fetch-Site": "cross-site"},
    ]
    own_page = {"Cookie": cookie, "Sec-Fetch-Site": "same-origin"}  # the site's own EventSource

    tabs, quiet = await open_timed(stack, server, victim, 49)
    status, own_stream = await request_stream(server.port, own_page)
    assert status == 200 and len(await stack.rows(user=victim)) == 50
    own_stream.close()
    await close_all(tabs)
    await await_until(lambda: test_faults.row_count(expect=0), 5)

    statuses, held = Counter(), []
    attacking = True

    async def attack(headers):
        while attacking or statuses.total() < 60:  # more than the victim's 50 slots, however slow the machine
            status, connection = await request_stream(server.port, headers)
            statuses[status] += 1
            (held if status == 200 else []).append(connection)
            if status != 200:
                connection.close()

    attackers = [asyncio.ensure_future(attack(attacks[n % len(attacks)])) for n in range(6)]
    await await_until(lambda: statuses.total() >= len(attackers), 10)  # the attack is under way
    tabs, loud = await open_timed(stack, server, victim, 49)
    status, own_stream = await request_stream(server.port, own_page)
    attacking = False
    await asyncio.gather(*attackers)
    print(f"\nvictim's handshakes p50/p99 ms quiet {statistics.median(quiet):.1f}/{p99(quiet):.1f}, "
          f"attacked {statistics.median(loud):.1f}/{p99(loud):.1f}; attacker answers {dict(statuses)}")

    assert status == 200 and all(tab.is_open for tab in tabs)
    assert len(await stack.rows(user=victim)) == 50
    assert set(statuses) == {403} and held == []
    assert p99(loud) <= max(250, 3 * p99(quiet)), (sorted(quiet), sorted(loud))
    own_stream.close()


@pytest.mark.timing  # the copies budget refills with time: a slow machine sends every probe live
async def test_with_private_acks_the_copies_budget_tells_a_sender_nothing_about_the_recipient(stack):
    """Issue 17, item 8: with ``ACK_DELIVERED`` off, a refused copies budget still answered a
    ``retry_after`` exact to the millisecond: the price of the recipient's connections. Shipped
    budgets: mallory drains her copies (4 messages to an accomplice's 50 tabs), then probes users
    on 0, 1 and 5 tabs. Every answer is the same ack; what was over the budget reached nobody's
    tabs live, and the 5-tab user's tabs get it with the next message sent to them."""
    stack.start_redis()
    stack.configure(ack_delivered=0)
    [server] = stack.daphnes(1)
    mallory, accomplice, zero, one, five, friend = await stack.users(
        "mallory", "accomplice", "zero", "one", "five", "friend"
    )
    await open_tabs(stack, server, accomplice, 50)
    await stack.open_tab(server, one)
    five_tabs = await open_tabs(stack, server, five, 5)
    sender, friend_tab = await stack.open_tab(server, mallory), await stack.open_tab(server, friend)

    for n in range(4):  # 200 copies: the whole FANOUT_LIMIT
        assert (await sender.request(direct(accomplice, "drain", f"d{n}")))["type"] == "ack"
    answers: dict = {"zero": [], "one": [], "five": []}
    for n in range(5):
        for name, user in (("five", five), ("one", one), ("zero", zero)):
            answers[name].append(await sender.request(direct(user, n, "probe")))

    same_ack = {"type": "ack", "id": "probe", "delivered": None}
    assert answers["zero"] == answers["one"] == answers["five"] == [same_ack] * 5
    live = [len(tab.frames_of("direct")) for tab in five_tabs]
    assert max(live) < 5, live  # some probes were over the budget: kept, not sent
    assert (await friend_tab.request(direct(five, "wake", "w")))["type"] == "ack"
    for tab in five_tabs:
        await tab.wait_for(lambda f: f.get("message") == "wake", 5)
        assert [frame["message"] for frame in tab.frames_of("direct")] == [0, 1, 2, 3, 4, "wake"]


# --------------------------------------------------------------------------- issue 17: frames and group sockets


class Sampler:
    """Samples ``measure()`` every ``interval`` seconds in a thread of its own, while in the ``with``."""

    def __init__(self, measure, interval: float) -> None:
        self.measure, self.interval = measure, interval
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.measure())

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)


class RedisPings(ClientProcess):
    """``tests/redis_pinger.py``: Redis ``PING`` every 20 ms; ``samples`` in ms."""

    def __init__(self, url: str) -> None:
        super().__init__("redis_pinger", url, 0.02)

    @property
    def samples(self) -> list[float]:
        return self.result


@pytest.mark.timing
@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
async def test_a_frame_flood_from_the_maximum_sockets_is_closed_and_costs_bystanders_nothing(stack, kind):
    """Issue 17, item 1: 10 sockets pushing 15 KB frames took daphne from 87 MiB to 1,675 MiB.

    Shipped defaults, the servers' own defaults. One account opens its 50 sockets and
    pushes 15 KB direct frames as fast as TCP takes them; meanwhile bystander pairs
    exchange messages. Each flooding socket is refused, then closed with 4420, and the
    server stops reading it at once (``hangup.py``); its slot comes back. The server's
    RSS grows by MiB, not GiB, Redis does not notice, no consumer crashes, and the
    bystanders' p99 stays within max(250 ms, 3x quiet): what each socket costs before
    its close is its budget (8 frames) and a quarter budget sent without waiting (3 more),
    its refusals by the user's budget answered in the process, not in Redis.

    The flooding client runs at ``nice`` 19: a remote attacker's CPU is not the server's,
    and this machine has 2 CPUs. Measured with the hang-up on daphne, at nice 0 the
    client's own work (about 0.3 s of CPU in the half second the flood lasts, plus the
    loopback TCP it drives) took the server's CPU: bystanders' p99 490-740 ms. Starved
    that way, the client may not have read a close frame when the hang-up resets its
    connection a second later: it sees 1006 instead of 4420.
    """
    stack.start_redis()
    [server] = stack.daphnes(1, kind=kind)
    bob, mallory, *bystanders = await stack.users("bob", "mallory", *(f"bystander{n}" for n in range(8)))
    await stack.open_tab(server, bob)
    people = [(await stack.open_tab(server, user), user) for user in bystanders]
    pairs = list(zip(people[::2], people[1::2], strict=True))
    # As many quiet samples as attacked ones (about 4.5 s each: the flood is over in 0.3-1 s), so a
    # p99 compares like with like on a machine whose background load comes and goes. Every bystander
    # sends 7 + 7 messages, one per 0.6 s: within their own budget (20, and 2 a second).
    quiet, acks = await converse(pairs, 14, "q.", gap=0.3)

    rss_before = server.rss_kb()
    async with RedisPings(stack.redis[0].url) as pings:
        with Sampler(server.rss_kb, 0.05) as rss:
            async with Flood(server, mallory, bob, sockets=50, mode="blast", niceness=19) as flood:
                loud, replies = await converse(pairs, 14, "l.", gap=0.3)  # about 4.5 s
    acks += replies
    growth_mib = (max(rss.samples) - rss_before) / 1024
    print(f"\n[{kind}] RSS {rss_before / 1024:.0f} MiB + {growth_mib:.1f} MiB; "
          f"Redis PING p99 {p99(pings.samples):.1f} ms; "
          f"bystander p50/p99 ms quiet {statistics.median(quiet):.1f}/{p99(quiet):.1f}, "
          f"flood {statistics.median(loud):.1f}/{p99(loud):.1f}; flooder {dict(flood.answers)}")  # fmt: skip

    closes = {answer: count for answer, count in flood.answers.items() if answer != "sent"}
    assert closes.get("closed 4420", 0) >= 45 and set(closes) <= {"closed 4420", "closed 1006"}, flood.answers
    assert growth_mib <= 64
    assert p99(pings.samples) <= 20
    assert [a.get("delivered") for a in acks] == [1] * len(acks) == [1] * 112
    assert p99(loud) <= max(250, 3 * p99(quiet)), (sorted(quiet), sorted(loud))
    assert "Traceback" not in server.log_tail(10_000_000), "a consumer crashed"

    async def flooder_gone() -> bool:
        return not await stack.rows(user=mallory)

    await await_until(flooder_gone, 5, message="the closed sockets' slots did not come back")


@pytest.mark.timing
async def test_group_sockets_count_against_the_connection_limit_and_their_slots_come_back(stack):
    """Issue 17, item 6: 60 of 60 ``GroupConsumer`` sockets of one account stayed open.

    Bystanders on both processes chat through groups while the 60 open: every message
    arrives, their p99 within max(250 ms, 3x quiet)."""
    stack.start_redis()
    first, second = stack.daphnes(2)
    mallory, *bystanders = await stack.users("mallory", *(f"bystander{n}" for n in range(4)))
    people = [(await stack.tab((first, second)[n % 2], user, path="/ws/groups/"), user)
              for n, user in enumerate(bystanders)]  # fmt: skip
    for tab, _ in people:
        await tab.more_than(0, 5)  # the position frame
    pairs = list(zip(people[::2], people[1::2], strict=True))
    quiet, acks = await converse(pairs, 8, "q.", gap=0.1)
    opening = test_faults.bounded(
        [stack.tab(server, mallory, path="/ws/groups/") for server in (first, second) for _ in range(30)], limit=10
    )
    (loud, more_acks), tabs = await asyncio.gather(converse(pairs, 8, "l.", gap=0.1), opening)
    # Groups cannot count what they reached: every message acknowledged, each one seen by its recipient.
    assert [ack["type"] for ack in acks + more_acks] == ["ack"] * 32
    assert p99(loud) <= max(250, 3 * p99(quiet)), (sorted(quiet), sorted(loud))
    for tab in tabs:
        await tab.more_than(0, 5)  # its position frame if accepted; a refused socket gets none, only its close
    codes = Counter(tab.close_code if not tab.is_open else "open" for tab in tabs)
    assert codes == {"open": 50, 4429: 10}

    await test_faults.close_all([tab for tab in tabs if tab.is_open][:5])
    again = await test_faults.bounded([stack.tab(second, mallory, path="/ws/groups/") for _ in range(6)], limit=6)
    for tab in again:
        await tab.more_than(0, 5)
    assert Counter(tab.close_code if not tab.is_open else "open" for tab in again) == {"open": 5, 4429: 1}
