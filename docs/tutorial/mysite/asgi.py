import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_asgi_app = get_asgi_application()

# Imported once Django is set up: they load models.
from alerts.consumers import AlertsConsumer  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from channel_registry.middleware import CloseOnDatabaseError  # noqa: E402
from channel_registry.origins import StrictOriginValidator  # noqa: E402

application = ProtocolTypeRouter({
    "http": django_asgi_app,
    # Exact origins (scheme, host and port); database down: close 4503, not HTTP 500.
    "websocket": StrictOriginValidator(CloseOnDatabaseError(AuthMiddlewareStack(URLRouter([
        path("ws/", AlertsConsumer.as_asgi()),
    ])))),
})
