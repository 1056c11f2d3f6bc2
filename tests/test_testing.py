"""channel_registry.testing and its pytest fixtures, on this run's stack."""

import asyncio

import pytest
from channels.layers import InMemoryChannelLayer, get_channel_layer

from channel_registry import adisconnect_user, anotify_user
from channel_registry.consumers import RegistryConsumer
from channel_registry.history.log import MemoryHistory, history_for
from channel_registry.protocol import PROTOCOL_VERSION
from channel_registry.testing import RegistryCommunicator, in_memory_channel_layers

from .conftest import rows
from .processes import await_until

APP = RegistryConsumer.as_asgi()


async def test_connect_reads_the_position_and_frames_carry_theirs(registry_communicator, alice):
    tab = await registry_communicator(APP, user=alice)
    assert tab.start["type"] == "position" and tab.replayed == []
    assert tab.protocol_version == PROTOCOL_VERSION == tab.start["protocol"]
    await anotify_user(alice, "hello")
    frame = await tab.receive_notification()
    assert frame["data"] == "hello"
    assert tab.position == f"{frame['epoch']}:{frame['seq']}"


async def test_resuming_keeps_the_replayed_events_and_the_recovered_frame(registry_communicator, alice):
    tab = await registry_communicator(APP, user=alice)
    await tab.disconnect()
    for text in ("one", "two"):
        await anotify_user(alice, text)
    back = await registry_communicator(APP, user=alice, since=tab.position)
    assert [frame["data"] for frame in back.replayed] == ["one", "two"]
    assert back.start["type"] == "recovered" and back.start["count"] == 2
    assert back.protocol_version == PROTOCOL_VERSION
    assert back.position.endswith(f":{back.start['seq']}")


async def test_a_refused_socket_gives_its_close_code(registry_communicator):
    anonymous = await registry_communicator(APP, accepted=False)
    assert anonymous.refused == 4401
    with pytest.raises(AssertionError, match="refused with 4401"):
        await registry_communicator(APP)


async def test_each_helper_fails_showing_the_frame_it_got(registry_communicator, alice, bob):
    sender = await registry_communicator(APP, user=alice)
    await sender.send_direct(bob, "hi", id="a")
    with pytest.raises(AssertionError, match=r"expected a frame of type 'direct', got \{'type': 'ack', 'id': 'a'"):
        await sender.receive_direct()
    await sender.send_direct(alice, "to myself")
    with pytest.raises(AssertionError, match=r"expected an error 'too_large', got \{'type': 'error', 'code': 'forb"):
        await sender.receive_error("too_large")
    await anotify_user(alice, "surprise")
    await await_until(lambda: not sender.output_queue.empty(), within=5)
    with pytest.raises(AssertionError, match=r'expected nothing, got \{"type": "notification", "data": "surprise"'):
        await sender.receive_nothing()
    sender.timeout = 0.2
    with pytest.raises(AssertionError, match=r"expected a frame of type 'ack', nothing arrived within 0.2 s"):
        await sender.receive_ack()


async def test_the_context_manager_closes_what_it_opened_and_a_close_is_named(alice):
    async with RegistryCommunicator(APP, user=alice) as tab:
        await adisconnect_user(alice)
        closed = "expected a frame of type 'notification', got the socket closed with code 4403"
        with pytest.raises(AssertionError, match=closed):
            await tab.receive_notification()
    assert tab.future.done()
    assert not await rows(user=alice)


async def test_the_registry_runs_on_the_in_memory_layer(in_memory_registry, registry_communicator, alice):
    assert isinstance(get_channel_layer(), InMemoryChannelLayer)
    assert isinstance(history_for(get_channel_layer()), MemoryHistory)
    tab = await registry_communicator(APP, user=alice)
    delivery = await anotify_user(alice, "in memory")
    assert delivery.sent == 1
    assert (await tab.receive_notification())["data"] == "in memory"


def test_in_memory_channel_layers_restores_the_configured_layer():
    configured = type(get_channel_layer())
    with in_memory_channel_layers():
        assert isinstance(get_channel_layer(), InMemoryChannelLayer)
    assert type(get_channel_layer()) is configured


class LayerReceiveLosesTwoCancellations(RegistryConsumer):
    """The layer's receive goes on after its first two cancellations (as redis-py's command writes
    can make channels_redis's do on Python 3.11, CPython gh-86296)."""

    @property
    def channel_receive(self):
        return self._receive_until_reachable

    @channel_receive.setter
    def channel_receive(self, layer_receive):
        async def stubborn_receive():
            for _lost in range(2):
                try:
                    return await layer_receive()
                except asyncio.CancelledError:
                    pass
            return await layer_receive()

        self._layer_receive = stubborn_receive


async def test_a_cancelled_consumer_ends_even_when_its_layer_receive_loses_the_cancellation(alice):
    tab = RegistryCommunicator(LayerReceiveLosesTwoCancellations.as_asgi(), user=alice)
    assert (await tab.connect())[0]
    tab.future.cancel()  # what daphne does on shutdown, and asyncio.Runner.close() to every task
    done, _ = await asyncio.wait([tab.future], timeout=0.5)
    assert done, "the consumer waited for its receive"
    assert not await rows(user=alice)
    await await_until(
        lambda: not any(task.get_coro().__name__ == "stubborn_receive" for task in asyncio.all_tasks()),
        within=2,
        message="the abandoned receive was not cancelled again",
    )


async def test_without_a_history_connect_reads_nothing_yet_sees_a_refusal(settings, registry_communicator, alice):
    settings.CHANNEL_REGISTRY = {"HISTORY": False}
    tab = await registry_communicator(APP, user=alice)
    assert tab.start is None and tab.position is None
    await anotify_user(alice, "no position")
    assert await tab.receive_notification() == {"type": "notification", "data": "no position"}
    anonymous = await registry_communicator(APP, accepted=False)
    assert anonymous.refused == 4401
