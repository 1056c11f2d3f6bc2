"""Helpers for testing code that uses channel_registry, in any test runner.

- :class:`RegistryCommunicator` — Channels' ``WebsocketCommunicator`` that speaks the
  wire protocol: ``connect()`` reads the history frame every connection starts with
  (``protocol_version`` is the version it announces), and ``receive_notification()``,
  ``send_direct()`` … check each frame's type and fail with the frame they got instead.
- :func:`in_memory_channel_layers` — run the registry on Channels' in-memory layer
  (no Redis); the registry's history lives in the process there.
- :func:`close_channel_layers` — close the layers' connections before a test's event
  loop closes, and forget the layer instances bound to it.

``channel_registry.pytest_plugin`` wraps them as pytest fixtures that close everything
a test opened. docs/testing.md has an example.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlencode

from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test.utils import override_settings

from .conf import registry_settings
from .delivery.strategy import channel_layer
from .history.log import history_for

#: The frames a connection's history starts with (docs/protocol.md).
START_FRAMES = frozenset({"position", "recovered", "reset"})
#: Longest wait for a layer's connections to close, in seconds.
CLOSE_TIMEOUT = 3
#: A ``CHANNEL_LAYERS`` entry for Channels' in-process layer.
IN_MEMORY_LAYER = {"BACKEND": "channels.layers.InMemoryChannelLayer"}


class RegistryCommunicator(WebsocketCommunicator):
    """A test client for ``RegistryConsumer`` (or your subclass of it) that knows its protocol.

    ``user`` goes into the scope, as ``AuthMiddlewareStack`` would put it there; leave it
    out to authenticate through your own middleware (cookies in ``headers``). ``since``
    is a position (``"<epoch>:<seq>"``, e.g. another communicator's ``position``) to
    resume from. ``timeout`` is how long each receive waits, in seconds (an attribute:
    raise it for one slow answer). A receive that times out fails; as in Channels, the
    application is cancelled then.

    Also an async context manager: ``async with RegistryCommunicator(...) as socket``
    connects, fails unless the socket was accepted, and disconnects at the end even
    when the test fails.
    """

    def __init__(
        self,
        application: Any,
        path: str = "/ws/",
        *,
        user: Any = None,
        since: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        timeout: float = 1,
    ) -> None:
        if since is not None:
            path += ("&" if "?" in path else "?") + urlencode({"since": since})
        super().__init__(application, path, headers=headers)
        if user is not None:
            self.scope["user"] = user
        self.timeout = timeout
        #: The ``position``, ``recovered`` or ``reset`` frame the connection started with.
        self.start: dict[str, Any] | None = None
        #: The events the server replayed before ``recovered`` (resuming with ``since``).
        self.replayed: list[dict[str, Any]] = []
        #: ``"<epoch>:<seq>"`` of the newest frame that carried one: pass it as ``since``.
        self.position: str | None = None
        #: The close code of a refused connection.
        self.refused: int | None = None

    async def connect(self, timeout: float | None = None) -> tuple[bool, Any]:  # noqa: ASYNC109 (Channels' signature)
        """``(True, subprotocol)`` once the history's first frame has been read; ``(False,
        close code)`` when the socket was refused — the registry accepts, then closes with
        4401 (not signed in), 4429 (too many connections) or 4503 (unavailable)."""
        timeout = self.timeout if timeout is None else timeout
        accepted, subprotocol = await super().connect(timeout)
        if accepted and (history_for(channel_layer()) is not None or self._closing()):
            output = await self.receive_output(timeout)
            if output["type"] != "websocket.close":
                await self._read_start(decode(output, "a history frame"))
                return True, subprotocol
            accepted, subprotocol = False, output.get("code", 1000)
        if not accepted:
            self.refused = subprotocol  # Channels returns the close code there
        return accepted, subprotocol

    def _closing(self) -> bool:
        """Whether a close waits right behind the accept: the registry sends both at once to refuse."""
        queued = []
        while not self.output_queue.empty():
            queued.append(self.output_queue.get_nowait())
        for output in queued:
            self.output_queue.put_nowait(output)
        return bool(queued) and queued[0]["type"] == "websocket.close"

    async def _read_start(self, frame: dict[str, Any]) -> None:
        while frame.get("type") not in START_FRAMES:
            self.replayed.append(self._remember(frame))
            frame = await self._receive("a history frame")
        self.start = self._remember(frame)

    @property
    def protocol_version(self) -> str | None:
        """The wire protocol version the server announced in the connection's history frame
        (``protocol.PROTOCOL_VERSION``); ``None`` before ``connect()`` or without a history."""
        return None if self.start is None else self.start.get("protocol")

    async def __aenter__(self) -> RegistryCommunicator:
        accepted, detail = await self.connect()
        if not accepted:
            await self.aclose()
            raise AssertionError(f"the socket was refused with close code {detail}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect if the application still runs; never raises (for clean-ups)."""
        if self._future is None or self._future.done():
            return
        with contextlib.suppress(Exception):
            await self.disconnect(timeout=self.timeout)

    async def receive_frame(self) -> dict[str, Any]:
        """The next frame, whatever its type; fails if the socket closed or nothing came in ``timeout``."""
        return await self._receive("a frame")

    async def receive_notification(self) -> dict[str, Any]:
        """The next frame, which must be a ``notification`` (its ``data`` is what was sent)."""
        return await self._receive_type("notification")

    async def receive_direct(self) -> dict[str, Any]:
        """The next frame, which must be a ``direct`` message from another user."""
        return await self._receive_type("direct")

    async def receive_ack(self) -> dict[str, Any]:
        """The next frame, which must be the ``ack`` of a ``send_direct``."""
        return await self._receive_type("ack")

    async def receive_error(self, code: str | None = None) -> dict[str, Any]:
        """The next frame, which must be an ``error`` (with that ``code``, if given)."""
        frame = await self._receive_type("error")
        check(code is None or frame.get("code") == code, f"expected an error {code!r}, got {frame!r}")
        return frame

    async def _receive_type(self, expected: str) -> dict[str, Any]:
        what = f"a frame of type {expected!r}"
        frame = await self._receive(what)
        check(frame.get("type") == expected, f"expected {what}, got {frame!r}")
        return frame

    async def _receive(self, what: str) -> dict[str, Any]:
        try:
            output = await self.receive_output(self.timeout)
        except TimeoutError:
            raise AssertionError(f"expected {what}, nothing arrived within {self.timeout} s") from None
        return self._remember(decode(output, what))

    async def send_direct(self, to: Any, message: Any, id: str | int | None = None) -> None:
        """Send a direct message to ``to`` (a user or a primary key); read the answer with ``receive_ack``."""
        frame = {"type": "direct", "to": getattr(to, "pk", to), "message": message}
        if id is not None:
            frame["id"] = id
        await self.send_json_to(frame)

    async def receive_nothing(self, timeout: float = 0.1, interval: float = 0.01) -> bool:  # noqa: ASYNC109
        """Fails, showing what arrived, unless nothing arrives within ``timeout`` seconds."""
        if await super().receive_nothing(timeout, interval):
            return True
        output = self.output_queue.get_nowait()
        raise AssertionError(f"expected nothing, got {describe(output)}")

    def _remember(self, frame: dict[str, Any]) -> dict[str, Any]:
        if "epoch" in frame and "seq" in frame:
            self.position = f"{frame['epoch']}:{frame['seq']}"
        return frame


