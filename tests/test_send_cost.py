"""What one direct message costs in round trips, through a real daphne process: Redis calls, PostgreSQL transactions.

The guard of issue 18 (one send pipeline): its targets are at most 3 Redis calls
and 1 PostgreSQL transaction per direct message, sender and receiver side
together. The test holds today's counts as upper bounds, so no change adds a
round trip unnoticed: 1 Redis call when the recipient's tabs are in the sender's
process, 3 when they are in another, and 1 statement of the library's; the
demo's stored copy (its ``delivered`` hook) is one more, the application's own.

The demo site as the fault tests serve it (``tests/test_faults.py``): one or two daphnes,
a private Redis and a private PostgreSQL cluster that logs every statement, real
sessions and ``websockets`` clients; alice sends to bob's two tabs (the workload
of ``make load``), one message at a time, each waited for (its ack and both
copies) before the next: a steady low rate, where no batching can hide a call.

* Redis: ``MONITOR`` between two ``ECHO`` markers this process sends, so the
  window is exact (Redis runs commands one at a time and reports them in that
  order). A call is a command from a client (one round trip: ``EVALSHA``,
  ``BZPOPMIN``...); the commands a script runs inside Redis are counted apart.
* PostgreSQL: the statements daphne's connections ran in the window (the
  server logs each one before it runs, with its virtual transaction id), and the
  transactions they belong to. This process runs none in the window.

    .venv/bin/pytest tests/test_send_cost.py -q -s     # -s prints the breakdown
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from . import test_faults
from .processes import PostgresServer, create_database, migrate, real_services_only

pytestmark = [
    pytest.mark.faults,
    real_services_only,
]

MESSAGES = 20
# Today's counts per direct message, as upper bounds (the breakdown: docs/benchmarks.md).
#: Redis calls per message by where bob's tabs are. In alice's process: 1 EVALSHA
#: (pipeline.FOLD_SCRIPT); the copies go straight into the tabs' receive buffers. In
#: another process: that EVALSHA, then EVAL (the reader's fetch) + BZPOPMIN there.
MAX_REDIS_CALLS = {"one process": 1, "two processes": 3}
#: What those scripts run inside Redis (2 of them INFO: the history checks its Redis term).
MAX_SCRIPT_COMMANDS = {"one process": 24, "two processes": 30}
#: A receiving reader's fetches that carry no message: one that found its queue empty after a
#: message came in during its previous fetch. How many depends on how the reader's calls and the
#: messages interleave, not on what a message costs: 1 to 8 per 20 messages were seen...
IDLE_FETCHES = MESSAGES // 2
#: ... and, for each server process, a wake-up every ``brpop_timeout``: BZPOPMIN times out, then a fetch.
BRPOP_TIMEOUT = 5
EMPTY_FETCH_COMMANDS = 3  # an empty fetch runs GET, DEL, ZPOPMIN
MAX_LIBRARY_STATEMENTS = 1  # the recipient, its live channels and the count its copies cost: one SELECT
MAX_STATEMENTS = 2  # and the demo's stored copy (an INSERT on the registry's native connections)
MAX_TRANSACTIONS = 2  # one per statement (autocommit)
STORED_COPY = "INSERT inbox_notification"

#: A statement line of the server log with ``log_line_prefix = '%p %v '`` (pid, virtual transaction id).
STATEMENT = re.compile(r"^(\d+) (\S+) LOG:  (?:statement|execute [^:]*): (.*)$")
TRANSACTION_CONTROL = {"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"}


def library_scripts() -> dict[str, str]:
    """SHA1 -> ``module.NAME`` of the library's Lua scripts: which step an ``EVALSHA`` is."""
    from channel_registry.delivery import budget, pipeline
    from channel_registry.delivery import fanout as delivery
    from channel_registry.history import log as history
    from channel_registry.redis import layer as redis_layer
    from channel_registry.registry import slots

    names: dict[str, str] = {}
    # A defining module before an importing one.
    for module in (budget, delivery, history, pipeline, redis_layer, slots):
        for name, value in vars(module).items():
            if name.endswith("_SCRIPT") and isinstance(value, str):
                sha = hashlib.sha1(value.encode()).hexdigest()
                names.setdefault(sha, f"{module.__name__.rpartition('.')[2]}.{name}")
    return names


SCRIPTS = library_scripts()


@pytest.fixture(scope="module")
def logged_postgres():
    """A private cluster logging every statement with its backend and transaction; (server, demo database URL)."""
    with PostgresServer(settings={"log_statement": "all", "log_line_prefix": "%p %v "}) as server:
        url = create_database(server.url, "demo")
        migrate(url)
        yield server, url


@pytest.fixture
async def stack(request, logged_postgres, settings, django_db_blocker):
    async with test_faults.stack_on(logged_postgres[1], request, settings, django_db_blocker) as stack:
        yield stack


@dataclass
class RedisWindow:
    """The commands Redis ran between this process's two markers, from ``MONITOR``."""

    calls: Counter = field(default_factory=Counter)  # sent by a client: one round trip each
    in_scripts: Counter = field(default_factory=Counter)  # run by a script inside Redis


