"""A WebSocket origin check that compares scheme, host and port, like Django's CSRF check.

Channels' ``AllowedHostsOriginValidator`` compares host names only: a page on
``http://127.0.0.1:9999`` or ``https://example.com:8443`` passes for a site on
``https://example.com``. Browsers send a host's cookies to every port of it, so
any other application on the same host name could open an authenticated socket,
read the user's messages and send as them. A WebSocket handshake is not covered
by CSRF protection or CORS: the origin check is the only thing standing there.

:class:`StrictOriginValidator` accepts exactly the origins Django's
``CsrfViewMiddleware`` accepts for an unsafe request, from settings the project
already has:

* the request's own origin, ``http(s)://<Host header>``, when the host is in
  ``ALLOWED_HOSTS`` (``https`` for ``wss://``, or when ``SECURE_PROXY_SSL_HEADER``
  says the proxy received HTTPS);
* every entry of ``CSRF_TRUSTED_ORIGINS``, with its ``https://*.example.com``
  wildcards matching subdomains on the same scheme and port.

Everything else is refused with HTTP 403, before any application code runs: a
missing or ``null`` origin, another scheme or port, a look-alike host, user
info, a path, a trailing dot, an origin not written the way browsers write it
(upper case, an explicit default port).

An event stream is a GET, which browsers send without ``Origin`` when the page
is of the same origin: :func:`event_stream_allowed` applies the same rule to an
``Origin`` when there is one, and otherwise reads the browser's
``Sec-Fetch-Site`` (see there).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http import HttpRequest
from django.http.request import is_same_domain, split_domain_port, validate_host

DEFAULT_PORTS = {"http": 80, "https": 443}
#: What Django's ``HttpRequest.get_host`` accepts when DEBUG is on and ALLOWED_HOSTS is empty.
DEBUG_HOSTS = [".localhost", "127.0.0.1", "[::1]"]


def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lower case with the scheme's default port left out,
    or ``None`` when ``value`` is anything but a bare http(s) origin."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    host = parts.hostname
    if parts.scheme not in DEFAULT_PORTS or not host or "@" in parts.netloc:
        return None
    if parts.path or parts.query or parts.fragment or value.endswith(("?", "#")):
        return None
    if ":" in host:  # IPv6: urlsplit removed the brackets
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def header(scope: dict[str, Any], name: bytes) -> str | None:
    values = [value for key, value in scope.get("headers", []) if key == name]
    if len(values) != 1:  # absent, or sent twice: never guess which one counts
        return None
    return values[0].decode("latin1")


def is_secure(scope: dict[str, Any]) -> bool:
    """Whether the browser reached the site over TLS, as ``HttpRequest.is_secure`` decides it."""
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        name, expected = proxy_header
        wire_name = name.removeprefix("HTTP_").replace("_", "-").lower().encode("latin1")
        value = header(scope, wire_name)
        if value is not None:
            return value.split(",", 1)[0].strip() == expected
    return scope.get("scheme") == "wss"


def own_origin(host: str | None, secure: bool) -> str | None:
    """The origin of the site the request was made to, if its Host is an allowed host."""
    if not host:
        return None
    domain, _ = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS or (DEBUG_HOSTS if settings.DEBUG else [])
    if not domain or not validate_host(domain, allowed):
        return None
    return normalize_origin(f"{'https' if secure else 'http'}://{host}")


def trusted(origin: str, patterns: list[str]) -> bool:
    """Whether ``origin`` is one of ``CSRF_TRUSTED_ORIGINS`` (``*`` matching subdomains, as Django does)."""
    scheme, _, netloc = origin.partition("://")
    for pattern in patterns:
        if "*" in pattern:
            pattern_scheme, _, pattern_netloc = pattern.lower().partition("://")
            if pattern_scheme == scheme and is_same_domain(netloc, pattern_netloc.lstrip("*")):
                return True
        elif normalize_origin(pattern) == origin:
            return True
    return False


def allowed_origin(origin: str | None, host: str | None, secure: bool) -> bool:
    """Whether ``origin`` is exactly an allowed origin, as a browser writes it: the site's own
    (``host``, reached over TLS when ``secure``) or one of ``CSRF_TRUSTED_ORIGINS``.

    Browsers serialise an origin in lower case without the default port; anything
    else (``HTTP://``, ``:443`` on https, spaces) comes from a script, not a page.
    """
    if origin is None or normalize_origin(origin) != origin:
        return False
    return origin == own_origin(host, secure) or trusted(origin, list(getattr(settings, "CSRF_TRUSTED_ORIGINS", [])))


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether the WebSocket handshake's ``Origin`` is exactly an allowed origin (:func:`allowed_origin`)."""
    return allowed_origin(header(scope, b"origin"), header(scope, b"host"), is_secure(scope))


#: ``Sec-Fetch-Site`` of a request made by a page of the same origin, or typed into the address bar.
OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def event_stream_allowed(request: HttpRequest) -> bool:
    """Whether a request for an event stream may use the cookies it carries.

    With an ``Origin`` header, the socket's rule (:func:`allowed_origin`). Without
    one — what Chromium sends for a same-origin ``EventSource`` or ``fetch`` — the
    browser's ``Sec-Fetch-Site`` must say ``same-origin`` (or ``none``: the user
    opened the URL). A page on another port of the same host is ``same-site``, and
    an ``<img>`` or ``no-cors`` fetch sends no ``Origin`` but still the cookies:
    both are refused.

    Neither header: allowed. That is a client that is not a browser (it holds the
    cookie itself, so it is the user), or a browser that sends no fetch metadata:
    older than Chrome 76, Firefox 90 or Safari 16.4, or on plain HTTP to a host
    other than localhost, where same-origin requests look exactly like that, so
    refusing them would break the site's own pages. Serve the site over HTTPS.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        return allowed_origin(origin, request.headers.get("Host"), request.is_secure())
    fetch_site = request.headers.get("Sec-Fetch-Site")
    return fetch_site is None or fetch_site in OWN_FETCH_SITES


class StrictOriginValidator:
    """ASGI middleware: refuse a WebSocket handshake unless its ``Origin`` is exactly an allowed origin.

    Use it where the Channels docs use ``AllowedHostsOriginValidator``::

        "websocket": StrictOriginValidator(AuthMiddlewareStack(URLRouter(...)))
    """

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            raise ValueError("StrictOriginValidator only guards WebSocket connections")
        if not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