def decode(output: dict[str, Any], what: str) -> dict[str, Any]:
    """The JSON object a ``websocket.send`` message carries; on anything else, fails saying it expected ``what``."""
    check(output.get("type") == "websocket.send" and "text" in output, f"expected {what}, got {describe(output)}")
    frame = json.loads(output["text"])
    check(isinstance(frame, dict), f"expected {what}, got {frame!r}")
    return frame


def check(condition: bool, message: str) -> None:
    """``assert`` that ``python -O`` does not remove: these checks are what the helpers are for."""
    if not condition:
        raise AssertionError(message)


def describe(output: dict[str, Any]) -> str:
    """An ASGI message as a failure message shows it: the frame, or the close and its code."""
    if output.get("type") == "websocket.close":
        return f"the socket closed with code {output.get('code', 1000)}"
    if output.get("type") == "websocket.send" and "text" in output:
        return output["text"]
    return repr(output)


def in_memory_channel_layers() -> override_settings:
    """Django's ``override_settings`` putting every ``CHANNEL_LAYERS`` alias on the in-memory layer.

    Use it as a decorator or a ``with`` block. Channels drops its layer instances when
    the setting changes, and again when it is restored, so each use starts empty. The
    registry works there as on Redis, in one process: its history, budgets and
    delivery live in memory.
    """
    aliases = {*getattr(settings, "CHANNEL_LAYERS", {}), registry_settings().CHANNEL_LAYER}
    return override_settings(CHANNEL_LAYERS={alias: IN_MEMORY_LAYER for alias in aliases})


async def close_channel_layers() -> None:
    """Close the channel layers' connections on this event loop and forget the layer instances.

    channels_redis keeps a connection pool, and a receive lock, per layer instance and
    event loop; a test's loop is gone after the test, so the next test should get new
    instances. Call it at the end of each async test (the pytest fixtures do).
    """
    layers = list(channel_layers.backends.values())
    channel_layers.backends = {}
    for layer in layers:
        close = getattr(layer, "close_pools", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), CLOSE_TIMEOUT)
