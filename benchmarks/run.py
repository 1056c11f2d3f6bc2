"""``make bench``: the mapping strategy against per-user groups, target by target (issue 5).

    .venv/bin/python -m benchmarks.run                 # full run, ~2 minutes on 2 vCPUs
    .venv/bin/python -m benchmarks.run --quick         # ~50 s smoke run (CI)
    .venv/bin/python -m benchmarks.run --target 1 --target 4
    .venv/bin/python -m benchmarks.run --prune-rows 200000

Runs against ``REDIS_URL`` and ``DATABASE_URL`` (defaults: the local Redis and
PostgreSQL; see benchmarks/settings.py for the database it creates and uses).
Prints one table per target to stdout, progress to stderr, and writes
``benchmarks/results/latest.json`` and ``benchmarks/results/chart.png``.
Missing a target is a result, not a failure: the exit status is non-zero only
when the benchmark could not run (a service down, a target that crashed).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

from .stats import progress

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["1", "2", "3", "4", "5", "6", "sharding", "receive", "history"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer iterations, 100,000 prune rows")
    parser.add_argument("--target", action="append", choices=ORDER, metavar="N",
                        help=f"run only this target (repeatable): {', '.join(ORDER)}")
    parser.add_argument("--prune-rows", type=int, metavar="N",
                        help="stale rows for target 6 (default 1,000,000; --quick 100,000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.json and chart.png")
    return parser.parse_args(argv)


def check_services() -> str:
    """Raise with a clear message when Redis or PostgreSQL is unreachable; return the database name."""
    import redis
    from django.conf import settings

    from .world import setup_django

    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        raise SystemExit(f"bench: Redis at {settings.REDIS_URL} is unreachable ({error}). "
                         "Start it (make services) or set REDIS_URL.") from error
    try:
        return setup_django()
    except Exception as error:
        raise SystemExit(f"bench: PostgreSQL for {settings.DATABASE_URL!r} is unusable ({error}). "
                         "Start it (make services) or set DATABASE_URL.") from error


def meta(args: argparse.Namespace, database: str) -> dict:
    import redis
    from django.conf import settings
    from django.db import connection

    info = redis.Redis.from_url(settings.REDIS_URL).info("server")
    connection.ensure_connection()
    packages = ("Django", "channels", "channels-redis", "redis", "psycopg", "daphne")
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "quick": args.quick,
        "python": platform.python_version(),
        "packages": {name: version(name) for name in packages},
        "redis_server": info.get("redis_version"),
        "postgresql": connection.pg_version,
        "redis_url": settings.REDIS_URL,
        "database": database,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "library_sources_sha256": library_fingerprint(),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
    }


def library_fingerprint() -> str:
    """Which state of channel_registry/*.py was measured (the tree changes under a benchmark's feet)."""
    import channel_registry

    digest = hashlib.sha256()
    for path in sorted(Path(channel_registry.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


async def run_targets(names: list[str], scale) -> tuple[dict, list[str]]:
    from channel_registry.registry.liveness import heartbeat, process

    from . import world
    from .targets import TARGETS

    tables, crashed = {}, []
    try:
        for name in names:
            await world.reset()
            started = time.perf_counter()
            try:
                table = await TARGETS[name](scale)
            except Exception:
                traceback.print_exc()
                progress(f"target {name} CRASHED")
                crashed.append(name)
                continue
            progress(f"target {name} done in {time.perf_counter() - started:.1f} s")
            tables[name] = table
            print(table.render() + "\n", flush=True)
    finally:
        heartbeat.stop()
        process.open.clear()
        await world.reset()  # the run's tables emptied, its Redis keys deleted
    return tables, crashed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    progress("checking Redis and PostgreSQL, migrating the benchmark database")
    database = check_services()
    from .targets import Scale

    scale = Scale.make(args.quick, args.prune_rows)
    names = [n for n in ORDER if n in (args.target or ORDER)]
    run_meta = meta(args, database)
    tables, crashed = asyncio.run(run_targets(names, scale))
    run_meta["load_average_at_end"] = os.getloadavg()
    results = {"meta": run_meta, "targets": {name: table.as_json() for name, table in tables.items()}}
    verdicts = [(name, v) for name, t in tables.items() for v in t.verdicts]
    met = sum(v.met is True for _, v in verdicts)
    print(f"== Summary: {met}/{len(verdicts)} acceptance points met "
          f"(library {run_meta['library_sources_sha256']}, load average {run_meta['load_average_at_start'][0]:.1f} "
          f"at start, {run_meta['load_average_at_end'][0]:.1f} at end on {run_meta['cpus']} CPUs)")
    for name, verdict in verdicts:
        if verdict.met is False:
            print(f"  NOT MET  target {name}: {verdict.text} — {verdict.detail}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    try:
        from .chart import draw

        draw(results, args.out / "chart.png")
    except ImportError:
        progress("matplotlib is missing (pip install -e '.[bench]'): no chart")
        crashed.append("chart")
    progress(f"wrote {args.out / 'latest.json'} and {args.out / 'chart.png'}")
    if crashed:
        progress(f"could not run: {', '.join(crashed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
