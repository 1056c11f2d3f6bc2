"""What one connection may send: a byte budget checked as each frame arrives, before it is parsed.

daphne reads a socket as fast as TCP delivers and queues every frame for the
consumer in an unbounded queue; only the consumer's pace bounds it. So the
consumer must never stop reading: :class:`InboundGate` reads the server's queue
in a task of its own, charges each frame to the connection's bucket and only
passes on what the bucket pays for. A frame over budget is answered at once
(``rate_limited`` with ``retry_after``) and dropped, without being charged: a
client that waits as told finds the bucket able to pay that frame. Frames the
bucket refuses before that wait is over were sent regardless; up to
``IN_FLIGHT_SHARE`` of the budget of them is refused too (frames that were on
their way when the refusal went out), the next closes the connection with
``CLOSE_TOO_FAST``. Its frames not handled yet, and what it sends until the
server reports the close, are dropped unread, and so is whatever the consumer
would still send. On daphne and uvicorn the server stops reading the socket at
once (``hangup.py``), so what the client sent after the close is not even parsed.

Once the connection is registered, each frame is also charged to its user's bucket
in this process (``INBOUND_USER_LIMIT``), shared by all of that user's connections
here: a frame is paid only if both buckets hold its cost. Fifty sockets of one
account otherwise bring fifty budgets, all read and parsed before any is closed.

A refusal by another budget (the user's ``RATE_LIMIT`` or ``FANOUT_LIMIT``)
charges the connection the wait it announced, up to a second's refill
(:meth:`InboundGate.told_to_wait`), so sending on regardless ends the same way.

The buckets live in this process: they need no Redis round trip per frame. The
connection's holds ``INBOUND_LIMIT[0]`` bytes and refills over ``INBOUND_LIMIT[1]``
seconds; every frame costs its length plus ``FRAME_COST`` (a ping is not free).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol
from .hangup import hang_up

#: What every frame costs on top of its length, in bytes: the server's own work per frame.
FRAME_COST = 1024

#: Most seconds of refill one refusal by another budget charges: enough that a client sending
#: on regardless soon runs out, little enough that its next, different frame still passes.
OWED_WAIT_MAX = 1.0

#: Share of the budget a connection may send, once refused, before the wait it was told is over:
#: what was on its way when the refusal went out. More than that, and the sender is not listening.
#: A quarter of the default budget (32 KiB) lets one frame of the largest size, or about 30 small
#: ones, follow the first refusal; a page never sends on without waiting for answers (the JS client
#: sends one frame per call, and queues none).
IN_FLIGHT_SHARE = 0.25

#: Put in the consumer's queue when the reader failed; ``receive`` raises the reader's error.
READER_FAILED: dict[str, Any] = {"type": "registry.inbound_failed"}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class InboundBucket:
    """``capacity`` bytes refilled over ``per`` seconds; owed waits may take it into debt."""

    def __init__(self, capacity: float, per: float) -> None:
        self.capacity = capacity
        self.rate = capacity / per
        self.tokens = capacity
        self.stamp = time.monotonic()

    def wait(self, cost: float) -> float:
        """Seconds until the bucket holds ``cost``; 0 if it does now."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return max(0.0, (cost - self.tokens) / self.rate)

    def spend(self, cost: float) -> None:
        self.tokens -= cost

    def owe(self, seconds: float) -> None:
        """Charge what ``seconds`` of waiting refills, at most ``OWED_WAIT_MAX`` seconds' worth."""
        self.tokens -= min(seconds, OWED_WAIT_MAX) * self.rate


#: The ``INBOUND_USER_LIMIT`` buckets of users connected to this process, each kept while a connection holds it.
_user_buckets: weakref.WeakValueDictionary[tuple[Any, tuple[float, float]], InboundBucket] = (
    weakref.WeakValueDictionary()
)


def user_bucket(user_id: Any, limit: tuple[float, float]) -> InboundBucket:
    """The bucket all of ``user_id``'s connections in this process share (one per ``limit``, should it change)."""
    key = (user_id, (limit[0], limit[1]))  # a list from settings would not hash
    bucket = _user_buckets.get(key)
    if bucket is None:
        bucket = _user_buckets[key] = InboundBucket(*limit)
    return bucket


def frame_cost(message: dict[str, Any]) -> int:
    """A frame's length (characters of text, or bytes) plus ``FRAME_COST``."""
    data = message.get("text")
    if data is None:
        data = message.get("bytes") or b""
    return len(data) + FRAME_COST


