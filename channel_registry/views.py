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
from django.db import connections
from django.http import HttpResponse, StreamingHttpResponse
from django.views import View

from . import metrics, protocol
from .conf import registry_settings
from .connection import ConnectionSession, Refused
from .delivery.mapping import MappingStrategy
from .delivery.strategy import DeliveryStrategy, channel_layer
from .history.cursor import HISTORY_EVENTS
from .models import Transport
from .origins import event_stream_allowed
from .registry.sessions import Access

logger = logging.getLogger(__name__)

#: Milliseconds a native ``EventSource`` waits before reconnecting (the ``retry:`` hint).
RETRY_MS = 2000
#: Seconds a client should wait before opening a stream again when registration failed (503).
UNAVAILABLE_RETRY_AFTER = 5


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


#: The close codes of a refused session that a stream answers with a status (and an ``error`` frame) instead
#: of opening; any other (an access that ended) opens the stream with just a ``disconnect`` event.
REFUSALS = {
    protocol.CLOSE_RETRY_LATER: (
        429,
        protocol.RATE_LIMITED,
        "too many connections opened; retry after Retry-After seconds",
    ),
    protocol.CLOSE_TOO_MANY: (429, protocol.TOO_MANY_CONNECTIONS, "too many open connections"),
    protocol.CLOSE_UNAVAILABLE: (503, protocol.UNAVAILABLE, "the server cannot open event streams right now"),
}


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
            events = await self.opened(self.stream(access, since))
        except Refused as refused:
            return refusal(*REFUSALS[refused.code], refused.retry_after)
        response = StreamingHttpResponse(events, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        # nginx buffers proxied responses by default, which would hold events back.
        response["X-Accel-Buffering"] = "no"
        return response

    async def opened(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``events`` with its first step (opening the session) already run, so a refusal still gets a status.

        Opened inside the generator, a stream over ``MAX_CONNECTIONS_PER_USER``
        had already promised a 200: the client waited for a status line that
        never came. Run here, the refusal (``Refused``) becomes an answer the client can act on.
        """
        first = await anext(events)

        async def resumed() -> AsyncIterator[str]:
            async with aclosing(events):
                yield first
                async for chunk in events:
                    yield chunk

        return resumed()

    async def stream(self, access: Access, since: str | None = None) -> AsyncIterator[str]:
        """Open a connection session, relay events until the client leaves, and close it in every case.

        The session opens here rather than in ``get`` so the generator that
        unregisters is the one that registered: a response never iterated leaves
        no row behind. A refusal ``get`` answers with a status is raised as
        ``Refused``. The client's "open" is the ``retry:`` line, sent once the
        stream is reachable. A session that ended between the middleware and the
        registration gets that line and a ``disconnect`` event with the close code.
        """
        # Sessions and auth (in the middleware, or above) used this request's thread.
        await sync_to_async(connections.close_all)()
        channel = await channel_layer().new_channel()
        session = ConnectionSession(
            self.strategy, channel, access, Transport.STREAM, self, groups=self.groups, hop=on_shared_thread
        )
        try:
            try:
                first = await session.open(since)
            except Refused as refused:
                if refused.code in REFUSALS:
                    raise
                yield f"retry: {RETRY_MS}\n\n"
                yield disconnect_message(refused.code)
                return
            yield f"retry: {RETRY_MS}\n\n"
            for event in first:
                yield self.sse(event)
            async with aclosing(self.relay(session)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            await session.close()

    async def relay(self, session: ConnectionSession) -> AsyncIterator[str]:
        """Events as SSE text, with a comment whenever ``SSE_HEARTBEAT`` seconds pass quietly.

        One ``receive`` stays pending across heartbeats: cancelling a layer's
        receive mid-read can lose the message it was reading.
        """
        pending = None
        try:
            while True:
                pending = pending or asyncio.ensure_future(session.layer.receive(session.channel_name))
                done, _ = await asyncio.wait({pending}, timeout=registry_settings().SSE_HEARTBEAT)
                if not done:
                    yield ": heartbeat\n\n"
                    continue
                event, pending = pending.result(), None
                if event["type"] == protocol.DISCONNECT_EVENT:
                    yield disconnect_message(event.get("code", protocol.CLOSE_FORBIDDEN))
                    return
                for admitted in await session.admit(event):
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
