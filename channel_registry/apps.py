import atexit

from django.apps import AppConfig


class ChannelRegistryConfig(AppConfig):
    name = "channel_registry"
    verbose_name = "Channel registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .registry import forget_process

        atexit.register(forget_process)
