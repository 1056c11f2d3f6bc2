"""Abuse suite: what one hostile user can do to the others, against real daphne, Redis and PostgreSQL.

Each test reproduces one finding of issue 12 (the number in its docstring) and
shows it refused or bounded. The processes, the database and the clients are
those of the fault tests (``tests/test_faults.py``): real daphne serving
``demo_site``, real sessions, the ``websockets`` client.
"""

from __future__ import annotations

import os

import pytest

from . import test_faults
from .processes import HandshakeRefused

# The fault tests' fixtures: a throw-away database for the module, and a stack per test.
demo_database = test_faults.demo_database
stack = test_faults.stack

pytestmark = [
    pytest.mark.abuse,
    pytest.mark.skipif(
        os.environ.get("CR_TEST_STACK", "real") != "real",
        reason="the abuse suite runs daphne on PostgreSQL and Redis (CR_TEST_STACK=real)",
    ),
]

TRUSTED = "https://app.example.com,https://*.trusted.example"

# (Origin header, whether the socket opens). PORT is the daphne process's port; the
# page is http://127.0.0.1:PORT. None sends no Origin header at all.
ORIGINS = [
    ("http://127.0.0.1:PORT", True),
    ("https://app.example.com", True),  # CSRF_TRUSTED_ORIGINS
    ("https://chat.trusted.example", True),  # its wildcard entry
    ("http://127.0.0.1:9999", False),  # another application on the same host
    ("http://127.0.0.1", False),  # the same host on port 80
    ("https://127.0.0.1:PORT", False),  # another scheme
    ("ws://127.0.0.1:PORT", False),
    ("http://localhost:PORT", False),  # an allowed host, but not this origin
    ("http://localhost:3000", False),
    ("null", False),  # sandboxed iframes, file:// pages
    (None, False),
    ("", False),
    ("http://evil.example", False),
    ("http://127.0.0.1.evil.example:PORT", False),  # look-alike host
    ("http://127.0.0.1:PORT@evil.example", False),  # userinfo tricks
    ("http://evil.example@127.0.0.1:PORT", False),
    ("http://127.0.0.1.:PORT", False),  # trailing dot
    ("HTTP://127.0.0.1:PORT", False),  # not as a browser writes it
    ("http://127.0.0.1:0PORT", False),
    ("http://127.0.0.1:PORT/", False),
    ("http://127.0.0.1:PORT/inbox", False),
    ("http://127.0.0.1:PORT, http://evil.example", False),
    ("http://app.example.com", False),  # a trusted origin on another scheme
    ("https://app.example.com:8443", False),  # ... or port
    ("https://app.example.com.evil.example", False),
    ("https://eviltrusted.example", False),  # a suffix, not a subdomain
    ("http://chat.trusted.example", False),
    ("http://[::1]:PORT", False),
]


async def test_only_the_exact_allowed_origins_open_a_socket(stack):
    """Finding 5: host-only origin checks let other ports and schemes of an allowed host in."""
    stack.start_redis()
    stack.configure(csrf_trusted_origins=TRUSTED)
    [server] = stack.daphnes(1)
    [alice] = await stack.users("alice")

    outcomes = {}
    for template, _ in ORIGINS:
        origin = None if template is None else template.replace("PORT", str(server.port))
        try:
            tab = await stack.tab(server, alice, origin=origin)
        except HandshakeRefused as refused:
            # 403 from the validator; 400 where daphne itself rejects a malformed header first.
            assert refused.status in (400, 403), (template, refused.status)
            outcomes[template] = "refused"
            continue
        await tab.send({"type": "ping"})
        await tab.wait_for(lambda f: f.get("type") == "pong")
        outcomes[template] = "open"
        await tab.close()

    assert outcomes == {template: "open" if opens else "refused" for template, opens in ORIGINS}
    assert await stack.rows() == []  # the refused ones never reached the registry
