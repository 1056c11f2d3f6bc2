"""A flooding client in a process of its own, for the abuse suite.

    python -m tests.flood_client PORT SESSION_KEY RECIPIENT_ID SOCKETS

Opens SOCKETS WebSockets as the session's user and sends direct frames to
RECIPIENT_ID back to back on each (the next one as soon as the previous one is
answered) until SIGTERM; then prints the answers by kind as JSON. A process of
its own, so its work does not delay the measuring clients' event loop.
"""

import asyncio
import itertools
import json
import os
import signal
import sys
from collections import Counter

from tests.processes import Tab


async def flood(port: int, session: str, to: int, sockets: int) -> Counter:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tabs = [await Tab.open(port, session, label=f"flood{n}") for n in range(sockets)]
    answers: Counter = Counter()
    print("ready", flush=True)

    async def one(tab: Tab, n: int) -> None:
        for i in itertools.count():
            frame_id = f"f{n}.{i}"
            await tab.send({"type": "direct", "to": to, "message": "x" * 200, "id": frame_id})
            reply = await tab.wait_for(lambda f, i=frame_id: f.get("id") == i and f["type"] in ("ack", "error"), 30)
            answers[reply.get("code", "ack")] += 1

    workers = [asyncio.ensure_future(one(tab, n)) for n, tab in enumerate(tabs)]  # noqa: F841 (run until exit)
    await stop.wait()
    return answers


if __name__ == "__main__":
    port, session, to, sockets = sys.argv[1:5]
    answers = asyncio.run(flood(int(port), session, int(to), int(sockets)))
    print(json.dumps(answers), flush=True)
    # Exit without waiting for the workers: on Python 3.11 a cancellation can be lost inside
    # asyncio.wait_for (CPython gh-86296), and the server sees the sockets drop either way.
    os._exit(0)
