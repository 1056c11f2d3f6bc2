"""``make load``: real WebSockets on ONE server process of the demo site; the highest steady rate per setup.

    .venv/bin/python -m benchmarks.load                          # every setup, ~7-9 minutes
    .venv/bin/python -m benchmarks.load --setup library --setup stock
    .venv/bin/python -m benchmarks.load --setup library --rate 500 --trial-seconds 20   # one fixed rate
    .venv/bin/python -m benchmarks.load --idle-sockets 0         # skip the idle-socket phase
    .venv/bin/python -m benchmarks.load --setup raw --connections 100 --rate 100 --idle-sockets 0  # a smoke test
    .venv/bin/python -m benchmarks.load --setup library --profile  # then py-spy at its best rate

Setups (the same workload each; one changes one thing against ``library``):

============  ======================================  ==================  ==========
setup         channel layer                           consumer            server
============  ======================================  ==================  ==========
library       BatchedRedisChannelLayer (the default)  mapping             daphne
stock         channels_redis RedisChannelLayer        mapping             daphne
pubsub        channels_redis RedisPubSubChannelLayer  mapping             daphne
groups        BatchedRedisChannelLayer                GroupConsumer       daphne
uvicorn       BatchedRedisChannelLayer                mapping             uvicorn
raw           none: a dict of sockets                 none                websockets
plain-lean    Channels' InMemoryChannelLayer          plain, no DB hop    daphne
plain-memory  Channels' InMemoryChannelLayer          plain               daphne
plain-groups  channels_redis RedisChannelLayer        plain, user groups  daphne
============  ======================================  ==================  ==========

The last four are yardsticks without the library (``benchmarks/rivals.py``,
``benchmarks/raw_server.py``): the Python ceiling (a bare ``websockets`` server),
plain Channels consumers routing in-process with and without Channels'
``close_old_connections`` hop before each event, and the rival the library exists
to beat, a Channels group per user on the stock Redis layer. They only forward
direct messages (no budgets, history or stored copy); every run prints the
library's best rate against theirs.

What it does, on loopback only:

1. creates a database ``crload_<pid>`` on the PostgreSQL server (dropped at the
   end), migrates it with the demo's apps and creates ``connections / tabs``
   users with a real session each;
2. per setup: starts ONE server process of ``demo_site`` (``tests.fault_settings``,
   each layer with its own default capacity unless ``--capacity``) and opens every
   socket (``--tabs`` per user) from ``--clients`` client processes; all setups
   stay up, each idle while another is measured;
3. trials: ``--trial-seconds`` of direct messages at a steady rate, round-robin
   over the sockets, each carrying its send time. A trial passes when every copy
   reached every tab of its recipient, no error frame came back, the clients kept
   the schedule, and p99 delivery latency (send -> each tab) is at most
   ``--p99-ms``. The rates climb a ladder (from half ``--start-rate``, +30 % a
   step); at each rate every setup still in the race runs one trial, in
   alternating order, so machine drift hits all alike. A setup leaves the race
   after two failures in a row; its result is its highest passing rate;
4. ``--idle-sockets`` sockets on one daphne (library setup), nothing sent:
   connect time and RSS per socket.

The demo's presence broadcast is off (O(N²) frames on login, a demo feature). The demo
stores a copy of every direct message (one INSERT in asgiref's single sync thread);
``--no-store`` leaves that out to measure the library alone.
The library's RATE_LIMIT is off (``--rate-limit``): at 2,000 messages/s each of
1,000 sockets sends 2/s, over the default 20 per 10 s.

Results: a table on stdout, ``benchmarks/results/load.json`` and ``load.png``;
progress on stderr. The exit status is non-zero when a setup could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_REDIS = "redis://127.0.0.1:6379"


RIVALS = "benchmarks.rivals:application"


@dataclass(frozen=True)
class Setup:
    layer: str  # tests/fault_settings.py CRF_LAYER_BACKEND
    path: str  # the WebSocket route
    server: str  # tests/processes.py SERVERS, or "raw"
    label: str
    application: str = "demo_site.asgi:application"


SETUPS = {
    "library": Setup("library", "/ws/registry/", "daphne", "library layer, mapping, daphne"),
    "stock": Setup("stock", "/ws/registry/", "daphne", "stock RedisChannelLayer, mapping, daphne"),
    "pubsub": Setup("pubsub", "/ws/registry/", "daphne", "RedisPubSubChannelLayer, mapping, daphne"),
    "groups": Setup("library", "/ws/groups/", "daphne", "library layer, GroupConsumer, daphne"),
    "uvicorn": Setup("library", "/ws/registry/", "uvicorn", "library layer, mapping, uvicorn"),
    "raw": Setup("memory", "/", "raw", "raw websockets server, in-process routing"),
    "plain-lean": Setup("memory", "/ws/lean/", "daphne", "plain Channels, in-memory layer, no DB hop", RIVALS),
    "plain-memory": Setup("memory", "/ws/plain/", "daphne", "plain Channels, in-memory layer", RIVALS),
    "plain-groups": Setup("stock", "/ws/groups/", "daphne", "plain Channels, RedisChannelLayer groups", RIVALS),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--setup", action="append", choices=list(SETUPS), help="run only this setup (repeatable; default all)")
    add("--connections", type=int, default=1000, help="WebSockets per setup (default 1000)")
    add("--tabs", type=int, default=2, help="sockets per user (default 2: 500 users)")
    add("--clients", type=int, default=2, help="client processes holding the sockets (default 2)")
    add("--connect-concurrency", type=int, default=50, help="handshakes in flight (default 50)")
    add("--trial-seconds", type=float, default=4, help="seconds of sending per trial (default 4)")
    add("--start-rate", type=float, default=200, help="first rate of the search, messages/s (default 200)")
    add("--max-rate", type=float, default=20_000, help="highest rate tried (default 20000)")
    add("--rate", type=float, default=None, help="one trial at this rate per setup instead of the search")
    add("--p99-ms", type=float, default=100, help="a trial passes with p99 latency at most this (default 100)")
    add("--drain", type=float, default=5, help="seconds to wait for late copies after a trial (default 5)")
    add("--idle-sockets", type=int, default=10_000, help="idle sockets on one daphne (default 10000; 0: skip)")
    add("--capacity", type=int, default=None, help="channel layer capacity (default: each layer's own)")
    add("--rate-limit", default="none", help="RATE_LIMIT: 'none' (default) or 'N,SECONDS'")
    add("--no-store", action="store_true", help="the demo stores no copy of each direct message "
        "(its INSERT runs in asgiref's single sync thread and caps every setup alike)")  # fmt: skip
    add("--profile", action="store_true", help="then py-spy on the library's server at its best rate: "
        "the top functions to load-profile.txt next to --out")  # fmt: skip
    add("--redis", default=os.environ.get("REDIS_URL") or SHARED_REDIS, help="Redis URL")
    add("--postgres", default=None, help="PostgreSQL server URL without a database "
        "(default: PGHOST/PGPORT/PGUSER or postgres@127.0.0.1:5432)")  # fmt: skip
    add("--out", type=Path, default=RESULTS / "load.json", help="the JSON (the chart goes next to it, .png)")
    args = parser.parse_args(argv)
    if args.connections < 2 * args.tabs or args.connections % args.tabs:
        parser.error("--connections must be a multiple of --tabs, with at least two users")
    if args.start_rate <= 0 or args.trial_seconds <= 0 or args.clients < 1:
        parser.error("--start-rate, --trial-seconds and --clients must be positive")
    args.setup = args.setup or list(SETUPS)
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
    """Holds sockets; runs trials on command: ``("trial", t0, rate, first, count)``, then ``"close"``."""

    def __init__(self, worker: int, plan: dict, control, reports) -> None:
        self.id = worker
        self.plan = plan
        self.control = control
        self.reports = reports
        self.mine = [s for s in range(plan["sockets"]) if s % plan["clients"] == worker]
        self.ws: dict[int, object] = {}
        self.closed: Counter = Counter()
        self.closing = False
        self.trial: Trial | None = None
        self.readers: list[asyncio.Future] = []

    async def command(self):
        return await asyncio.to_thread(self.control.recv)

    async def run(self) -> None:
        assert await self.command() == "connect"
        await self.connect_all()
        while (command := await self.command()) != "close":
            _, t0, rate, first, count = command
            self.trial = Trial(self, rate, first, count)
            self.reports.put(("result", self.id, await self.trial.run(t0)))
        self.closing = True
        await asyncio.gather(*(ws.close() for ws in self.ws.values()), return_exceptions=True)

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
                        f"ws://127.0.0.1:{plan['port']}{plan['path']}", origin=f"http://127.0.0.1:{plan['port']}",
                        additional_headers={"Cookie": f"sessionid={plan['sessions'][user]}"}, proxy=None,
                        compression=None, ping_interval=None, max_size=None, max_queue=None, open_timeout=120,
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
            self.reports.put(("progress", self.id, {"opened": len(self.ws)}))
        elapsed = time.monotonic() - started
        self.reports.put(("connected", self.id, {
            "opened": len(self.ws), "failures": failures, "durations": durations, "elapsed": elapsed,
        }))  # fmt: skip

    async def read(self, socket: int, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for text in ws:
                if self.trial is not None:
                    self.trial.on_frame(socket, json.loads(text), time.monotonic())
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:  # the server (or the network) closed it mid-run
                self.closed[str(ws.close_code)] += 1


class Trial:
    """Messages ``first .. first + count - 1`` at ``rate``; what this worker's sockets sent and received."""

    def __init__(self, worker: Worker, rate: float, first: int, count: int) -> None:
        self.worker, self.rate, self.first, self.count = worker, rate, first, count
        plan, mine = worker.plan, set(worker.mine)
        self.expected = {
            (i, user * plan["tabs"] + tab)
            for i in range(first, first + count)
            for user in [plan_of(i, plan)[1]]
            for tab in range(plan["tabs"])
            if user * plan["tabs"] + tab in mine
        }
        self.received: set[tuple[int, int]] = set()
        self.latencies: list[float] = []
        self.late = self.duplicates = self.sent = 0
        self.acks: Counter = Counter()
        self.errors: Counter = Counter()
        self.behind = 0.0
        self.all_in = asyncio.Event()
        if not self.expected:
            self.all_in.set()

    def on_frame(self, socket: int, frame: dict, now: float) -> None:
        kind = frame.get("type")
        if kind == "direct":
            key = (frame["message"]["seq"], socket)
            if key not in self.expected:
                self.late += 1  # a copy of an earlier trial
            elif key in self.received:
                self.duplicates += 1
            else:
                self.received.add(key)
                self.latencies.append(now - frame["message"]["t"])
                if len(self.received) == len(self.expected):
                    self.all_in.set()
        elif kind == "ack":
            self.acks[frame["delivered"]] += 1
        elif kind == "error":
            self.errors[frame.get("code")] += 1

    async def report_progress(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.worker.reports.put(("progress", self.worker.id, {"received": len(self.received)}))

    async def run(self, t0: float) -> dict:
        reporter = asyncio.ensure_future(self.report_progress())
        try:
            return await self.send_and_wait(t0)
        finally:
            reporter.cancel()

    async def send_and_wait(self, t0: float) -> dict:
        plan, pks, mine = self.worker.plan, self.worker.plan["user_pks"], set(self.worker.mine)
        for i in range(self.first, self.first + self.count):
            sender, user = plan_of(i, plan)
            if sender not in mine:
                continue
            delay = t0 + (i - self.first) / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.behind = max(self.behind, -delay)
            frame = {"type": "direct", "to": pks[user], "id": i, "message": {"seq": i, "t": time.monotonic()}}
            await self.worker.ws[sender].send(json.dumps(frame))
            self.sent += 1
        sent_done = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), plan["drain"])
        return {
            "sent": self.sent, "sent_done": sent_done, "behind_max": self.behind,
            "expected": len(self.expected), "received": len(self.received), "late": self.late,
            "duplicates": self.duplicates, "latencies": self.latencies, "acks": dict(self.acks),
            "errors": dict(self.errors), "closed": dict(self.worker.closed),
        }  # fmt: skip


