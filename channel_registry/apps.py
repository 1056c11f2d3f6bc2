import atexit
import logging

from django.apps import AppConfig
from django.contrib.auth.signals import user_logged_out
from django.db import DatabaseError

logger = logging.getLogger(__name__)


def disconnect_on_logout(sender, request, user, **kwargs) -> None:
    """Close every tab of a user who logs out, through both strategies.

    A failure is logged, never raised: logging out must work while Redis is down.
    """
    from .conf import registry_settings
    from .dispatch import mapping
    from .exceptions import ChannelLayerUnavailable
    from .groups import groups

    if user is None or not registry_settings().DISCONNECT_ON_LOGOUT:
        return
    for dispatcher in (mapping, groups):
        try:
            dispatcher.disconnect_user(user)
        except (ChannelLayerUnavailable, DatabaseError):
            logger.warning("channel_registry: could not disconnect user %s on logout", user.pk, exc_info=True)


class ChannelRegistryConfig(AppConfig):
    name = "channel_registry"
    verbose_name = "Channel registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .registry import forget_process

        atexit.register(forget_process)
        user_logged_out.connect(disconnect_on_logout, dispatch_uid="channel_registry.disconnect_on_logout")
