"""A resume-storm client in a process of its own, for the abuse suite.

    python -m tests.resume_client PORT SESSION_KEY POSITION [POSITION ...]

One loop per POSITION: open a WebSocket as the session's user with
``?since=POSITION``, wait for the answer (``recovered``, ``reset`` or a close),
close, and open again at once, never honouring a ``retry`` hint, until SIGTERM;
then prints the outcomes as JSON: ``{"recovered": n, "expired": n, "4430": n,
..., "replayed": [counts]}``. A process of its own, so its work does not delay
the measuring clients' event loop.
"""

import asyncio
import json
import os
import signal
import sys
from collections import Counter

from tests.processes import Tab


async def storm(port: int, session: str, positions: list[str]) -> dict:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    outcomes: Counter = Counter()
    replayed: list[int] = []

    async def loop(since: str) -> None:
        while True:
            tab = await Tab.open(port, session, path=f"/ws/registry/?since={since}")
            try:
                frame = await tab.wait_for(lambda f: f.get("type") in ("position", "recovered", "reset"), 10)
                outcomes[frame.get("reason") or frame["type"]] += 1
                if frame["type"] == "recovered":
                    replayed.append(frame["count"])
            except ConnectionError:
                outcomes[str(tab.close_code)] += 1
            await tab.close()

    workers = [asyncio.ensure_future(loop(since)) for since in positions]  # noqa: F841 (run until exit)
    print("ready", flush=True)
    await stop.wait()
    return {**outcomes, "replayed": replayed}


if __name__ == "__main__":
    port, session, *positions = sys.argv[1:]
    print(json.dumps(asyncio.run(storm(int(port), session, positions))), flush=True)
    # As in flood_client: exit without waiting for the workers (CPython gh-86296).
    os._exit(0)
