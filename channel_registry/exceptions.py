"""Exceptions raised by channel_registry's public API."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ChannelLayerUnavailable(Exception):
    """The channel layer (usually Redis) could not be reached.

    Raised instead of the transport's own error (redis-py's ``ConnectionError``,
    ``TimeoutError``, ``OSError`` …) so callers have one documented exception to
    catch whatever layer backend they run.
    """


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError,)  # includes ConnectionError, TimeoutError
    try:
        from redis import exceptions as redis_errors
    except ImportError:
        return errors
    return (*errors, redis_errors.ConnectionError, redis_errors.TimeoutError)


#: What a channel layer raises when its server cannot be reached.
LAYER_TRANSPORT_ERRORS = _transport_errors()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether Redis refused a write at ``maxmemory`` (``OOM command not allowed ...``, also inside a script)."""
    try:
        from redis.exceptions import OutOfMemoryError, ResponseError
    except ImportError:
        return False
    return isinstance(error, OutOfMemoryError) or (isinstance(error, ResponseError) and "OOM " in str(error))


@contextmanager
def layer_unavailable(layer: Any) -> Iterator[None]:
    """Turn the layer's transport errors into ``ChannelLayerUnavailable``."""
    try:
        yield
    except LAYER_TRANSPORT_ERRORS as error:
        # The class name, not str(layer): channels_redis's includes host URLs and passwords.
        raise ChannelLayerUnavailable(f"{type(layer).__name__} is unreachable: {error}") from error
    except Exception as error:
        # Redis at maxmemory refuses writes; for a caller that is an outage like any other.
        if is_out_of_memory(error):
            raise ChannelLayerUnavailable(f"{type(layer).__name__} is out of memory: {error}") from error
        raise


class HistoryShareExceeded(Exception):
    """A direct message refused: the recipient's history already holds the sender's share (``HISTORY_SENDER_SHARE``)."""


class ConnectionLimitExceeded(Exception):
    """The user already has ``MAX_CONNECTIONS_PER_USER`` live connections."""
