from django.apps import AppConfig


class InboxConfig(AppConfig):
    name = "demo_site.inbox"
    label = "inbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from channel_registry.signals import user_offline, user_online

        from .presence import broadcast_presence

        user_online.connect(broadcast_presence, dispatch_uid="inbox.presence.online")
        user_offline.connect(broadcast_presence, dispatch_uid="inbox.presence.offline")