# --------------------------------------------------------------------------- the server side


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def status(line: str) -> None:
    print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)


def bar(done: float, total: float, width: int = 24) -> str:
    filled = int(width * min(1.0, done / total)) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def server_process(setup: Setup, env: dict):
    """The (not yet started) server process of ``setup``."""
    from tests import processes

    from .raw_server import RawServer

    kinds = {**processes.SERVERS, "raw": RawServer}
    return kinds[setup.server](env, name=f"load-{setup.server}", application=setup.application)


class Run:
    """One server process with its client processes and sockets."""

    def __init__(self, args, world: dict, setup: Setup, connections: int, prefix: str, first_user: int = 0) -> None:
        from tests import processes

        self.args, self.setup, self.connections = args, setup, connections
        env = processes.settings_env(
            world["database_url"], [args.redis], redis_prefix=prefix, secret_key=world["secret_key"],
            heartbeat=30, stale_after=90, rate_limit=args.rate_limit, presence=0,
            store_messages=0 if args.no_store else None, layer_capacity=args.capacity, layer_backend=setup.layer,
        )  # fmt: skip
        self.server = server_process(setup, env)
        users = connections // args.tabs
        self.plan = {
            "port": self.server.port, "path": setup.path, "sockets": connections, "tabs": args.tabs,
            "users": users, "clients": args.clients, "drain": args.drain,
            "connect_concurrency": args.connect_concurrency,
            "user_pks": world["user_pks"][first_user : first_user + users],
            "sessions": world["sessions"][first_user : first_user + users],
        }  # fmt: skip
        self.workers: list = []
        self.reports = None
        self.next_message = 0

    def __enter__(self) -> Run:
        self.server.start(timeout=60)
        context = multiprocessing.get_context("spawn")
        self.reports = context.Queue()
        for worker in range(self.args.clients):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker_main, args=(worker, self.plan, child_end, self.reports))
            process.daemon = True
            process.start()
            self.workers.append((process, parent_end))
        return self

    def __exit__(self, *exc_info) -> None:
        for _, pipe in self.workers:
            with contextlib.suppress(OSError):
                pipe.send("close")
        for process, _ in self.workers:
            process.join(15)
            if process.is_alive():
                process.kill()
        self.server.stop()

    def collect(self, final: str, show) -> dict:
        done, progress = {}, {}
        deadline = time.monotonic() + 600
        while len(done) < len(self.workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for '{final}' from the client processes")
            try:
                tag, worker, payload = self.reports.get(timeout=0.5)
            except queue.Empty:
                continue
            if tag == "crashed":
                raise RuntimeError(f"client process {worker} crashed: {payload}")
            if tag == final:
                done[worker] = payload
            else:
                progress[worker] = payload
                show(progress)
        return done

    def connect(self, label: str) -> dict:
        rss_before = self.server.rss_kb()
        for _, pipe in self.workers:
            pipe.send("connect")
        started = time.monotonic()
        connected = self.collect("connected", lambda p: status(
            f"load: {label}: connecting {bar(sum(x['opened'] for x in p.values()), self.connections)} "
            f"{sum(x['opened'] for x in p.values())}/{self.connections}"))  # fmt: skip
        durations = [d for r in connected.values() for d in r["durations"]]
        failures = [f for r in connected.values() for f in r["failures"]]
        time.sleep(1)  # the last registrations settle
        rss_after = self.server.rss_kb()
        opened = sum(r["opened"] for r in connected.values())
        return {
            "opened": opened, "failed": len(failures), "failures_sample": failures[:3],
            "seconds": round(time.monotonic() - started, 2),
            "handshake_p50_ms": round(percentile(durations, 50) * 1000, 1),
            "handshake_p99_ms": round(percentile(durations, 99) * 1000, 1),
            "rss_kb_before": rss_before, "rss_kb_after": rss_after,
            "rss_kb_per_socket": round((rss_after - rss_before) / opened, 1) if opened else None,
        }  # fmt: skip

    def trial(self, rate: float, label: str) -> dict:
        count = max(1, round(rate * self.args.trial_seconds))
        first, self.next_message = self.next_message, self.next_message + count
        cpu_before, t0 = self.server.cpu_seconds(), time.monotonic() + 0.5
        for _, pipe in self.workers:
            pipe.send(("trial", t0, rate, first, count))
        results = self.collect("result", lambda p: status(
            f"load: {label}: {rate:,.0f}/s {bar(time.monotonic() - t0, self.args.trial_seconds)} "
            f"received {sum(x.get('received', 0) for x in p.values())}"))  # fmt: skip
        elapsed = time.monotonic() - t0
        cpu = self.server.cpu_seconds() - cpu_before
        report = summarise_trial(self.args, rate, results, t0, cpu, elapsed, self.server.rss_kb())
        self.settle()
        return report

    def settle(self, idle_share: float = 0.15, within: float = 30) -> None:
        """Until the server idles: a failed trial's backlog must not slow the next one."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            before = self.server.cpu_seconds()
            time.sleep(0.5)
            if self.server.cpu_seconds() - before < idle_share * 0.5:
                return


def summarise_trial(args, rate: float, results: dict, t0: float, cpu: float, elapsed: float, rss_kb: int) -> dict:
    latencies = [x * 1000 for r in results.values() for x in r["latencies"]]
    expected = sum(r["expected"] for r in results.values())
    received = sum(r["received"] for r in results.values())
    sent = sum(r["sent"] for r in results.values())
    send_seconds = max(r["sent_done"] for r in results.values()) - t0
    errors: Counter = Counter()
    closed: Counter = Counter()
    for r in results.values():
        errors.update(r["errors"])
        closed.update(r["closed"])
    behind_ms = max(r["behind_max"] for r in results.values()) * 1000
    # Copies the sender's ack reported as refused (ChannelFull); the rest of "lost" came too late.
    refused = sum((args.tabs - k) * v for r in results.values() for k, v in r["acks"].items() if k is not None)
    p99 = percentile(latencies, 99)
    report = {
        "rate_target": rate, "messages": sent, "send_seconds": round(send_seconds, 2),
        "messages_per_second": round(sent / send_seconds, 1),
        "copies_per_second": round(received / send_seconds, 1),
        "copies_expected": expected, "copies_received": received, "lost": expected - received,
        "lost_refused_as_full": refused, "lost_late": expected - received - refused,
        "late_from_earlier_trials": sum(r["late"] for r in results.values()),
        "duplicates": sum(r["duplicates"] for r in results.values()),
        "errors": dict(errors), "sockets_closed_by_server": dict(closed),
        "client_behind_schedule_max_ms": round(behind_ms, 1),
        "latency_ms": {"p50": round(percentile(latencies, 50), 2), "p90": round(percentile(latencies, 90), 2),
                       "p99": round(p99, 2), "max": round(max(latencies, default=float("nan")), 2)},
        "server_cpu_share_of_one_core": round(cpu / elapsed, 2), "server_rss_kb": rss_kb,
    }  # fmt: skip
    report["passed"] = (
        report["lost"] == 0 and not errors and not closed and p99 <= args.p99_ms
        and report["messages_per_second"] >= 0.95 * rate and behind_ms < 250
    )  # fmt: skip
    return report


def ladder(args) -> list[float]:
    """The rates tried: from half ``--start-rate`` up by 30 % a step (rounded), to ``--max-rate``."""
    rates, rate = [], args.start_rate / 2
    while rate <= args.max_rate:
        rates.append(round(rate, -1) if rate >= 100 else round(rate))
        rate *= 1.3
    return rates


def compare(runs: dict[str, Run], args) -> dict[str, list[dict]]:
    """Every setup at each rate of the ladder in turn (order alternating), until it fails twice running.

    Interleaved so that the machine's drift (other processes on shared CPUs)
    hits every setup alike: the setups' trials at one rate are a minute apart
    at most, not the length of a run.
    """
    trials: dict[str, list[dict]] = {name: [] for name in runs}
    for name, run in runs.items():
        run.trial(ladder(args)[0], f"{name} warm-up")  # first statements, caches, connections: not counted
    rates = [args.rate] if args.rate is not None else ladder(args)
    failures = dict.fromkeys(runs, 0)
    for step, rate in enumerate(rates):
        active = [name for name in runs if failures[name] < 2]
        for name in active if step % 2 == 0 else active[::-1]:
            report = runs[name].trial(rate, name)
            trials[name].append(report)
            failures[name] = 0 if report["passed"] else failures[name] + 1
            cpu, verdict = report["server_cpu_share_of_one_core"], "pass" if report["passed"] else "FAIL"
            print(f"\r\033[Kload: {name}: {rate:,.0f}/s {verdict} (p99 {report['latency_ms']['p99']} ms, "
                  f"lost {report['lost']} ({report['lost_refused_as_full']} refused), server CPU {cpu:.0%})",
                  file=sys.stderr)  # fmt: skip
    return trials


def run_setups(args, world: dict, prefix: str, failed: dict) -> dict:
    """All setups' servers up at once (idle while another is measured), then :func:`compare`."""
    results, runs = {}, {}
    with contextlib.ExitStack() as stack:
        users = args.connections // args.tabs
        for index, name in enumerate(args.setup):
            try:
                # Users of their own: a message must not also go to the other setups' sockets (one database).
                run = Run(args, world, SETUPS[name], args.connections, f"{prefix}{name}", index * users)
                stack.enter_context(run)
                connect = run.connect(name)
                if connect["opened"] < args.connections:
                    raise RuntimeError(f"only {connect['opened']}/{args.connections} sockets opened: "
                                       f"{connect['failures_sample']}")  # fmt: skip
            except Exception as error:
                failed[name] = repr(error)
                print(f"\nload: setup {name} could not run: {error!r}", file=sys.stderr)
                continue
            runs[name] = run
            setup = SETUPS[name]
            results[name] = {"setup": setup.label, "layer": setup.layer, "path": setup.path,
                             "server": setup.server, "connect": connect}  # fmt: skip
        for name, trials in compare(runs, args).items():
            passed = [t for t in trials if t["passed"]]
            results[name]["trials"] = trials
            results[name]["best"] = max(passed, key=lambda t: t["rate_target"]) if passed else None
        if args.profile and results.get("library", {}).get("best"):
            results["library"]["profile"] = profile(runs["library"], results["library"]["best"]["rate_target"], args)
    return results


def profile(run: Run, rate: float, args) -> dict:
    """py-spy on the server process through one more trial at ``rate`` (its best: one step below its limit).

    Writes py-spy's collapsed stacks (``load-profile.folded``, for a flame graph)
    and the functions with the most samples, on the stack and on top of it
    (``load-profile.txt``), next to ``--out``.
    """
    folded = args.out.with_name(f"{args.out.stem}-profile.folded")
    folded.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(run.server.pid), "--format", "raw",
         "--duration", str(max(1, round(args.trial_seconds))), "--output", str(folded)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    trial = run.trial(rate, "library under py-spy")
    _, error = spy.communicate(timeout=60)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {error.strip()}")
    top = args.out.with_name(f"{args.out.stem}-profile.txt")
    top.write_text(top_functions(folded.read_text(), f"{run.setup.label} at {rate:g} msg/s") + "\n")
    print(f"\r\033[Kload: profile of library at {rate:g}/s in {top}", file=sys.stderr)
    return {"rate": rate, "passed": trial["passed"], "top": str(top), "folded": str(folded)}


def top_functions(folded: str, title: str, count: int = 30) -> str:
    """The busiest functions of py-spy's collapsed stacks: share of samples on the stack (total) and on top (self)."""
    total: Counter = Counter()
    own: Counter = Counter()
    samples = 0
    for line in folded.splitlines():
        stack, _, weight = line.rpartition(" ")
        # "function (file.py:123)": one entry per function, whichever line of it was running.
        frames = [frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") else frame for frame in stack.split(";")]
        samples += int(weight)
        own[frames[-1]] += int(weight)
        total.update(dict.fromkeys(frames, int(weight)))
    lines = [f"py-spy: {title}, {samples} samples (threads not idle)", "", "   total    self  function"]
    lines += [f"{total[f] / samples:7.1%} {own[f] / samples:7.1%}  {f}" for f, _ in own.most_common(count)]
    lines += ["", "by total (on the stack):"] + [f"{n / samples:7.1%}  {f}" for f, n in total.most_common(count)]
    return "\n".join(lines)


def idle_sockets(args, world: dict, prefix: str) -> dict:
    """``--idle-sockets`` on one daphne (library setup): connect time and memory per socket."""
    count = args.idle_sockets
    tabs = max(args.tabs, -(-count // len(world["user_pks"])))
    idle_args = argparse.Namespace(**{**vars(args), "tabs": tabs, "connect_concurrency": args.connect_concurrency})
    with Run(idle_args, world, SETUPS["library"], count - count % tabs, f"{prefix}idle") as run:
        return {"sockets": run.connections, "tabs_per_user": tabs, **run.connect("idle")}


# --------------------------------------------------------------------------- the run


def main(argv=None) -> int:
    args = parse_args(argv)
    from tests import processes

    started = time.monotonic()
    run_id = os.getpid()
    server_url = args.postgres or processes.SHARED_POSTGRES
    database, prefix = f"crload_{run_id}", f"crload{run_id}"
    check_services(args.redis, server_url)
    print(f"load: database {database} on {server_url}, Redis {args.redis} (prefix {prefix})", file=sys.stderr)
    report = {"meta": meta(args), "setups": {}, "failed": {}}
    database_url = processes.create_database(server_url, database)
    try:
        processes.migrate(database_url)
        env = processes.settings_env(database_url, [args.redis], secret_key=f"load-{run_id}", presence=0)
        os.environ.update({k: v for k, v in env.items() if k.startswith(("CRF_", "DJANGO_"))})
        import django

        django.setup()
        users = args.connections // args.tabs * len(args.setup)
        status(f"load: creating {users} users and sessions")
        user_pks, sessions = make_users(users)
        world = {"database_url": database_url, "secret_key": f"load-{run_id}", "user_pks": user_pks,
                 "sessions": sessions}  # fmt: skip
        report["setups"] = run_setups(args, world, prefix, report["failed"])
        if args.idle_sockets:
            try:
                report["idle"] = idle_sockets(args, world, prefix)
            except Exception as error:
                report["failed"]["idle"] = repr(error)
                print(f"\nload: idle sockets could not run: {error!r}", file=sys.stderr)
    finally:
        cleanup(database_url, server_url, database, args.redis, prefix)
    status("")
    report["targets"] = verdicts(report["setups"])
    report["meta"]["load_average_at_end"] = os.getloadavg()
    report["meta"]["run_seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    try:
        from .chart import draw_load

        draw_load(report, args.out.with_suffix(".png"))
        print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)
    except ImportError:
        print(f"\nwritten to {args.out} (no chart: matplotlib is missing)", file=sys.stderr)
    return 1 if report["failed"] else 0


def best_rate(setups: dict, name: str) -> float | None:
    """The setup's highest passing rate of the ladder (the same steps for every setup: ties are ties)."""
    best = setups.get(name, {}).get("best")
    return best["rate_target"] if best else (0.0 if name in setups else None)


def verdicts(setups: dict) -> list[dict]:
    """The issue's end-to-end targets, decided from this run's best rates."""
    rates = {name: best_rate(setups, name) for name in SETUPS}

    def check(text: str, a: str, b: str, factor: float) -> dict:
        if rates[a] is None or rates[b] is None:
            return {"text": text, "met": None, "detail": "not run"}
        ratio = rates[a] / rates[b] if rates[b] else float("inf")
        met = (rates[a] >= factor * rates[b] and rates[a] > 0) if factor else None  # None: reported only
        return {"text": text, "met": met,
                "detail": f"{rates[a]:,.0f} vs {rates[b]:,.0f} messages/s: {ratio:.2f}x"}  # fmt: skip

    return [
        check("library >= 3x plain Channels + RedisChannelLayer groups", "library", "plain-groups", 3),
        check("library >= 40% of plain Channels in memory without the DB hop", "library", "plain-lean", 0.4),
        check("library vs plain Channels in memory (reported, no target)", "library", "plain-memory", 0),
        check("library vs the raw websockets ceiling (reported, no target)", "library", "raw", 0),
        check("library layer >= 3x stock RedisChannelLayer (best steady rate)", "library", "stock", 3),
        check("library layer >= RedisPubSubChannelLayer", "library", "pubsub", 1),
        check("mapping >= GroupConsumer", "library", "groups", 1),
        check("daphne vs uvicorn (reported, no target)", "library", "uvicorn", 0),
    ]


def meta(args) -> dict:
    from importlib.metadata import version

    import redis

    packages = ("Django", "channels", "channels-redis", "redis", "daphne", "uvicorn", "websockets", "psycopg")
    top = subprocess.run(["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python -m benchmarks.load " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "packages": {name: version(name) for name in packages},
        "redis_server": redis.Redis.from_url(args.redis).info("server").get("redis_version"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_at_start": os.getloadavg(),
        "busiest_processes_at_start": top.splitlines()[:8],
        "config": {"connections": args.connections, "tabs_per_user": args.tabs, "client_processes": args.clients,
                   "trial_seconds": args.trial_seconds, "p99_ms": args.p99_ms, "rate_limit": args.rate_limit,
                   "capacity": args.capacity or "each layer's default", "presence_broadcast": False,
                   "demo_stores_messages": not args.no_store},
    }  # fmt: skip


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(report: dict) -> None:
    rows = [("setup", "best msg/s", "copies/s", "p50 ms", "p99 ms", "server CPU", "RSS MiB", "trials")]
    for name, result in report["setups"].items():
        best = result["best"]
        tried = " ".join(f"{t['rate_target']:g}{'+' if t['passed'] else '-'}" for t in result["trials"])
        if best is None:
            rows.append((name, "none passed", "", "", "", "", "", tried))
            continue
        latency, cpu = best["latency_ms"], best["server_cpu_share_of_one_core"]
        rows.append((name, f"{best['messages_per_second']:,.0f}", f"{best['copies_per_second']:,.0f}",
                     f"{latency['p50']:.1f}", f"{latency['p99']:.1f}", f"{cpu:.0%}",
                     f"{best['server_rss_kb'] / 1024:.0f}", tried))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
    print("\ntrials: rate tried, + passed / - failed (p99 <= "
          f"{report['meta']['config']['p99_ms']:g} ms, nothing lost, no error, schedule kept)")  # fmt: skip
    if "idle" in report:
        idle = report["idle"]
        print(f"\nidle sockets on one daphne: {idle['opened']:,}/{idle['sockets']:,} open in {idle['seconds']} s "
              f"(handshake p50 {idle['handshake_p50_ms']} ms, p99 {idle['handshake_p99_ms']} ms); RSS "
              f"{idle['rss_kb_before'] / 1024:.0f} -> {idle['rss_kb_after'] / 1024:.0f} MiB, "
              f"{idle['rss_kb_per_socket']} KiB per socket")  # fmt: skip
    print()
    for target in report["targets"]:
        mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[target["met"]]
        print(f"[{mark}] {target['text']}: {target['detail']}")
    for name, error in report["failed"].items():
        print(f"could not run: {name}: {error}")


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


def cleanup(database_url, server_url, database, redis_url, prefix) -> None:
    import redis
    from django.db import connections

    from tests import processes

    with contextlib.suppress(Exception):  # best effort before the DROP (which forces anyway)
        connections.close_all()
    processes.drop_database(server_url, database)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


if __name__ == "__main__":
    sys.exit(main())
