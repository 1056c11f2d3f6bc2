"""Redis beyond channels_redis: ``layer`` is the batched channel layer (``BatchedRedisChannelLayer``).

``channel_registry.layers`` builds the ``CHANNEL_LAYERS`` entry that selects it.
"""