def client_id_of(message: dict[str, Any]) -> Any:
    """The ``id`` of a refused frame, so the client can match the refusal; ``None`` if unreadable.

    Parsing costs, but at most ``IN_FLIGHT_SHARE`` of a budget of refused frames is read per wait.
    """
    try:
        payload = json.loads(message.get("text") or "")
    except (ValueError, RecursionError):
        return None
    return protocol.read_client_id(payload) if isinstance(payload, dict) else None


class InboundGate:
    """Reads the server's queue without pause; passes on the frames the buckets pay for.

    ``receive`` and ``send`` are what the consumer uses instead of the server's own.
    """

    def __init__(self, receive: Receive, send: Send, limit: tuple[float, float]) -> None:
        self._server_receive = receive
        self._send = send
        self.bucket = InboundBucket(*limit)
        #: The buckets a frame is charged to: the connection's, then its user's (``share``).
        self.buckets = [self.bucket]
        #: Until when (``time.monotonic()``) the last refusal told the client to wait.
        self.wait_until = -math.inf
        #: Bytes of frames refused since then that arrived before it: sent without waiting.
        self.ignored = 0
        #: The connection is being closed for sending on regardless.
        self.closed = False
        self._passed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())
        self._reader.add_done_callback(self._reader_done)

    async def receive(self) -> dict[str, Any]:
        message = await self._passed.get()
        if message is READER_FAILED:
            self._reader.result()  # the consumer gets the reader's error
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """The server's ``send``, until the gate closed the connection; nothing after that.

        A frame paid for before the close may still be in the consumer's hands (waiting
        on Redis, say) when the hang-up drops the connection: its answer would raise
        there (daphne: autobahn's ``Disconnected``) and crash the consumer, with a
        traceback logged per socket, in the middle of the flood that got it closed.
        """
        if not self.closed:
            await self._send(message)

    def stop(self) -> None:
        self._reader.cancel()

    def share(self, bucket: InboundBucket) -> None:
        """Charge every frame from now on to ``bucket`` too: the user's, once they are known."""
        self.buckets.append(bucket)

    def told_to_wait(self, seconds: float) -> None:
        """Another budget refused a frame for ``seconds`` (``RATE_LIMIT``, ``FANOUT_LIMIT``).

        The connection is charged that wait (at most ``OWED_WAIT_MAX``): a client that
        waits as told loses nothing, one that sends on runs out of this budget, then is closed.
        """
        self.bucket.owe(seconds)

    def _reader_done(self, reader: asyncio.Future[None]) -> None:
        if not reader.cancelled() and reader.exception() is not None:
            self._passed.put_nowait(READER_FAILED)

    async def _read(self) -> None:
        while True:
            message = await self._server_receive()
            if message["type"] != "websocket.receive":
                self._passed.put_nowait(message)
                if message["type"] == "websocket.disconnect":
                    return
            elif not self.closed:
                await self._meter(message)

    async def _meter(self, message: dict[str, Any]) -> None:
        cost = frame_cost(message)
        retry_after = self._charge(cost)
        if retry_after is None:
            self._passed.put_nowait(message)
            return
        now = time.monotonic()
        self.ignored = self.ignored + cost if now < self.wait_until else 0
        if self.ignored > self.bucket.capacity * IN_FLIGHT_SHARE:
            self.closed = True
            self._drop_passed_frames()
            await self._answer({"type": "websocket.close", "code": protocol.CLOSE_TOO_FAST})
            hang_up(self._send)
            return
        self.wait_until = now + retry_after
        refusal = protocol.error_frame(
            protocol.RATE_LIMITED, "too many frames on this connection; slow down", client_id_of(message), retry_after
        )
        await self._answer({"type": "websocket.send", "text": json.dumps(refusal)})

    def _charge(self, cost: float) -> float | None:
        """Charge ``cost`` to every bucket: ``None`` if they all held it, else seconds until they would
        (nothing charged: a client that waits as told finds the frame paid)."""
        wait = max(bucket.wait(cost) for bucket in self.buckets)
        if wait > 0:
            return math.ceil(wait * 1000) / 1000
        for bucket in self.buckets:
            bucket.spend(cost)
        return None

    def _drop_passed_frames(self) -> None:
        """Frames paid for but not handled yet: not worth answering on a connection being closed."""
        kept = [message for message in self._drain() if message["type"] != "websocket.receive"]
        for message in kept:
            self._passed.put_nowait(message)

    def _drain(self) -> list[dict[str, Any]]:
        drained = []
        while not self._passed.empty():
            drained.append(self._passed.get_nowait())
        return drained

    async def _answer(self, message: dict[str, Any]) -> None:
        # A client gone meanwhile (uvicorn raises ClientDisconnected, an OSError): its
        # disconnect is what the server's queue holds next.
        with contextlib.suppress(OSError):
            await self._send(message)
