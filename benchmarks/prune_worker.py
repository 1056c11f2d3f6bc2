"""``prune_stale()`` in its own process, as ``manage.py prune_channels`` runs in production.

Target 6 starts it while its own event loop keeps calling ``send_to_user``, so the
two compete for PostgreSQL (and the machine), not for one interpreter's GIL.
Prints one JSON line: rows deleted, seconds, and the prune's statements timed by
kind (a ``connection.execute_wrapper``), to show where its time goes.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

from channel_registry.timing import percentile


def kind(sql: str) -> str:
    text = sql.lstrip().upper()
    if text.startswith("DELETE"):
        return "DELETE batch by pk"
    if "FOR UPDATE" in text:
        return "SELECT … FOR UPDATE (lock users)"
    if "LIMIT" in text:
        return "SELECT stale batch (pk, user_id)"
    if text.startswith("SELECT"):
        return "SELECT users still connected"
    return text.split(" ", 1)[0]


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.db import connection

    from channel_registry.cleanup import prune_stale

    spent: dict[str, list[float]] = defaultdict(list)

    def timed(execute, sql, params, many, context):
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            spent[kind(sql)].append(time.perf_counter() - start)

    connection.ensure_connection()
    with connection.execute_wrapper(timed):
        start = time.perf_counter()
        deleted = prune_stale()
        seconds = time.perf_counter() - start
    statements = {
        name: {
            "count": len(times),
            "seconds": sum(times),
            "p50_ms": percentile(times, 50) * 1000,
            "p99_ms": percentile(times, 99) * 1000,
            "max_ms": max(times) * 1000,
        }
        for name, times in spent.items()
    }
    print(json.dumps({"deleted": deleted, "seconds": seconds, "statements": statements}))


if __name__ == "__main__":
    main()
