"""Awaiting what may lose a cancellation, without carrying on after it.

On Python 3.11 ``asyncio.wait_for`` returns the result instead of raising when a
cancellation and the result arrive together (CPython gh-86296), and redis-py
writes every command through it. A task that loops around Redis commands then
carries on after its cancellation, and whatever waits for it waits for ever: a
server's shutdown, an event loop closing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds between two cancellations of a task that lost the previous one (see ``cancellable``).
RECANCEL_INTERVAL = 0.5


async def cancellable(awaitable: Awaitable[T]) -> T:
    """``await awaitable``, except that cancelling the caller always ends the caller.

    Loops that lose a cancellation this way: channels_redis's ``receive`` (its next
    ``BZPOPMIN``; only a message ends it), Channels' dispatch loop (the next event),
    the refresh of connection slots (``registry/slots.py``). So ``awaitable`` runs in
    a task of its own, awaited through a shield: a cancelled caller leaves at once,
    and the task is cancelled again until it has ended.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Nobody awaits it now: what it ends with (often the ConnectionError of a pool
        # closed under it) would be logged as "never retrieved" when it is collected.
        task.add_done_callback(ignore_outcome)
        cancel_until_done(task)
        raise


def ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def cancel_until_done(task: asyncio.Future[Any]) -> None:
    """Cancel ``task``, and again every ``RECANCEL_INTERVAL`` seconds while it swallows that."""
    if not task.done():
        task.cancel()
        asyncio.get_running_loop().call_later(RECANCEL_INTERVAL, cancel_until_done, task)
