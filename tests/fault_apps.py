"""App configs for ``tests.fault_settings``."""

import os

from demo_site.inbox.apps import InboxConfig


class QuietInboxConfig(InboxConfig):
    """The demo's inbox without its presence broadcast (``CRF_PRESENCE=0``).

    The demo sends the whole online list to every open inbox on each login and
    logout: with N users connecting that is O(N²) frames, which the load script
    can leave out to measure the registry alone.
    """

    def ready(self) -> None:
        if os.environ.get("CRF_STORE_MESSAGES") == "0":  # the load script's --no-store: no INSERT per message
            from demo_site.inbox.consumers import InboxMessages

            async def keep_nothing(self, direct, delivery) -> None:
                pass

            InboxMessages.delivered = keep_nothing


def nobody_may_message_dave(sender, recipient_id) -> bool:
    """A ``CAN_MESSAGE`` policy for the abuse suite: dave has blocked everyone."""
    from django.contrib.auth import get_user_model

    return not get_user_model().objects.filter(pk=recipient_id, username="dave").exists()
