"""Redis PING latency measured from a process of its own, for the abuse suite.

    python -m tests.redis_pinger REDIS_URL INTERVAL

PINGs every INTERVAL seconds until SIGTERM, then prints the latencies (ms) as a JSON list.
A process of its own, so the measuring test's event loop (and its GIL) adds nothing.
"""

import json
import signal
import sys
import time

from redis import Redis


def main(url: str, interval: float) -> None:
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    client, latencies = Redis.from_url(url), []
    print("ready", flush=True)
    while not stopped:
        started = time.perf_counter()
        client.ping()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(interval)
    print(json.dumps(latencies), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
