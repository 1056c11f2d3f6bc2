"""StrictOriginValidator's decisions on ASGI scopes: TLS behind a proxy, trusted origins, duplicates;
and the same rule for event stream requests, with ``Sec-Fetch-Site`` where there is no ``Origin``.

The table of origins against a real daphne process is in ``test_abuse.py``.
"""

import pytest
from django.test import RequestFactory

from channel_registry.origins import StrictOriginValidator, event_stream_allowed, normalize_origin, origin_allowed


def scope(origin, host="chat.example.com", scheme="ws", extra=()):
    headers = [(b"host", host.encode())] if host else []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": "websocket", "scheme": scheme, "headers": [*headers, *extra]}


@pytest.fixture(autouse=True)
def site(settings):
    # The refusing consumer opens a layer channel; in memory, none is left reading Redis.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.ALLOWED_HOSTS = ["chat.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example.com"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://Chat.Example.com:443", "https://chat.example.com"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("http://a.example:99999", None),
        ("http://a.example:x", None),
        ("ftp://a.example", None),
        ("http://u:p@a.example", None),
        ("http://a.example?", None),
    ],
)
def test_normalize_origin(value, expected):
    assert normalize_origin(value) == expected


def test_wss_and_the_proxy_header_decide_the_scheme(settings):
    assert origin_allowed(scope("https://chat.example.com", scheme="wss"))
    assert not origin_allowed(scope("http://chat.example.com", scheme="wss"))
    assert not origin_allowed(scope("https://chat.example.com", scheme="ws"))
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proxied = [(b"x-forwarded-proto", b"https")]
    assert origin_allowed(scope("https://chat.example.com", scheme="ws", extra=proxied))
    assert not origin_allowed(scope("http://chat.example.com", scheme="ws", extra=proxied))


def test_host_must_be_allowed_and_headers_single():
    assert not origin_allowed(scope("http://evil.example", host="evil.example"))
    assert not origin_allowed(scope("http://chat.example.com", host=None))
    assert origin_allowed(scope("https://app.example.com", host="chat.example.com"))
    doubled = scope("http://chat.example.com", extra=[(b"origin", b"http://evil.example")])
    assert not origin_allowed(doubled)


@pytest.mark.django_db  # Channels closes old database connections around a consumer's handlers
async def test_refused_handshake_never_reaches_the_application():
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    messages = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    validator = StrictOriginValidator(app)
    messages[:] = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1006}]
    await validator(scope("http://chat.example.com:8080"), receive, send)
    assert reached == [] and sent == [{"type": "websocket.close"}]
    await validator(scope("http://chat.example.com"), receive, send)
    assert len(reached) == 1


def stream_request(origin=None, fetch_site=None, host="chat.example.com", secure=False):
    headers = {"origin": origin, "sec-fetch-site": fetch_site}
    sent = {name: value for name, value in headers.items() if value is not None}
    return RequestFactory().get("/events/", headers={"host": host, **sent}, secure=secure)


@pytest.mark.parametrize(
    ("origin", "fetch_site", "allowed"),
    [
        # What Chromium sends (tests/test_browser.py records it): a same-origin EventSource has no Origin.
        (None, "same-origin", True),
        (None, "none", True),  # the URL typed into the address bar
        ("http://chat.example.com:8000", "same-site", False),  # an EventSource on another port
        (None, "same-site", False),  # an <img> or no-cors fetch from another port: cookies, no Origin
        (None, "cross-site", False),
        (None, "anything-else", False),
        # With an Origin, the socket's rule decides, whatever Sec-Fetch-Site says.
        ("http://chat.example.com", "same-origin", True),
        ("https://app.example.com", "cross-site", True),  # CSRF_TRUSTED_ORIGINS
        ("http://chat.example.com:8080", None, False),
        ("null", None, False),
        ("", None, False),
        ("http://chat.example.com, http://evil.example", None, False),
        # Neither: not a browser, or one without fetch metadata (plain HTTP to a host other than localhost).
        (None, None, True),
    ],
)
def test_event_stream_requests_follow_the_socket_rule(origin, fetch_site, allowed):
    assert event_stream_allowed(stream_request(origin, fetch_site)) is allowed


def test_event_stream_origin_uses_the_scheme_and_host_of_the_request(settings):
    assert event_stream_allowed(stream_request("https://chat.example.com", secure=True))
    assert not event_stream_allowed(stream_request("http://chat.example.com", secure=True))
    assert not event_stream_allowed(stream_request("http://evil.example", host="evil.example"))
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proxied = RequestFactory().get(
        "/events/", headers={"host": "chat.example.com", "origin": "https://chat.example.com",
                             "x-forwarded-proto": "https"},
    )  # fmt: skip
    assert event_stream_allowed(proxied)
