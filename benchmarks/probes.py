"""Measuring the event loop: how late timers fire, and which callback blocked it.

``LoopLag`` is what an application feels: a task sleeping 1 ms records how late
it woke up. ``BlockingCallbacks`` says who is to blame: it times every callback
the loop runs (a task step is one callback), so a step that held the loop for
more than 5 ms is found and named by its coroutine. It wraps
``asyncio.events.Handle._run`` only while the block runs (an instrument of the
benchmark, restored on exit).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter

from channel_registry.timing import percentile


class LoopLag:
    """A task that sleeps ``interval`` seconds in a loop and records how late it wakes."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            start = clock()
            await asyncio.sleep(self.interval)
            self.lags.append(clock() - start - self.interval)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._run(), name="loop-lag probe")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def summary(self) -> dict:
        ms = [lag * 1000 for lag in self.lags]
        return {"samples": len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms, default=0.0)}


def describe(handle) -> str:
    """The coroutine behind a task step, else the callback's name."""
    callback = handle._callback
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return getattr(coro, "__qualname__", repr(coro))
    return getattr(callback, "__qualname__", repr(callback))


class BlockingCallbacks:
    """Times every callback the event loop runs while the ``with`` block is open.

    Each callback gets three figures: wall time (what the loop lost), this
    thread's CPU time, and the garbage collector's CPU within it. The dispatcher's
    own work is CPU minus GC: a long wall time with little CPU is the process
    waiting (the GIL held by a ``sync_to_async`` thread, or the OS running
    PostgreSQL, Redis or another process on the machine's cores), and a GC pause
    lands in whichever step allocated last.
    """

    def __init__(self, threshold: float = 0.005) -> None:
        self.threshold = threshold
        self.count = 0
        self.longest = 0.0
        self.longest_own = 0.0
        self.slow: Counter[str] = Counter()  # steps whose own CPU time (GC excluded) passed the threshold
        self.slow_wall = 0
        self.gc_pauses: list[tuple[float, float]] = []  # (wall, CPU) seconds
        self._gc_cpu_total = 0.0
        self._gc_started = (0.0, 0.0)
        self._original = None

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = (time.perf_counter(), time.thread_time())
        else:
            wall, cpu = time.perf_counter() - self._gc_started[0], time.thread_time() - self._gc_started[1]
            self.gc_pauses.append((wall, cpu))
            self._gc_cpu_total += cpu

    def __enter__(self) -> BlockingCallbacks:
        handle_class = asyncio.events.Handle
        original = self._original = handle_class._run
        wall, cpu = time.perf_counter, time.thread_time
        probe = self

        def timed_run(handle) -> None:
            start, start_cpu, start_gc = wall(), cpu(), probe._gc_cpu_total
            original(handle)
            spent = wall() - start
            probe.count += 1
            if spent > 0.001:
                own = cpu() - start_cpu - (probe._gc_cpu_total - start_gc)
                probe.longest = max(probe.longest, spent)
                probe.longest_own = max(probe.longest_own, own)
                if spent > probe.threshold:
                    probe.slow_wall += 1
                if own > probe.threshold:
                    probe.slow[describe(handle)] += 1

        handle_class._run = timed_run
        gc.callbacks.append(self._gc)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.events.Handle._run = self._original
        gc.callbacks.remove(self._gc)

    def summary(self) -> dict:
        return {
            "callbacks": self.count,
            "longest_ms": self.longest * 1000,
            "longest_own_cpu_ms": self.longest_own * 1000,
            "over_threshold_wall": self.slow_wall,
            "over_threshold_own_cpu": sum(self.slow.values()),
            "slowest_by_coroutine": dict(self.slow.most_common(5)),
            "gc_collections": len(self.gc_pauses),
            "gc_longest_ms": max((wall for wall, _ in self.gc_pauses), default=0.0) * 1000,
            "gc_longest_cpu_ms": max((cpu for _, cpu in self.gc_pauses), default=0.0) * 1000,
            "gc_over_threshold_cpu": sum(cpu > self.threshold for _, cpu in self.gc_pauses),
        }
