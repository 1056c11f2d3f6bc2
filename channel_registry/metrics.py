"""Prometheus metrics, with the ``metrics`` extra (``prometheus-client``); without it, nothing.

Every hook below is one call at the place where the thing happens. Without
``prometheus_client`` installed each metric is an ``Absent`` stand-in whose
methods do nothing, so the hooks cost a method call and nothing is imported.

Per process: each daphne/uvicorn process counts in its own memory and serves
its own ``/metrics`` (``metrics_view``); Prometheus scrapes every process as a
target and ``sum()`` adds them up. prometheus_client's multiprocess mode exists
for pre-forking servers that share one port (gunicorn), at the cost of a shared
directory of mmap files and no ``open connections`` gauge without choosing a
merge mode; ASGI servers here run as separate processes on their own ports.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.http import Http404, HttpRequest, HttpResponse

try:
    import prometheus_client
except ImportError:
    prometheus_client = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .delivery.strategy import Delivery

#: Outcome of a direct message that reached at least one connection (or a group).
DELIVERED = "delivered"
#: Outcome of a direct message accepted while the recipient had no connection.
OFFLINE = "offline"
#: Outcome of a direct message that failed for any reason other than a refusal (an outage).
FAILED = "unavailable"
#: The ``code`` of an event stream that ended: streams have no close code.
NO_CLOSE_CODE = "none"
#: Outcome of a resume that replayed what the client missed.
RECOVERED = "recovered"


class Absent:
    """What every metric is without prometheus_client: accepts every call, records nothing."""

    def labels(self, *values: Any, **named: Any) -> Absent:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def set_function(self, function: Any) -> None:
        pass


def metric(kind: str, name: str, documentation: str, labels: tuple[str, ...] = (), **options: Any) -> Any:
    """A ``prometheus_client`` ``kind`` (``"Counter"``, ...) named ``channel_registry_<name>``, or ``Absent``."""
    if prometheus_client is None:
        return Absent()
    return getattr(prometheus_client, kind)(f"channel_registry_{name}", documentation, labels, **options)


CONNECTIONS_OPEN = metric(
    "Gauge", "connections_open", "Connections registered and open now.", ("transport", "consumer")
)
CONNECTS = metric(
    "Counter",
    "connects_total",
    "Connection attempts by outcome: accepted, or the close code (socket) / error code (stream) refusing it.",
    ("transport", "outcome"),
)
DISCONNECTS = metric(
    "Counter", "disconnects_total", "Accepted connections that ended, by close code.", ("transport", "code")
)
DIRECT_MESSAGES = metric(
    "Counter",
    "direct_messages_total",
    "Direct messages by outcome: delivered, offline, unavailable, or the refusal code.",
    ("outcome",),
)
DIRECT_SECONDS = metric(
    "Histogram", "direct_message_duration_seconds", "Time from a direct message's arrival to its answer."
)
COPIES_SENT = metric("Counter", "copies_sent_total", "Copies of events the channel layer accepted.")
COPIES_FAILED = metric("Counter", "copies_failed_total", "Copies of events the channel layer refused as full.")
HISTORY_APPENDS = metric("Counter", "history_appends_total", "Events appended to users' histories (one per user).")
RESUMES = metric(
    "Counter",
    "resumes_total",
    "Connections that gave a position, by outcome: recovered or the reset reason.",
    ("outcome",),
)
RESUME_EVENTS = metric(
    "Histogram",
    "resume_events",
    "Events replayed per recovered resume (its _sum: all events replayed).",
    buckets=(0, 1, 5, 10, 50, 100, 500, 1000),
)
BUDGET_REFUSALS = metric(
    "Counter",
    "budget_refusals_total",
    "Spends refused, by the budgets spent together (e.g. messages+bytes).",
    ("budget",),
)
HEARTBEAT_SECONDS = metric("Histogram", "heartbeat_duration_seconds", "Time one heartbeat spent on the database.")
HEARTBEAT_FAILURES = metric("Counter", "heartbeat_failures_total", "Heartbeats the database refused.")
ROWS_PRUNED = metric("Counter", "rows_pruned_total", "Rows of dead connections deleted.")
RECEIVE_BATCH = metric(
    "Histogram",
    "receive_batch_messages",
    "Messages one fetch of BatchedRedisChannelLayer took from Redis for this process.",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200),
)
LOCAL_COPIES = metric(
    "Counter",
    "local_copies_total",
    "Copies BatchedRedisChannelLayer put straight into this process's buffers, without a Redis trip.",
)
BUFFERED = metric(
    "Gauge", "receive_buffered_messages", "Messages in BatchedRedisChannelLayer's buffers, not yet received."
)
#: The batched layers of this process, whose buffers ``BUFFERED`` adds up when scraped.
_buffering: weakref.WeakSet[Any] = weakref.WeakSet()
BUFFERED.set_function(lambda: sum(queue.qsize() for layer in _buffering for queue in layer.receive_buffer.values()))


def consumer_name(consumer: object) -> str:
    cls = type(consumer)
    return f"{cls.__module__}.{cls.__qualname__}"


def connection_opened(transport: str, consumer: object) -> None:
    CONNECTS.labels(transport, "accepted").inc()
    CONNECTIONS_OPEN.labels(transport, consumer_name(consumer)).inc()


def connection_refused(transport: str, code: object) -> None:
    CONNECTS.labels(transport, str(code)).inc()


def connection_closed(transport: str, consumer: object, code: object) -> None:
    DISCONNECTS.labels(transport, str(code)).inc()
    CONNECTIONS_OPEN.labels(transport, consumer_name(consumer)).dec()


class DirectOutcome:
    """What ``direct_message`` counts: set by ``delivered``, else the error that ended the send."""

    outcome = FAILED

    def delivered(self, delivery: Delivery) -> None:
        self.outcome = OFFLINE if delivery.sent == 0 else DELIVERED


@contextmanager
def direct_message() -> Iterator[DirectOutcome]:
    """Time one direct message and count its outcome; a ``ProtocolError`` counts as its code."""
    started, answer = time.perf_counter(), DirectOutcome()
    try:
        yield answer
    except Exception as error:
        answer.outcome = getattr(error, "code", FAILED)
        raise
    finally:
        DIRECT_MESSAGES.labels(answer.outcome).inc()
        DIRECT_SECONDS.observe(time.perf_counter() - started)


def copies(delivery: Delivery) -> Delivery:
    """Count ``delivery``'s copies, and return it."""
    COPIES_SENT.inc(delivery.sent or 0)
    COPIES_FAILED.inc(len(delivery.failed))
    return delivery