class RedisMonitor:
    """``MONITOR`` on a Redis server, read in the background; :meth:`window` delimits what to count."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.seen: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self) -> RedisMonitor:
        self.monitor = self.client.monitor()
        await self.monitor.__aenter__()  # MONITOR answered OK: every command from now on is reported
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        async for command in self.monitor.listen():
            await self.seen.put(command)

    async def mark(self, name: str) -> None:
        await self.client.echo(f"cr-window-{name}")

    async def window(self) -> RedisWindow:
        """Everything between the ``start`` and ``end`` markers (call after both were sent)."""
        counted, inside = RedisWindow(), False
        while True:
            command = await asyncio.wait_for(self.seen.get(), 10)
            name = command["command"].split(" ", 1)[0].upper()
            if name == "ECHO" and "cr-window-" in command["command"]:
                if "cr-window-end" in command["command"]:
                    return counted
                inside = True
                continue
            if inside and command["client_type"] == "lua":
                counted.in_scripts[name] += 1
            elif inside:
                sha = command["command"].split(" ", 2)[1].strip('"') if name == "EVALSHA" else ""
                counted.calls[f"{name} {SCRIPTS.get(sha, sha)}".strip()] += 1

    async def __aexit__(self, *exc_info) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.monitor.__aexit__(*exc_info)
        await self.client.aclose()


def statements_since(server: PostgresServer, offset: int) -> list[tuple[str, str, str]]:
    """(pid, virtual transaction id, statement) of every statement logged after byte ``offset``."""
    with server.log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    return [match.groups() for line in lines if (match := STATEMENT.match(line))]


def per_message(counts: Counter) -> str:
    return ", ".join(f"{name} {count / MESSAGES:.2f}" for name, count in counts.most_common())


def statement_kind(sql: str) -> str:
    """``SELECT channel_registry_userchannel``, ``INSERT inbox_notification``...: the verb and first table."""
    table = re.search(r'(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', sql, re.IGNORECASE)
    return f"{sql.split(None, 1)[0].upper()} {table.group(1)}" if table else sql[:60]


@pytest.mark.parametrize("layout", MAX_REDIS_CALLS)
async def test_round_trips_per_direct_message(stack, logged_postgres, layout):
    """A direct message's Redis calls and PostgreSQL statements stay within today's counts,
    with bob's tabs in alice's daphne process (``make load``'s case) and in another one."""
    postgres, _ = logged_postgres
    stack.start_redis(1)
    # Neither a heartbeat nor the demo's presence broadcast (debounced after the logins) in the
    # window: their statements and scripts would be counted as the messages'. As in ``make load``.
    stack.configure(heartbeat=60, stale_after=180, rate_limit="none", presence=0)
    servers = stack.daphnes(1 if layout == "one process" else 2)
    alice, bob = await stack.users("alice", "bob")
    sender = await stack.open_tab(servers[0], alice)
    tabs = [await stack.open_tab(servers[-1], bob), await stack.open_tab(servers[-1], bob)]

    async def one_message(n: int) -> None:
        ack = await sender.request(test_faults.direct(bob, {"n": n}, f"m{n}"))
        assert ack["type"] == "ack", ack
        for tab in tabs:
            assert (await tab.next_direct(10))["id"] == f"m{n}"

    await one_message(0)  # the first statements, scripts loaded, connections opened: not counted
    async with RedisMonitor(stack.redis_urls[0]) as monitor:
        log_offset = postgres.log.stat().st_size
        await monitor.mark("start")
        started = time.monotonic()
        for n in range(1, MESSAGES + 1):
            await one_message(n)
        wake_ups = len(servers) * (math.floor((time.monotonic() - started) / BRPOP_TIMEOUT) + 1)
        await monitor.mark("end")
        redis_window = await monitor.window()
    statements = statements_since(postgres, log_offset)

    calls, script_commands = sum(redis_window.calls.values()), sum(redis_window.in_scripts.values())
    work = [(pid, xid, sql) for pid, xid, sql in statements if sql.split(None, 1)[0].upper() not in TRANSACTION_CONTROL]
    transactions = len({(pid, xid) for pid, xid, _ in statements})
    # The "1 transaction" is the library's: the demo's stored copy is the application's own write.
    library_transactions = len({(pid, xid) for pid, xid, sql in work if statement_kind(sql) != STORED_COPY})
    kinds = Counter(statement_kind(sql) for _, _, sql in work)
    breakdown = (
        f"per direct message ({MESSAGES} messages, alice -> bob's 2 tabs, {layout}):\n"
        f"  Redis calls {calls / MESSAGES:.2f}: {per_message(redis_window.calls)}\n"
        f"  commands run inside scripts {script_commands / MESSAGES:.2f}: {per_message(redis_window.in_scripts)}\n"
        f"  PostgreSQL transactions {transactions / MESSAGES:.2f} "
        f"(the library's {library_transactions / MESSAGES:.2f}), statements {len(work) / MESSAGES:.2f}: "
        f"{per_message(kinds)}"
    )
    print(f"\n{breakdown}")
    # Both windows saw the messages: each is in the Redis history, and the demo stores each one.
    assert calls >= MESSAGES and kinds[STORED_COPY] == MESSAGES, breakdown
    idle_fetches = IDLE_FETCHES + wake_ups  # how many depends on how long the window took, not on the messages
    assert calls <= MAX_REDIS_CALLS[layout] * MESSAGES + idle_fetches + wake_ups, breakdown
    assert script_commands <= MAX_SCRIPT_COMMANDS[layout] * MESSAGES + EMPTY_FETCH_COMMANDS * idle_fetches, breakdown
    assert transactions <= MAX_TRANSACTIONS * MESSAGES, breakdown
    assert len(work) <= MAX_STATEMENTS * MESSAGES, breakdown
    assert len(work) - kinds[STORED_COPY] <= MAX_LIBRARY_STATEMENTS * MESSAGES, breakdown
    assert library_transactions <= MAX_LIBRARY_STATEMENTS * MESSAGES, breakdown
    assert all(tab.is_open for tab in [sender, *tabs])
