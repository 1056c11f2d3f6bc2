"""ASGI middleware for the WebSocket routes."""

from __future__ import annotations

import functools
import logging
from typing import Any

from django.db import DatabaseError

from .protocol import CLOSE_UNAVAILABLE

logger = logging.getLogger(__name__)


class CloseOnDatabaseError:
    """Turn a database outage during a WebSocket handshake into accept + close 4503.

    Channels' ``AuthMiddlewareStack`` loads the session and the user from the
    database before any consumer runs; while the database is down that raises,
    daphne answers HTTP 500, and the browser only sees 1006 — a network drop,
    retried at once. Wrap the auth stack in this so the client sees 4503 (retry later) instead:

        StrictOriginValidator(CloseOnDatabaseError(AuthMiddlewareStack(router)))
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        answered = False

        @functools.wraps(send)  # hangup.py finds the server's own send through it
        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal answered
            answered = answered or message["type"] in ("websocket.accept", "websocket.close")
            await send(message)

        try:
            return await self.app(scope, receive, tracking_send)
        except DatabaseError:
            if answered:
                raise
            logger.warning("channel_registry: database unavailable during a WebSocket handshake", exc_info=True)
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": CLOSE_UNAVAILABLE})
