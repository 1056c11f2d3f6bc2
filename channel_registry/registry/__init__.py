"""Who is connected where: the ``UserChannel`` rows and this process's share of them.

``store`` makes every row change (and sends the presence signals), ``postgres``
is its native PostgreSQL twin for the hot paths, ``liveness`` keeps this
process's rows fresh and removes them on exit, ``sessions`` closes connections
whose session ended, ``slots`` counts the group strategy's connections. Internal:
the public face is ``channel_registry.presence``, ``cleanup`` and ``models``.
"""