def history_appended(count: int) -> None:
    HISTORY_APPENDS.inc(count)


def resumed(reset: str | None, replayed: int) -> None:
    RESUMES.labels(reset or RECOVERED).inc()
    if not reset:
        RESUME_EVENTS.observe(replayed)


def budget_refused(names: list[str]) -> None:
    BUDGET_REFUSALS.labels("+".join(names)).inc()


def heartbeat(seconds: float, failed: bool) -> None:
    HEARTBEAT_SECONDS.observe(seconds)
    if failed:
        HEARTBEAT_FAILURES.inc()


def rows_pruned(count: int) -> int:
    """Count ``count`` deleted rows, and return it."""
    ROWS_PRUNED.inc(count)
    return count


def receive_batch(layer: Any, count: int) -> None:
    """A batched layer fetched ``count`` messages for this process (its buffers are counted from now on)."""
    _buffering.add(layer)
    RECEIVE_BATCH.observe(count)


def local_copies(layer: Any, count: int) -> None:
    """A batched layer put ``count`` copies into this process's buffers (its buffers are counted from now on)."""
    _buffering.add(layer)
    LOCAL_COPIES.inc(count)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """This process's metrics in Prometheus' text format; 404 without prometheus_client.

    Every metric of prometheus_client's default registry: the library's, the
    process's own (CPU, memory) and any the project registers. Route it where
    only the scraper reaches it.
    """
    if prometheus_client is None:
        raise Http404("prometheus_client is not installed")
    return HttpResponse(prometheus_client.generate_latest(), content_type=prometheus_client.CONTENT_TYPE_LATEST)
