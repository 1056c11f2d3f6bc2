"""Metrics: exact counts scraped from a real daphne process's ``/metrics``, and nothing without the extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from asgiref.sync import sync_to_async
from prometheus_client.parser import text_string_to_metric_families

from .processes import await_until, http_request, real_services_only
from .test_faults import collect_garbage_after_the_loop_closed, demo_database, direct, stack  # noqa: F401

CONSUMER = "demo_site.inbox.consumers.InboxConsumer"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics`` on ``port``: (name, labels) → value."""
    status, _, body = http_request(port, "GET", "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@real_services_only
@pytest.mark.faults
async def test_a_scrape_counts_exactly_the_messages_resumes_and_refusals_sent(stack):  # noqa: F811 (the fixture)
    stack.start_redis()
    [server] = stack.daphnes(1)
    alice, bob = await stack.users("alice", "bob")
    receiver = await stack.open_tab(server, bob)
    start = await receiver.wait_for(lambda f: f.get("type") == "position")
    sender = await stack.open_tab(server, alice)
    sent, resumes, refusals = 5, 3, 4

    for i in range(sent):
        assert (await sender.request(direct(bob, f"m{i}", f"d{i}")))["type"] == "ack"
    for i in range(refusals):
        answer = await sender.request(direct(999_999, "nobody", f"r{i}"))
        assert answer["code"] == "unknown_recipient"
    since = f"{start['epoch']}:{start['seq']}"
    resumed = [await stack.open_tab(server, bob, path=f"/ws/registry/?since={since}") for _ in range(resumes)]
    for tab in resumed:
        assert (await tab.wait_for(lambda f: f.get("type") == "recovered"))["count"] == sent

    samples = await sync_to_async(scrape)(server.port)
    assert value(samples, "channel_registry_direct_messages_total", outcome="delivered") == sent
    assert value(samples, "channel_registry_direct_messages_total", outcome="unknown_recipient") == refusals
    assert value(samples, "channel_registry_direct_message_duration_seconds_count") == sent + refusals
    assert value(samples, "channel_registry_history_appends_total") == sent
    assert value(samples, "channel_registry_copies_sent_total") == sent
    assert value(samples, "channel_registry_copies_failed_total") == 0
    # alice and bob are on one process: every copy went straight into bob's buffer, none through Redis
    # (the demo's presence notices did), and none waits there now.
    assert value(samples, "channel_registry_local_copies_total") == sent
    assert value(samples, "channel_registry_receive_batch_messages_sum") >= 1
    assert value(samples, "channel_registry_receive_buffered_messages") == 0
    assert value(samples, "channel_registry_resumes_total", outcome="recovered") == resumes
    assert value(samples, "channel_registry_resume_events_count") == resumes
    assert value(samples, "channel_registry_resume_events_sum") == resumes * sent
    assert value(samples, "channel_registry_connects_total", transport="socket", outcome="accepted") == 2 + resumes
    assert value(samples, "channel_registry_connections_open", transport="socket", consumer=CONSUMER) == 2 + resumes

    await resumed[0].ws.close()

    async def closed_counted() -> bool:
        samples = await sync_to_async(scrape)(server.port)
        return value(samples, "channel_registry_disconnects_total", transport="socket", code="1000") == 1

    await await_until(closed_counted, 5)
    samples = await sync_to_async(scrape)(server.port)
    assert value(samples, "channel_registry_connections_open", transport="socket", consumer=CONSUMER) == 1 + resumes


def test_without_prometheus_client_the_hooks_do_nothing_and_nothing_is_imported():
    """A process where ``import prometheus_client`` fails runs every hook, and /metrics is a 404."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # what an uninstalled package looks like to import
        import django
        django.setup()
        from django.http import Http404
        from channel_registry import metrics
        from channel_registry.delivery.strategy import Delivery

        metrics.connection_opened("socket", object())
        metrics.connection_refused("socket", 4429)
        metrics.connection_closed("socket", object(), 1000)
        with metrics.direct_message() as outcome:
            outcome.delivered(Delivery(channels=1, sent=1))
        assert metrics.copies(Delivery(channels=1, sent=1)) == Delivery(channels=1, sent=1)
        metrics.history_appended(1)
        metrics.resumed(None, 3)
        metrics.budget_refused(["messages"])
        metrics.heartbeat(0.01, failed=True)
        assert metrics.rows_pruned(2) == 2
        metrics.receive_batch(type("Layer", (), {"receive_buffer": {}})(), 3)
        try:
            metrics.metrics_view(None)
        except Http404:
            pass
        else:
            raise AssertionError("metrics_view answered without prometheus_client")
        assert sys.modules["prometheus_client"] is None
        assert not [name for name in sys.modules if name.startswith("prometheus_client.")]
        print("ok")
        """
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_with_prometheus_client_a_direct_message_refusal_counts_its_code():
    """The outcome of a send that raised is the error's ``code``; any other exception is ``unavailable``."""
    from channel_registry import metrics
    from channel_registry.protocol import ProtocolError

    def count(outcome: str) -> float:
        return metrics.DIRECT_MESSAGES.labels(outcome)._value.get()

    before = count("forbidden"), count(metrics.FAILED)
    with pytest.raises(ProtocolError), metrics.direct_message():
        raise ProtocolError("forbidden", "no", "x")
    with pytest.raises(ConnectionError), metrics.direct_message():
        raise ConnectionError
    assert (count("forbidden"), count(metrics.FAILED)) == (before[0] + 1, before[1] + 1)
