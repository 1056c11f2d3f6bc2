"""The demo's ASGI application, served by daphne.

HTTP goes to Django (static files included: daphne serves none); WebSockets
need a session, and an ``Origin`` that is exactly this site's (scheme, host and
port; or one of ``CSRF_TRUSTED_ORIGINS``), so neither another site nor another
application on another port of the same host can open a socket with the user's cookies.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")
django_application = get_asgi_application()

# Imported once Django is set up: they load models.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path  # noqa: E402

from channel_registry.middleware import CloseOnDatabaseError  # noqa: E402
from channel_registry.origins import StrictOriginValidator  # noqa: E402
from demo_site.inbox.consumers import InboxConsumer, InboxGroupConsumer  # noqa: E402

application = ProtocolTypeRouter({
    "http": ASGIStaticFilesHandler(django_application),
    "websocket": StrictOriginValidator(CloseOnDatabaseError(AuthMiddlewareStack(URLRouter([
        path("ws/registry/", InboxConsumer.as_asgi()),
        path("ws/groups/", InboxGroupConsumer.as_asgi()),
    ])))),
})
