"""How an event reaches a user's channels.

``strategy`` is the interface (and ``Delivery``, what a send reports),
``mapping`` the registry strategy, ``pipeline`` a direct message's phases,
``budget`` the per-user token buckets, ``fanout`` one event onto many channels
for each kind of layer. Internal: the public face is ``channel_registry.dispatch``
and ``channel_registry.groups``. ``channel_registry.delivery`` used to be the
module now called ``fanout``; its names still resolve here, with a warning.
"""

from .._moved import forward

__getattr__ = forward(__name__, "channel_registry.delivery", "channel_registry.delivery.fanout")
