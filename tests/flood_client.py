"""A flooding client in a process of its own, for the abuse suite.

    python -m tests.flood_client PORT SESSION_KEY RECIPIENT_ID SOCKETS [MODE] [PATH]

Opens SOCKETS WebSockets as the session's user on PATH (default ``/ws/registry/``)
and sends direct frames to RECIPIENT_ID on each until SIGTERM, then prints what
it got as JSON. MODE ``answered`` (the default): a 200-byte frame as soon as the
previous one is answered; prints the answers by kind. ``blast``: 15 KB frames
back to back, as fast as TCP takes them, without waiting for answers; prints the
frames sent and each socket's close code. A process of its own, so its work does
not delay the measuring clients' event loop.
"""

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections import Counter

from tests.processes import Tab

BLAST_MESSAGE = "x" * 15_000


async def answered(tab: Tab, n: int, to: int, answers: Counter) -> None:
    for i in itertools.count():
        frame_id = f"f{n}.{i}"
        await tab.send({"type": "direct", "to": to, "message": "x" * 200, "id": frame_id})
        reply = await tab.wait_for(lambda f, i=frame_id: f.get("id") == i and f["type"] in ("ack", "error"), 30)
        answers[reply.get("code", "ack")] += 1


async def blast(tab: Tab, n: int, to: int, answers: Counter) -> None:
    text = json.dumps({"type": "direct", "to": to, "message": BLAST_MESSAGE})
    with contextlib.suppress(Exception):  # the server closed the socket
        while True:
            await tab.ws.send(text)
            answers["sent"] += 1


async def flood(port: int, session: str, to: int, sockets: int, mode: str, path: str) -> Counter:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tabs = [await Tab.open(port, session, path=path, label=f"flood{n}") for n in range(sockets)]
    answers: Counter = Counter()
    print("ready", flush=True)
    work = answered if mode == "answered" else blast
    workers = [asyncio.ensure_future(work(tab, n, to, answers)) for n, tab in enumerate(tabs)]  # noqa: F841
    await stop.wait()
    if mode == "blast":
        answers.update(f"closed {tab.close_code}" if tab.closed.is_set() else "open" for tab in tabs)
    return answers


if __name__ == "__main__":
    port, session, to, sockets, *rest = sys.argv[1:]
    mode = rest[0] if rest else "answered"
    path = rest[1] if len(rest) > 1 else "/ws/registry/"
    answers = asyncio.run(flood(int(port), session, int(to), int(sockets), mode, path))
    print(json.dumps(answers), flush=True)
    # Exit without waiting for the workers: on Python 3.11 a cancellation can be lost inside
    # asyncio.wait_for (CPython gh-86296), and the server sees the sockets drop either way.
    os._exit(0)
