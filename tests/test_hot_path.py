"""The library's own costs per delivered message: what the hot path does not do."""

import channels.consumer
import pytest
from django.contrib.auth import get_user_model
from django.db.backends.utils import CursorWrapper

from channel_registry.models import UserChannel
from channel_registry.registry import postgres

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


async def test_a_direct_message_reads_the_registry_once(connect, alice, bob, monkeypatch):
    """One statement checks the recipient and finds the channels the copies go to and the sender
    pays for (no ORM ``exists()`` through the thread pool first, no second lookup after the
    append: no connection joined the recipient's history in between, see ``cursor.py``)."""
    registry = (UserChannel._meta.db_table, get_user_model()._meta.db_table)
    reads = []
    orm_execute, native_fetch = CursorWrapper._execute, postgres.pool.fetch_all

    def orm_counted(self, sql, *args, **kwargs):
        if sql.lstrip().upper().startswith("SELECT") and any(table in sql for table in registry):
            reads.append(sql)
        return orm_execute(self, sql, *args, **kwargs)

    async def native_counted(sql, params):
        reads.append(sql)
        return await native_fetch(sql, params)

    sender, tab = await connect(alice), await connect(bob)
    monkeypatch.setattr(CursorWrapper, "_execute", orm_counted)
    monkeypatch.setattr(postgres.pool, "fetch_all", native_counted)
    await sender.send_json_to({"type": "direct", "to": bob.pk, "message": "hi", "id": 1})
    assert (await sender.receive_json_from(5))["delivered"] == 1
    assert (await tab.receive_json_from(5))["message"] == "hi"
    assert len(reads) == 1, reads
