"""``make load``: many real WebSockets on one daphne process of the demo site, then steady direct messages.

    .venv/bin/python -m benchmarks.load                      # 1,000 sockets, 20,000 messages at 250/s
    .venv/bin/python -m benchmarks.load --connections 200 --messages 2000 --rate 200

What it does, on loopback only:

1. creates a database ``crload_<pid>`` on the PostgreSQL server (``--postgres``,
   default the local one; dropped at the end) and migrates it with the demo's apps;
2. creates ``connections / tabs`` users with a real session each;
3. starts ONE daphne process serving ``demo_site`` (``tests.fault_settings``:
   PostgreSQL, channels_redis on ``--redis`` under a key prefix of its own,
   deleted at the end);
4. opens every socket (``--tabs`` per user, default 2) from ``--clients`` client
   processes, at most ``--connect-concurrency`` handshakes in flight;
5. sends ``--messages`` direct messages at ``--rate`` per second through the
   protocol, round-robin over the sockets (sender = socket ``i % N``, recipient
   another user chosen deterministically), each carrying its send time;
6. waits for every copy to arrive (``--drain`` seconds at most) and reports
   connect time, messages/s, p50/p99 delivery latency (send → each tab of the
   recipient), daphne's RSS (``/proc/<pid>/status`` VmRSS) and the messages lost
   to online recipients: a message is lost when any tab of its recipient did not
   get it. The exit status is non-zero when anything was lost, refused
   (``error`` frame) or a socket failed to connect.

The library's RATE_LIMIT (20 messages per 10 s per connection) stays on: the
round-robin spreads the sends so each socket sends ``rate / connections`` per
second (0.25/s with the defaults); ``--rate-limit none`` or ``N,SECONDS`` changes
it for a faster run. The demo's live presence list is left out by default
(``--presence`` keeps it): it sends the whole online list to every open inbox on
each login, which for 500 users logging in is ~O(N²) frames (gigabytes), a demo
feature rather than the registry under test.

Results go to benchmarks/results/load.json and a table on stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_REDIS = "redis://127.0.0.1:6379"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="WebSockets to open (default 1000)")
    parser.add_argument("--tabs", type=int, default=2, help="sockets per user (default 2: 500 users)")
    parser.add_argument("--messages", type=int, default=20_000, help="direct messages to send (default 20000)")
    parser.add_argument("--rate", type=float, default=250, help="messages per second, steady (default 250)")
    parser.add_argument("--clients", type=int, default=2, help="client processes holding the sockets (default 2)")
    parser.add_argument("--connect-concurrency", type=int, default=50, help="handshakes in flight (default 50)")
    parser.add_argument("--drain", type=float, default=30, help="seconds to wait for late deliveries (default 30)")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default 900)")
    parser.add_argument("--capacity", type=int, default=None, help="channel layer capacity (default: "
                        "channels_redis's 100 per channel, i.e. per daphne process for its sockets' channels)")
    parser.add_argument("--rate-limit", default="", help="RATE_LIMIT for the run: 'none' or 'N,SECONDS' "
                        "(default: the library's 20,10)")
    parser.add_argument("--presence", action="store_true", help="keep the demo's presence broadcast")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL") or SHARED_REDIS, help="Redis URL")
    parser.add_argument("--postgres", default=None, help="PostgreSQL server URL without a database "
                        "(default: PGHOST/PGPORT/PGUSER or postgres@127.0.0.1:5432)")
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.connections < 2 * args.tabs or args.connections % args.tabs:
        parser.error("--connections must be a multiple of --tabs, with at least two users")
    if args.messages < 1 or args.rate <= 0 or args.clients < 1:
        parser.error("--messages, --rate and --clients must be positive")
    return args


# --------------------------------------------------------------------------- the message plan


def recipient_of(i: int, sender_user: int, users: int) -> int:
    """The user message ``i`` goes to: never its sender, spread over everyone."""
    return (sender_user + 1 + (i * 2_654_435_761) % (users - 1)) % users


def plan_of(i: int, plan: dict) -> tuple[int, int]:
    """(sender socket, recipient user) of message ``i``."""
    sender = i % plan["sockets"]
    return sender, recipient_of(i, sender // plan["tabs"], plan["users"])


# --------------------------------------------------------------------------- client processes


def worker_main(worker: int, plan: dict, control, reports) -> None:
    """One client process: its share of the sockets (socket ``s`` belongs to worker ``s % clients``)."""
    try:
        asyncio.run(Worker(worker, plan, control, reports).run())
    except BaseException as error:  # reported, never silent
        reports.put(("crashed", worker, repr(error)))
        raise


class Worker:
    def __init__(self, worker: int, plan: dict, control, reports) -> None:
        self.id = worker
        self.plan = plan
        self.control = control
        self.reports = reports
        self.mine = [s for s in range(plan["sockets"]) if s % plan["clients"] == worker]
        self.ws: dict[int, object] = {}
        self.sent = 0
        self.received: set[tuple[int, int]] = set()
        self.duplicates = 0
        self.latencies: list[float] = []
        self.acks: Counter = Counter()
        self.short_acks: list[int] = []  # messages whose ack reached fewer than every tab
        self.errors: Counter = Counter()
        self.closed: Counter = Counter()
        self.behind = 0.0
        self.closing = False
        self.readers: list[asyncio.Future] = []
        self.expected_pairs: set[tuple[int, int]] = set()
        self.all_in = asyncio.Event()

    async def command(self):
        return await asyncio.to_thread(self.control.recv)

    async def run(self) -> None:
        expected = self.expected_pairs = self.expected()
        self.remaining = len(expected)
        if not expected:
            self.all_in.set()
        assert await self.command() == "connect"
        await self.connect_all()
        command, t0 = await self.command()
        assert command == "start"
        reporter = asyncio.ensure_future(self.report_progress())
        await self.send_all(t0)
        sent_done = time.monotonic()
        # Every copy meant for these sockets, or the drain time is over.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), self.plan["drain"])
        reporter.cancel()
        missing = expected - self.received
        self.reports.put(("result", self.id, {
            "sent": self.sent,
            "sent_done": sent_done,
            "behind_max": self.behind,
            "expected": len(expected),
            "received": len(self.received & expected),
            "unexpected": len(self.received - expected),
            "duplicates": self.duplicates,
            "missing_messages": sorted({seq for seq, _ in missing}),
            "latencies": self.latencies,
            "acks": dict(self.acks),
            "short_acks": self.short_acks,
            "errors": dict(self.errors),
            "closed": dict(self.closed),
        }))
        assert await self.command() == "close"
        self.closing = True
        await asyncio.gather(*(ws.close() for ws in self.ws.values()), return_exceptions=True)

    def expected(self) -> set[tuple[int, int]]:
        """(message, socket) pairs this worker's sockets must receive."""
        plan, mine = self.plan, set(self.mine)
        wanted = set()
        for i in range(plan["messages"]):
            _, user = plan_of(i, plan)
            for tab in range(plan["tabs"]):
                socket = user * plan["tabs"] + tab
                if socket in mine:
                    wanted.add((i, socket))
        return wanted

    async def connect_all(self) -> None:
        from websockets.asyncio.client import connect

        plan = self.plan
        slots = asyncio.Semaphore(max(1, plan["connect_concurrency"] // plan["clients"]))
        durations, failures = [], []

        async def open_one(socket: int) -> None:
            user = socket // plan["tabs"]
            async with slots:
                started = time.monotonic()
                try:
                    ws = await connect(
                        f"ws://127.0.0.1:{plan['port']}/ws/registry/", origin=f"http://127.0.0.1:{plan['port']}",
                        additional_headers={"Cookie": f"sessionid={plan['sessions'][user]}"}, proxy=None,
                        compression=None, ping_interval=None, max_size=None, max_queue=None, open_timeout=60,
                    )  # fmt: skip
                except Exception as error:
                    failures.append(repr(error))
                    return
                durations.append(time.monotonic() - started)
            self.ws[socket] = ws
            self.readers.append(asyncio.ensure_future(self.read(socket, ws)))

        started = time.monotonic()
        tasks = [asyncio.ensure_future(open_one(s)) for s in self.mine]
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0.25)
            self.reports.put(("connecting", self.id, len(self.ws)))
        self.reports.put(("connected", self.id, {
            "opened": len(self.ws), "failures": failures, "durations": durations,
            "elapsed": time.monotonic() - started,
        }))

    async def read(self, socket: int, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for text in ws:
                now = time.monotonic()
                frame = json.loads(text)
                kind = frame.get("type")
                if kind == "direct":
                    message = frame["message"]
                    key = (message["seq"], socket)
                    if key in self.received:
                        self.duplicates += 1
                    else:
                        self.received.add(key)
                        self.latencies.append(now - message["t"])
                        if key in self.expected_pairs:
                            self.remaining -= 1
                            if self.remaining == 0:
                                self.all_in.set()
                elif kind == "ack":
                    self.acks[frame["delivered"]] += 1
                    if frame["delivered"] != self.plan["tabs"]:
                        self.short_acks.append(frame["id"])
                elif kind == "error":
                    self.errors[frame.get("code")] += 1
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:  # the server (or the network) closed it mid-run
                self.closed[str(ws.close_code)] += 1

    async def send_all(self, t0: float) -> None:
        plan, pks = self.plan, self.plan["user_pks"]
        mine = set(self.mine)
        for i in range(plan["messages"]):
            sender, user = plan_of(i, plan)
            if sender not in mine:
                continue
            due = t0 + i / plan["rate"]
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.behind = max(self.behind, -delay)
            frame = {"type": "direct", "to": pks[user], "id": i, "message": {"seq": i, "t": time.monotonic()}}
            await self.ws[sender].send(json.dumps(frame))
            self.sent += 1

    async def report_progress(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.reports.put(("progress", self.id, {
                "sent": self.sent, "received": len(self.received), "errors": sum(self.errors.values()),
            }))


# --------------------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def status(line: str) -> None:
    print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tests import processes

    started = time.monotonic()
    run_id = os.getpid()
    users = args.connections // args.tabs
    server_url = args.postgres or processes.SHARED_POSTGRES
    database = f"crload_{run_id}"
    prefix = f"crload{run_id}"
    check_services(args.redis, server_url)

    print(f"load: database {database} on {server_url}, Redis {args.redis} (prefix {prefix})", file=sys.stderr)
    database_url = processes.create_database(server_url, database)
    daphne = None
    workers = []
    try:
        processes.migrate(database_url)
        env = processes.settings_env(
            database_url, [args.redis], redis_prefix=prefix, secret_key=f"load-{run_id}",
            heartbeat=30, stale_after=90, rate_limit=args.rate_limit or None,
            presence=None if args.presence else 0, layer_capacity=args.capacity,
        )  # fmt: skip
        os.environ.update({k: v for k, v in env.items() if k.startswith(("CRF_", "DJANGO_"))})
        import django

        django.setup()
        status("load: creating users and sessions")
        user_pks, sessions = make_users(users)

        daphne = processes.Daphne(env, name="load").start()
        rss_start = daphne.rss_kb()

        plan = {
            "port": daphne.port, "sockets": args.connections, "tabs": args.tabs, "users": users,
            "clients": args.clients, "messages": args.messages, "rate": args.rate, "drain": args.drain,
            "connect_concurrency": args.connect_concurrency, "user_pks": user_pks, "sessions": sessions,
        }  # fmt: skip
        context = multiprocessing.get_context("spawn")
        reports = context.Queue()
        for worker in range(args.clients):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker_main, args=(worker, plan, child_end, reports), daemon=True)
            process.start()
            workers.append((process, parent_end))
        deadline = started + args.timeout

        # Connect.
        connect_started = time.monotonic()
        for _, pipe in workers:
            pipe.send("connect")
        connected = collect(reports, "connected", args.clients, deadline, lambda counts: status(
            f"load: connecting {sum(counts.values())}/{args.connections}"))  # fmt: skip
        connect_elapsed = time.monotonic() - connect_started
        opened = sum(r["opened"] for r in connected.values())
        failures = [f for r in connected.values() for f in r["failures"]]
        durations = [d for r in connected.values() for d in r["durations"]]
        registered = wait_for_rows(opened, timeout=30)
        rss_connected = daphne.rss_kb()

        # Send.
        cpu_before = daphne.cpu_seconds()
        t0 = time.monotonic() + 1.0
        for _, pipe in workers:
            pipe.send(("start", t0))

        def show(progress):
            sent = sum(p.get("sent", 0) for p in progress.values())
            received = sum(p.get("received", 0) for p in progress.values())
            errors = sum(p.get("errors", 0) for p in progress.values())
            status(f"load: sent {sent}/{args.messages}, copies received {received}, errors {errors}, "
                   f"{time.monotonic() - t0:.0f} s")  # fmt: skip

        results = collect(reports, "result", args.clients, deadline, show, kind="progress")
        rss_after = daphne.rss_kb()
        daphne_cpu = daphne.cpu_seconds() - cpu_before
        phase_seconds = time.monotonic() - t0
        status("load: closing\n")
        for _, pipe in workers:
            pipe.send("close")
        for process, _ in workers:
            process.join(15)

        report = summarise(args, results, connect_elapsed, opened, failures, durations, registered,
                           rss_start, rss_connected, rss_after, t0, daphne.errors())  # fmt: skip
        report["daphne_cpu"] = {
            "seconds_during_messages": round(daphne_cpu, 1),
            "phase_seconds": round(phase_seconds, 1),
            "share_of_one_core": round(daphne_cpu / phase_seconds, 2),
        }
    finally:
        for process, _ in workers:
            if process.is_alive():
                process.kill()
        if daphne is not None:
            daphne.stop()
        cleanup(database_url, server_url, database, args.redis, prefix)

    report["run_seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0 if report["ok"] else 1


def check_services(redis_url: str, server_url: str) -> None:
    import psycopg
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        raise SystemExit(f"load: Redis at {redis_url} is unreachable ({error}); start it (make services).") from None
    try:
        psycopg.connect(f"{server_url}/postgres", connect_timeout=3).close()
    except psycopg.Error as error:
        raise SystemExit(f"load: PostgreSQL at {server_url} is unreachable ({error}); start it (make services).") \
            from None


def make_users(count: int) -> tuple[list[int], list[str]]:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    from tests.processes import session_for

    password = make_password(None)  # unusable: the sockets sign in with their session
    User = get_user_model()
    User.objects.bulk_create(User(username=f"load{i:05d}", password=password) for i in range(count))
    people = list(User.objects.filter(username__startswith="load").order_by("username"))
    return [user.pk for user in people], [session_for(user) for user in people]


def wait_for_rows(expected: int, timeout: float) -> int:
    from channel_registry.models import UserChannel

    deadline = time.monotonic() + timeout
    while True:
        count = UserChannel.objects.count()
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def collect(reports, final: str, count: int, deadline: float, show, kind: str = "connecting") -> dict:
    """Wait for ``count`` ``final`` reports, showing progress; ``worker -> payload``."""
    import queue

    done, progress = {}, {}
    while len(done) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"\nload: gave up waiting for '{final}' (--timeout)")
        try:
            message = reports.get(timeout=0.5)
        except queue.Empty:
            continue
        tag, worker, payload = message
        if tag == "crashed":
            raise SystemExit(f"\nload: client process {worker} crashed: {payload}")
        if tag == final:
            done[worker] = payload
        elif tag == kind:
            progress[worker] = payload
            show(progress)
    return done


def summarise(args, results, connect_elapsed, opened, failures, durations, registered,
              rss_start, rss_connected, rss_after, t0, daphne_errors) -> dict:  # fmt: skip
    latencies = [x * 1000 for r in results.values() for x in r["latencies"]]
    missing = sorted({seq for r in results.values() for seq in r["missing_messages"]})
    # The sender's ack said so (the layer refused the copy: ChannelFull), or nothing did.
    reported = {seq for r in results.values() for seq in r["short_acks"]}
    silent = [seq for seq in missing if seq not in reported]
    expected = sum(r["expected"] for r in results.values())
    received = sum(r["received"] for r in results.values())
    sent = sum(r["sent"] for r in results.values())
    send_seconds = max(r["sent_done"] for r in results.values()) - t0
    acks: Counter = Counter()
    errors: Counter = Counter()
    closed: Counter = Counter()
    for r in results.values():
        acks.update({int(k): v for k, v in r["acks"].items()})
        errors.update(r["errors"])
        closed.update(r["closed"])
    full_acks = acks.get(args.tabs, 0)
    report = {
        "config": {
            "connections": args.connections, "users": args.connections // args.tabs, "tabs_per_user": args.tabs,
            "messages": args.messages, "rate_target": args.rate, "client_processes": args.clients,
            "rate_limit": args.rate_limit or "library default (20, 10)", "presence_broadcast": args.presence,
            "layer_capacity": args.capacity or "channels_redis default (100)",
            "daphne_processes": 1, "redis": args.redis, "cpus": os.cpu_count(),
        },
        "connect": {
            "opened": opened, "failed": len(failures), "failures_sample": failures[:3], "registered_rows": registered,
            "total_seconds": round(connect_elapsed, 2),
            "handshake_p50_ms": round(percentile(durations, 50) * 1000, 1),
            "handshake_p99_ms": round(percentile(durations, 99) * 1000, 1),
        },
        "messages": {
            "sent": sent, "send_seconds": round(send_seconds, 2),
            "sent_per_second": round(sent / send_seconds, 1) if send_seconds > 0 else None,
            "client_behind_schedule_max_ms": round(max(r["behind_max"] for r in results.values()) * 1000, 1),
            "acks": sum(acks.values()), "acks_all_tabs": full_acks, "acks_by_delivered": dict(sorted(acks.items())),
            "errors": dict(errors), "copies_expected": expected, "copies_received": received,
            "copies_per_second": round(received / send_seconds, 1) if send_seconds > 0 else None,
            "duplicates": sum(r["duplicates"] for r in results.values()),
            "lost_to_online_recipients": len(missing), "lost_sample": missing[:10],
            "lost_and_reported_in_ack": len(missing) - len(silent), "lost_silently": len(silent),
            "sockets_closed_by_server": dict(closed),
        },
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 2), "p90": round(percentile(latencies, 90), 2),
            "p99": round(percentile(latencies, 99), 2), "max": round(max(latencies, default=float("nan")), 2),
            "mean": round(statistics.fmean(latencies), 2) if latencies else None,
        },
        "daphne_rss_kb": {"start": rss_start, "connected": rss_connected, "after": rss_after},
        "daphne_errors": daphne_errors[:10],
    }
    report["ok"] = (
        not failures and opened == args.connections and sent == args.messages and not missing
        and not errors and full_acks == args.messages
    )
    return report


