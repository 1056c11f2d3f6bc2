import pytest

from channel_registry.consumers import RegistryConsumer


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_message_reaches_every_tab(registry_communicator, django_user_model):
    alice, bob = [await django_user_model.objects.acreate(username=name) for name in ("alice", "bob")]
    sender = await registry_communicator(RegistryConsumer.as_asgi(), user=alice)
    tabs = [await registry_communicator(RegistryConsumer.as_asgi(), user=bob) for _ in range(2)]
    await sender.send_direct(bob, "hi", id=1)
    assert await sender.receive_ack() == {"type": "ack", "id": 1, "delivered": 2}
    for tab in tabs:
        assert (await tab.receive_direct())["message"] == "hi"
