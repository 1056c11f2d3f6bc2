import atexit

from django.apps import AppConfig
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_save


class ChannelRegistryConfig(AppConfig):
    name = "channel_registry"
    verbose_name = "Channel registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .registry.liveness import forget_process
        from .registry.sessions import close_on_credentials_change, close_on_logout

        atexit.register(forget_process)
        user_logged_out.connect(close_on_logout, dispatch_uid="channel_registry.close_on_logout")
        post_save.connect(
            close_on_credentials_change,
            sender=get_user_model(),
            dispatch_uid="channel_registry.close_on_credentials_change",
        )
