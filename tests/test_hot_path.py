"""The library's own costs per delivered message: what the hot path does not do."""

import channels.consumer
import pytest

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_delivered_copy_takes_no_thread_pool_hop(connect, alice, bob, monkeypatch):
    """Channels closes old database connections (in the thread pool) before every handler;
    the recipient's ``registry.direct`` handler only writes to its socket and skips it."""
    hops = []
    real = channels.consumer.aclose_old_connections

    async def counted():
        hops.append(1)
        await real()

    sender, tabs = await connect(alice), [await connect(bob), await connect(bob)]
    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)
    await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "hi", "id": 1})
    assert (await sender.receive_json_from(5))["type"] == "ack"
    for tab in tabs:
        assert (await tab.receive_json_from(5))["message"] == "hi"
    assert len(hops) == 1  # the sender's websocket.receive, which reads the database
