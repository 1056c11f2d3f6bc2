"""Server-Sent Events: the registry's deliveries for clients that cannot hold a WebSocket.

An event stream is one more connection of the user: it gets its own channel,
registered like a socket, so ``send_to_user``, notifications, direct messages
and ``disconnect_user`` reach it exactly as they reach a consumer.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connections
from django.http import HttpResponse, StreamingHttpResponse
from django.views import View

from . import metrics, protocol
from .conf import registry_settings
from .delivery import budget
from .delivery.mapping import MappingStrategy
from .delivery.strategy import DeliveryStrategy, channel_layer
from .exceptions import LAYER_TRANSPORT_ERRORS, ChannelLayerUnavailable, ConnectionLimitExceeded
from .history.cursor import HISTORY_EVENTS, Cursor
from .history.log import history_for
from .models import Transport
from .origins import event_stream_allowed
from .registry.liveness import unwatch, watch
from .registry.sessions import Access

logger = logging.getLogger(__name__)

#: Milliseconds a native ``EventSource`` waits before reconnecting (the ``retry:`` hint).
RETRY_MS = 2000
#: Seconds a client should wait before opening a stream again when registration failed (503).
UNAVAILABLE_RETRY_AFTER = 5


class StreamRefused(Exception):
    """The stream could not be registered: the response ``get`` answers instead (429 or 503)."""

    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def sse_message(name: str, data, event_id: str | None = None) -> str:
    """One event in the text/event-stream format; the JSON holds no raw newline.

    ``event_id`` is the event's history position: the browser sends the last one
    back as ``Last-Event-ID`` when it reconnects. Events without one (not
    recoverable) leave the browser's last id as it was.
    """
    name = name.replace("\r", "").replace("\n", "")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    id_line = f"id: {event_id}\n" if event_id else ""
    return f"{id_line}event: {name}\ndata: {payload}\n\n"


def disconnect_message(code: int) -> str:
    """The stream's last event: the close code a socket would have got."""
    return sse_message("disconnect", {"type": "disconnect", "code": code})


async def on_shared_thread(coroutine):
    """Await ``coroutine`` outside this request's ``ThreadSensitiveContext``.

    Django's ASGI handler gives every request a sync thread of its own, and a
    database connection opened there stays open until the response ends: for an
    event stream, hours. Outside it the registry uses the process's shared
    database thread, as consumers do, and the heartbeat task it may start is not
    tied to this request.
    """
    return await asyncio.create_task(coroutine, context=contextvars.Context())


def refusal(status: int, code: str, detail: str, retry_after: int | None = None) -> HttpResponse:
    """A stream refused before it opened: the status, and the same ``error`` frame a socket would get.

    403 (a page of another origin) is final, and so is 429 without ``Retry-After``
    (over the connection limit): opening again only works once another connection
    closed. 429 with it (over the handshake or resume budget) and 503 are retried after it.
    """
    metrics.connection_refused(Transport.STREAM, code)
    response = HttpResponse(json.dumps(protocol.error_frame(code, detail)), status=status,
                            content_type="application/json")  # fmt: skip
    if status == 503:
        retry_after = UNAVAILABLE_RETRY_AFTER
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def signed_in_access(request) -> Access | None:
    """What the request is let in with, or ``None`` when anonymous; sync, as ``request.auser()`` needs Django 5.0."""
    user = request.user
    if not user.is_authenticated:
        return None
    return Access.of(user, getattr(getattr(request, "session", None), "session_key", None))