def print_table(report: dict) -> None:
    c, m, lat, rss = report["connect"], report["messages"], report["latency_ms"], report["daphne_rss_kb"]
    cfg = report["config"]
    rows = [
        ("connections (users x tabs)", f"{c['opened']}/{cfg['connections']} ({cfg['users']} x {cfg['tabs_per_user']})"),
        ("connect time, all sockets", f"{c['total_seconds']} s (handshake p50 {c['handshake_p50_ms']} ms, "
                                      f"p99 {c['handshake_p99_ms']} ms)"),
        ("messages sent", f"{m['sent']} in {m['send_seconds']} s"),
        ("messages/s (target)", f"{m['sent_per_second']} ({cfg['rate_target']:g})"),
        ("copies delivered/s", f"{m['copies_per_second']} ({m['copies_received']}/{m['copies_expected']})"),
        ("delivery latency p50 / p99", f"{lat['p50']} ms / {lat['p99']} ms (p90 {lat['p90']}, max {lat['max']})"),
        ("acks (all tabs reached)", f"{m['acks']} ({m['acks_all_tabs']})"),
        ("error frames", json.dumps(m["errors"]) if m["errors"] else "0"),
        ("lost to online recipients", f"{m['lost_to_online_recipients']} ({m['lost_silently']} without an ack "
                                      "saying so)"),
        ("daphne CPU, message phase", f"{report['daphne_cpu']['share_of_one_core']:.0%} of one core"),
        ("daphne RSS start/connected/after", f"{rss['start'] / 1024:.1f} / {rss['connected'] / 1024:.1f} / "
                                             f"{rss['after'] / 1024:.1f} MiB"),
        ("result", "OK" if report["ok"] else "FAILED"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def cleanup(database_url, server_url, database, redis_url, prefix) -> None:
    import redis
    from django.db import connections

    from tests import processes

    try:
        connections.close_all()
    except Exception:  # best effort before the DROP (which forces anyway)
        pass
    processes.drop_database(server_url, database)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


if __name__ == "__main__":
    sys.exit(main())
