"""``manage.py compare_strategies``: where it refuses to run, what it prints, and that it leaves nothing behind.

The command runs as a host project would run it: the demo site's ``manage.py`` with
its own settings, on a database of its own on the shared PostgreSQL and a Redis key
prefix of its own. What it leaves behind is counted from outside: every table's rows
and every key under the prefix, before and after.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import redis
from django.contrib.auth import get_user_model
from django.db import connection

from channel_registry.compare import CompareError, Options, check_layer, compare_strategies, has_throwaway_room, verdict
from channel_registry.delivery.fanout import is_redis_layer
from channel_registry.delivery.strategy import channel_layer
from channel_registry.models import UserChannel

from .processes import ROOT, SHARED_POSTGRES, create_database, drop_database, real_services_only

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
CASES = ["send_to_user, 1 tab", "send_to_user, 3 tabs", "send_to_users, 12 users (24 tabs)", "connect + disconnect",
         "counts the tabs it reached", "tells who is online"]  # fmt: skip


@pytest.mark.parametrize(("name", "allowed", "room"), [
    ("shop", None, False),
    ("contest", None, False),  # a word, not a substring
    ("shop", "shop_copy", False),
    ("shop", "shop", True),
    ("shop_staging", None, True),
    ("test_shop", None, True),
    ("shop-dev", None, True),
    ("/srv/dev/db.sqlite3", None, False),  # a file's own name, not its directory's
    ("/tmp/test_shop.sqlite3", None, True),
])  # fmt: skip
def test_throwaway_room_is_a_word_of_the_name_or_the_name_given(name, allowed, room):
    assert has_throwaway_room(name, allowed) is room


def test_layers_it_cannot_measure_are_refused_by_name():
    class CustomLayer:
        pass

    with pytest.raises(CompareError, match=r"the registry's layer is tests\.test_compare_strategies\..*CustomLayer"):
        check_layer(CustomLayer())


def test_the_verdict_names_the_faster_strategy_and_by_how_much():
    def stats(p50, p99):
        return {"p50": p50, "p99": p99}

    assert verdict(stats(1, 2), stats(15.6, 33.2)) == "mapping faster: 15.6x at p50, 16.6x at p99"
    assert verdict(stats(1.3, 1), stats(1, 2.1)) == "groups 1.3x faster at p50, mapping 2.1x faster at p99"
    assert verdict(stats(1.05, 3), stats(1, 1)) == "even at p50, groups 3.0x faster at p99"
    assert verdict(stats(1, 1), stats(1.09, 0.95)) == "even at p50 and p99"


# --------------------------------------------------------------------------- in this process


def leftovers() -> tuple:
    """Users, registry rows and what the channel layer holds under its prefix (from a thread of its own:
    the run's progress callback calls it, on the event loop)."""

    def count() -> tuple:
        layer = channel_layer()
        try:
            if is_redis_layer(layer):
                held = set(redis.Redis.from_url(REDIS_URL).scan_iter(match=layer.prefix + "*"))
            else:
                held = {("channel", name) for name in layer.channels} | {("group", name) for name in layer.groups}
            return get_user_model().objects.count(), UserChannel.objects.count(), held
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(count).result()


@pytest.mark.django_db(transaction=True)
async def test_an_error_mid_run_still_removes_every_throwaway_user_row_and_key():
    before = leftovers()
    during = []

    def progress(message: str) -> None:
        if message.startswith("measuring send_to_users"):
            during.append(leftovers())
            raise RuntimeError("the host's receiver failed")

    with pytest.raises(RuntimeError, match="the host's receiver failed"):
        await compare_strategies(Options(iterations=10, users=6), progress)
    users, rows, held = during[0]
    assert (users, rows) == (before[0] + 26, before[1] + 12), "the run had created its world"
    assert held != before[2], "... and its groups"
    users, rows, held = leftovers()
    assert (users, rows) == before[:2]
    assert held <= before[2]  # nothing left behind (earlier tests' budget keys may expire meanwhile)


# --------------------------------------------------------------------------- the demo site's manage.py


@pytest.fixture(scope="module")
def demo():
    """A database of the demo's own on the shared PostgreSQL, migrated; and a Redis prefix nobody else uses."""
    name = f"crcompare_{os.getpid()}"
    url = create_database(SHARED_POSTGRES, name)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DJANGO_", "REDIS_", "PYTEST_")) and key != "DATABASE_URL"}  # fmt: skip
    env.update(DATABASE_URL=url, REDIS_URL=REDIS_URL, REDIS_PREFIX=f"crcmp{secrets.token_hex(3)}")
    try:
        manage(env, "migrate", "--no-input", "-v0", check=True)
        yield name, url, env
    finally:
        drop_database(SHARED_POSTGRES, name)


def manage(env: dict, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "demo_site/manage.py", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=check)


def footprint(url: str, prefix: str) -> tuple[dict, list]:
    """Rows in every table of the database, and every key under the prefix."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        counts = {table: conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for table in tables}
    keys = sorted(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{prefix}*"))
    return counts, keys


@real_services_only
def test_refuses_a_database_without_throwaway_room_and_says_how_to_point_it_elsewhere(demo):
    name, url, env = demo
    before = footprint(url, env["REDIS_PREFIX"])
    refused = manage(env, "compare_strategies")
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"database {name!r}" in refused.stderr and "staging" in refused.stderr
    assert f"compare_strategies --allow-database {name}" in refused.stderr
    assert manage(env, "compare_strategies", "--allow-database", "another").returncode == 1
    assert footprint(url, env["REDIS_PREFIX"]) == before


@real_services_only
def test_prints_the_side_by_side_table_and_leaves_no_row_or_key(demo):
    name, url, env = demo
    before = footprint(url, env["REDIS_PREFIX"])
    assert before[1] == []
    run = manage(env, "compare_strategies", "--allow-database", name, "--iterations", "40", "--users", "12")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "BatchedRedisChannelLayer" in lines[1] and f"{name} (postgresql)" in lines[1]
    header = lines.index(next(line for line in lines if line.startswith("case ")))
    assert re.split(r"\s{2,}", lines[header]) == ["case", "mapping p50 / p99", "groups p50 / p99", "verdict"]
    table = [re.split(r"\s{2,}", line) for line in lines[header + 2 :]]
    assert [row[0] for row in table] == CASES
    for case, mapping, groups, said in table[:4]:
        for cell in (mapping, groups):
            p50, p99 = map(float, cell.split(" / "))
            assert 0 < p50 <= p99, (case, cell)
        assert re.fullmatch(r"(mapping|groups) faster: .*|.*(faster at|even at) p50.*", said), said
    assert table[4][1:] == ["yes (3 of 3)", "no (None)", "only mapping: an ack's `delivered`, Delivery.sent"]
    assert table[5][1:3] == ["yes (12 of 12)", "no (keeps no rows)"]
    assert "removed the throwaway users" in run.stderr
    assert footprint(url, env["REDIS_PREFIX"]) == before


@real_services_only
def test_ctrl_c_mid_run_removes_everything_it_created(demo):
    name, url, env = demo
    before = footprint(url, env["REDIS_PREFIX"])
    command = [sys.executable, "demo_site/manage.py", "compare_strategies", "--allow-database", name,
               "--iterations", "1000000"]  # fmt: skip
    with subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as process:
        try:
            for line in process.stderr:
                if line.startswith("measuring send_to_user"):
                    break
            during = footprint(url, env["REDIS_PREFIX"])
            process.send_signal(signal.SIGINT)
            rest = process.stderr.read()
            assert process.wait(60) == 1, rest
        finally:
            process.kill()
    assert sum(during[0].values()) > sum(before[0].values()), "the run had created its users and rows"
    assert "removed the throwaway users" in rest and rest.endswith("CommandError: interrupted\n"), rest
    assert footprint(url, env["REDIS_PREFIX"]) == before