class EventStreamView(View):
    """``text/event-stream`` of everything delivered to the signed-in user.

    A request from a page of another origin gets 403 (``origins.event_stream_allowed``:
    the WebSocket origin rule), anonymous requests 401; over ``MAX_CONNECTIONS_PER_USER``
    429, and 503 with ``Retry-After`` while the registry cannot be written, all at once.
    Each Channels event becomes one SSE event: ``registry.notify`` → ``notification``,
    ``registry.direct`` → ``direct`` (the same JSON frames a socket receives), ``registry.disconnect`` → a last
    ``disconnect`` event carrying the close code, then the stream ends; any other
    type is passed on under its own name with the event as data. ``groups``
    works like a consumer's: the stream joins them while it is open.
    """

    http_method_names = ["get"]
    strategy: DeliveryStrategy = MappingStrategy()
    groups: list[str] = []

    async def get(self, request):
        # Before the session is read: another page's request learns nothing, holds nothing.
        if not event_stream_allowed(request):
            return refusal(403, protocol.FORBIDDEN, "event streams are only for this site's own pages")
        access = await sync_to_async(signed_in_access)(request)
        if access is None:
            return HttpResponse("Authentication required.", status=401, content_type="text/plain")
        # The browser's own reconnects send Last-Event-ID; a client opening a new stream passes ?since=.
        since = request.headers.get("Last-Event-ID") or request.GET.get("since")
        try:
            await self.pay_handshake(access.user_id, since is not None)
            events = await self.opened(self.stream(access, since))
        except StreamRefused as refused:
            return refused.response
        response = StreamingHttpResponse(events, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        # nginx buffers proxied responses by default, which would hold events back.
        response["X-Accel-Buffering"] = "no"
        return response

    async def pay_handshake(self, user_id, resuming: bool) -> None:
        """The user's handshake and resume budgets, as a socket pays them; ``StreamRefused`` (429, 503) if not."""
        try:
            verdict = await budget.spend(channel_layer(), user_id, budget.connection_costs(resuming))
        except ChannelLayerUnavailable:
            detail = "the server cannot open event streams right now"
            raise StreamRefused(refusal(503, protocol.UNAVAILABLE, detail)) from None
        if not verdict.allowed:
            detail = "too many connections opened; retry after Retry-After seconds"
            raise StreamRefused(refusal(429, protocol.RATE_LIMITED, detail, await budget.held_back(verdict)))

    async def opened(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``events`` with its first step (registration) already run, so a refusal still gets a status.

        Registered inside the generator, a stream over ``MAX_CONNECTIONS_PER_USER``
        had already promised a 200: the client waited for a status line that
        never came. Run here, the refusal becomes an answer the client can act on.
        """
        try:
            first = await anext(events)
        except StopAsyncIteration:
            detail = "the server cannot open event streams right now"
            raise StreamRefused(refusal(503, protocol.UNAVAILABLE, detail)) from None
        except ConnectionLimitExceeded:
            raise StreamRefused(refusal(429, protocol.TOO_MANY_CONNECTIONS, "too many open connections")) from None

        async def resumed() -> AsyncIterator[str]:
            async with aclosing(events):
                yield first
                async for chunk in events:
                    yield chunk

        return resumed()

    async def stream(self, access: Access, since: str | None = None) -> AsyncIterator[str]:
        """Register, relay events until the client leaves, and unregister in every case.

        Registration happens here rather than in ``get`` so the generator that
        unregisters is the one that registered: a response never iterated leaves
        no row behind. The client's "open" is the ``retry:`` line, sent once the
        stream is reachable. A session that ended between the middleware and the
        registration gets that line and a ``disconnect`` event with the close code.
        """
        user_id, session_key = access.user_id, access.session_key or None
        # Sessions and auth (in the middleware, or above) used this request's thread.
        await sync_to_async(connections.close_all)()
        layer = channel_layer()
        channel = await layer.new_channel()
        try:
            await on_shared_thread(self.strategy.register(user_id, channel, session_key, Transport.STREAM))
        except (DatabaseError, ChannelLayerUnavailable):
            logger.exception("channel_registry: could not register event stream %s", channel)
            return
        try:
            ended = await on_shared_thread(watch(channel, access))
            if ended is not None:
                yield f"retry: {RETRY_MS}\n\n"
                yield disconnect_message(ended)
                return
            for group in self.groups:
                await layer.group_add(group, channel)
            history = history_for(layer)
            cursor = Cursor(history, user_id) if history else None
            first = await cursor.start(since) if cursor else []
            yield f"retry: {RETRY_MS}\n\n"
            for event in first:
                yield self.sse(event)
            metrics.connection_opened(Transport.STREAM, self)
            try:
                async with aclosing(self.relay(layer, channel, cursor)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            finally:
                metrics.connection_closed(Transport.STREAM, self, metrics.NO_CLOSE_CODE)
        except ChannelLayerUnavailable:
            logger.warning("channel_registry: history unavailable for event stream %s", channel, exc_info=True)
        finally:
            await self.leave(user_id, layer, channel, session_key)

    async def relay(self, layer, channel: str, cursor: Cursor | None = None) -> AsyncIterator[str]:
        """Events as SSE text, with a comment whenever ``SSE_HEARTBEAT`` seconds pass quietly.

        One ``receive`` stays pending across heartbeats: cancelling a layer's
        receive mid-read can lose the message it was reading.
        """
        pending = None
        try:
            while True:
                pending = pending or asyncio.ensure_future(layer.receive(channel))
                done, _ = await asyncio.wait({pending}, timeout=registry_settings().SSE_HEARTBEAT)
                if not done:
                    yield ": heartbeat\n\n"
                    continue
                event, pending = pending.result(), None
                if event["type"] == protocol.DISCONNECT_EVENT:
                    yield disconnect_message(event.get("code", protocol.CLOSE_FORBIDDEN))
                    return
                for admitted in await cursor.admit(event) if cursor else [event]:
                    yield self.sse(admitted)
        finally:
            if pending is not None:
                pending.cancel()

    def sse(self, event: dict) -> str:
        name, data = self.encode(event)
        if event["type"] in HISTORY_EVENTS:
            return sse_message(name, data, f"{event['epoch']}:{event['seq']}")
        position = event.get(protocol.POSITION_KEY)
        return sse_message(name, data, f"{position[0]}:{position[1]}" if isinstance(position, list) else None)

    def encode(self, event: dict) -> tuple[str, object]:
        """The SSE event name and data for one Channels event; override to add types."""
        if event["type"] == protocol.NOTIFY_EVENT:
            return "notification", protocol.with_position(protocol.notification_frame(event["data"]), event)
        if event["type"] == protocol.DIRECT_EVENT:
            return "direct", protocol.with_position(event["frame"], event)
        if event["type"] in HISTORY_EVENTS:
            frame = protocol.history_frame(event)
            return frame["type"], frame
        return event["type"], protocol.with_position(event, event)

    async def leave(self, user_id, layer, channel: str, session_key: str | None) -> None:
        """Unregister first: presence and delivery read the row; a group membership only expires."""
        unwatch(channel)
        try:
            await on_shared_thread(self.strategy.unregister(user_id, channel, session_key))
            for group in self.groups:
                await layer.group_discard(group, channel)
        except (DatabaseError, ChannelLayerUnavailable, *LAYER_TRANSPORT_ERRORS):
            # The row turns stale and prune_channels removes it.
            logger.warning("channel_registry: could not unregister event stream %s", channel, exc_info=True)
