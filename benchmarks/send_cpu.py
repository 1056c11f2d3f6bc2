"""CPU time per direct message in one process: alice's socket sends, bob's two sockets receive.

    .venv/bin/python -m benchmarks.send_cpu              # 300 messages, the batched Redis layer
    .venv/bin/python -m benchmarks.send_cpu --messages 1000

Everything runs in this process (``RegistryConsumer`` through Channels' test
communicators, real Redis and PostgreSQL from benchmarks/settings.py), one
message at a time, each waited for (its ack and both copies) before the next.
``time.process_time()`` counts this process's CPU only, so the number does not
move with what other processes do to the machine, unlike a rate; Redis's and
PostgreSQL's own CPU are not in it. Prints CPU ms per message and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace


async def open_tab(user):
    from channels.testing import WebsocketCommunicator

    from channel_registry.consumers import RegistryConsumer

    tab = WebsocketCommunicator(RegistryConsumer.as_asgi(), "/ws/")
    tab.scope["user"] = user
    tab.scope["session"] = SimpleNamespace(session_key=None)
    connected, _ = await tab.connect(timeout=10)
    assert connected
    assert json.loads((await tab.receive_output(10))["text"])["type"] == "position"
    return tab


async def one_message(sender, tabs, bob, n: int) -> None:
    await sender.send_json_to({"type": "direct", "to": bob.pk, "message": f"m{n}", "id": n})
    ack = await sender.receive_json_from(10)
    assert ack["type"] == "ack", ack
    for tab in tabs:
        frame = await tab.receive_json_from(10)
        assert frame["message"] == f"m{n}", frame


async def measure(messages: int) -> dict:
    from asgiref.sync import sync_to_async
    from django.contrib.auth import get_user_model

    from .world import reset_tables

    await sync_to_async(reset_tables)()
    users = get_user_model().objects
    alice = await users.acreate(username="alice")
    bob = await users.acreate(username="bob")
    sender = await open_tab(alice)
    tabs = [await open_tab(bob), await open_tab(bob)]
    for n in range(20):  # warm up: scripts loaded, connections opened, caches filled
        await one_message(sender, tabs, bob, n)
    cpu, wall = time.process_time(), time.perf_counter()
    for n in range(messages):
        await one_message(sender, tabs, bob, n)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    for tab in [sender, *tabs]:
        await tab.disconnect()
    return {"messages": messages, "cpu_ms_per_message": 1000 * cpu / messages,
            "wall_ms_per_message": 1000 * wall / messages}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.send_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    args = parser.parse_args(argv)
    from django.conf import settings
    from django.test.utils import override_settings

    from .world import setup_django

    setup_django()
    # One sender, many messages: no frame or message rate limit, no history share; the copies
    # are paid from a bucket that never runs dry (their budget still runs in the script).
    unlimited = {"INBOUND_LIMIT": None, "RATE_LIMIT": None, "HISTORY_SENDER_SHARE": None, "FANOUT_LIMIT": (10**9, 10)}
    with override_settings(CHANNEL_REGISTRY={**settings.CHANNEL_REGISTRY, **unlimited}):
        result = asyncio.run(measure(args.messages))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
