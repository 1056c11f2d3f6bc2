"""The ceiling of ``make load``: a bare ``websockets`` asyncio server doing what the rivals do, without ASGI.

    python -m benchmarks.raw_server --port 8001     # with tests.fault_settings' environment

The same frames as ``benchmarks/rivals.py`` (see there); a socket signs in with
its session cookie, looked up once at the handshake through Django's session
store, and each direct message goes straight to the recipient's sockets of this
process. No channel layer, no thread hop: what Python itself costs per message.
Any plain HTTP request gets ``200 OK`` (the harness's readiness check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import defaultdict
from http import HTTPStatus
from http.cookies import SimpleCookie

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

from tests.processes import AsgiServer

#: user id -> that user's open sockets.
sockets: defaultdict[int, set[ServerConnection]] = defaultdict(set)


def user_of(session_key: str) -> int | None:
    """The signed-in user of a session, as Django's ``get_user`` reads it (without the auth hash check)."""
    from django.contrib.auth import SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    user_id = SessionStore(session_key).get(SESSION_KEY)
    return int(user_id) if user_id is not None else None


async def plain_http(connection: ServerConnection, request: Request) -> Response | None:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return connection.respond(HTTPStatus.OK, "raw websockets server\n")
    return None


async def handle(connection: ServerConnection) -> None:
    cookie = SimpleCookie(connection.request.headers.get("Cookie", "") if connection.request else "")
    session = cookie.get("sessionid")
    user_id = await asyncio.to_thread(user_of, session.value) if session else None
    if user_id is None:
        await connection.close(4401)
        return
    sockets[user_id].add(connection)
    try:
        async for text in connection:
            frame = json.loads(text)
            direct = json.dumps({"type": "direct", "from": user_id, "message": frame["message"]})
            recipients = sockets.get(frame["to"], ())
            broadcast(recipients, direct)  # websockets' own fan-out: no await per copy, closed sockets skipped
            await connection.send(json.dumps({"type": "ack", "id": frame["id"], "delivered": len(recipients)}))
    finally:
        sockets[user_id].discard(connection)


async def serve_forever(port: int) -> None:
    async with serve(handle, "127.0.0.1", port, process_request=plain_http, compression=None,
                     ping_interval=None, max_size=None, max_queue=None) as server:  # fmt: skip
        await server.serve_forever()


class RawServer(AsgiServer):
    """This module as a server process of the harness (``tests/processes.py``); ``application`` is unused."""

    kind = "raw"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.raw_server", "--port", str(self.port)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.fault_settings")
    import django

    django.setup()
    asyncio.run(serve_forever(port))


if __name__ == "__main__":
    main()
