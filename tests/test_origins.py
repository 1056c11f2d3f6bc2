"""StrictOriginValidator's decisions on ASGI scopes: TLS behind a proxy, trusted origins, duplicates.

The table of origins against a real daphne process is in ``test_abuse.py``.
"""

import pytest

from channel_registry.origins import StrictOriginValidator, normalize_origin, origin_allowed


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
