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
        if os.environ.get("CRF_HISTORY") == "0":  # the load script's --no-history: no INSERT per message
            from demo_site.inbox import consumers

            async def keep_nothing(sender_id, direct) -> None:
                pass

            consumers.store_direct = keep_nothing
