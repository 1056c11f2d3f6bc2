"""What a reconnecting client gets back.

``log`` is the per-user history of recoverable events (in Redis, or in this
process for the in-memory layer); ``cursor`` is one connection's place in it,
with the proof that the send order loses and duplicates nothing. ``channel_registry.history`` used to be the
module now called ``log``; its names still resolve here, with a warning.
"""

from .._moved import forward

__getattr__ = forward(__name__, "channel_registry.history", "channel_registry.history.log")
