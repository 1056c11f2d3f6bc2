"""Hanging up on a client that keeps sending after its connection was closed.

After ``websocket.close`` both servers keep reading the socket until the client's
own close frame arrives: daphne (autobahn) for up to its 1 s close handshake
timeout, uvicorn for up to 10 s. A client that floods has megabytes in the
kernel's buffers ahead of that close frame, and the server parses every byte of
them, starving every other connection of its event loop. ASGI has no message
that says "stop reading", so :func:`hang_up` reaches the connection's transport
through the ``send`` callable the server gave the application, for the servers
it knows:

* daphne: ``send`` is ``functools.partial(Server.handle_reply, protocol)``;
  the protocol's ``transport`` is Twisted's (``pauseProducing``, ``abortConnection``).
* uvicorn: ``send`` is its protocol's bound ``send``; the protocol's
  ``transport`` is an :class:`asyncio.Transport` (``pause_reading``, ``abort``).

Under middleware that wraps ``send`` the server's own is found through
``__wrapped__`` (set by ``functools.wraps``) and through Channels' session
middleware, which keeps it as ``real_send``; a wrapper with neither hides it.
On any other server nothing happens: the close handshake runs its course as
that server has it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any

#: Seconds between no longer reading a connection and dropping it: time for the close frame to
#: reach the client. Dropping a socket with unread data sends a reset, and a client still
#: writing when the reset arrives may lose what it had not read yet.
DROP_AFTER = 1.0

#: How to end a connection: (stop reading it, drop it).
Hangup = tuple[Callable[[], object], Callable[[], object]]


def hang_up(send: Callable[..., Any]) -> bool:
    """Stop reading the connection behind ``send`` at once; drop it ``DROP_AFTER`` seconds later.

    Call after ``websocket.close``: the close frame is on its way, the client's
    frames after it are never parsed. Whether the server was one this module knows.
    """
    send = server_send(send)
    hangup = _twisted_hangup(send) or _asyncio_hangup(send)
    if hangup is None:
        return False
    stop_reading, drop = hangup
    stop_reading()
    asyncio.get_running_loop().call_later(DROP_AFTER, drop)
    return True


def server_send(send: Callable[..., Any]) -> Callable[..., Any]:
    """The server's own ``send`` under the middleware that wrapped it (see the module's docstring)."""
    while True:
        send = inspect.unwrap(send)
        inner = getattr(getattr(send, "__self__", None), "real_send", None)
        if inner is None:
            return send
        send = inner


def _twisted_hangup(send: Callable[..., Any]) -> Hangup | None:
    """daphne: the protocol is the first argument bound to ``send``, its transport Twisted's."""
    if not (isinstance(send, functools.partial) and send.args):
        return None
    transport = getattr(send.args[0], "transport", None)
    pause, abort = getattr(transport, "pauseProducing", None), getattr(transport, "abortConnection", None)
    if not (callable(pause) and callable(abort)):
        return None
    return pause, abort


def _asyncio_hangup(send: Callable[..., Any]) -> Hangup | None:
    """uvicorn: ``send`` is a method of the protocol, whose transport is asyncio's."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not isinstance(transport, asyncio.Transport):
        return None
    return transport.pause_reading, transport.abort
