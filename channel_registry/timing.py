"""Timing awaited calls and summarising the durations: ``compare_strategies`` and ``make bench`` share it."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping

Call = Callable[[int], Awaitable[object]]
Between = Callable[[], Awaitable[object]]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(seconds: list[float]) -> dict[str, float]:
    """p50/p99/mean/max of durations given in seconds, reported in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms) if ms else math.nan,
        "max": max(ms) if ms else math.nan,
    }


async def sample(
    call: Call, iterations: int, *, warmup: int = 0, rounds: int = 1, between: Between | None = None
) -> list[float]:
    """Time ``iterations`` awaited calls (split in ``rounds``), after ``warmup`` untimed ones.

    ``between`` runs untimed after the warm-up and after every round (draining
    the receiving keys, for instance).
    """
    for i in range(warmup):
        await call(i)
    if between is not None:
        await between()
    durations: list[float] = []
    per_round = max(1, iterations // rounds)
    clock = time.perf_counter
    i = 0
    while i < iterations:
        for _ in range(min(per_round, iterations - i)):
            start = clock()
            await call(i)
            durations.append(clock() - start)
            i += 1
        if between is not None:
            await between()
    return durations


async def interleaved(
    calls: Mapping[str, Call],
    iterations: int,
    *,
    rounds: int = 50,
    between: Between | None = None,
    warmup: int | None = None,
) -> dict[str, list[float]]:
    """Time each call ``iterations`` times, taking turns in short ``rounds`` so that drift (another
    process busy on the machine, a cache warming up) hits all alike; after ``warmup`` untimed calls
    of each (by default a tenth of ``iterations``, at least 20)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    rounds = max(1, min(rounds, iterations))
    per_round = max(1, iterations // rounds)
    for call in calls.values():  # connections, prepared scripts, caches
        await sample(call, 0, warmup=max(20, iterations // 10) if warmup is None else warmup, between=between)
    order = list(calls.items())
    for _ in range(rounds):
        for name, call in order:
            times[name] += await sample(call, per_round, between=between)
        order.reverse()  # neither goes first every time
    return times
