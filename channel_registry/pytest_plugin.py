"""pytest fixtures for projects that test code using channel_registry.

Opt in from your root ``conftest.py``::

    pytest_plugins = ["channel_registry.pytest_plugin"]

It needs pytest-asyncio (and pytest-django for the database, as any registry test
does). It is not registered automatically: the library does not depend on pytest or
pytest-asyncio, and fixtures should not appear in every suite that merely installs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from .testing import RegistryCommunicator, close_channel_layers, in_memory_channel_layers

#: ``await registry_communicator(application, path="/ws/", user=..., since=..., accepted=True)``
Opener = Callable[..., Awaitable[RegistryCommunicator]]


@pytest.fixture
def in_memory_registry() -> Iterator[None]:
    """This test runs the registry on Channels' in-memory layer (no Redis)."""
    with in_memory_channel_layers():
        yield


@pytest_asyncio.fixture
async def registry_communicator(request: pytest.FixtureRequest) -> AsyncIterator[Opener]:
    """Opens connected communicators (``RegistryCommunicator``); after the test, failed or
    not, closes every one, then the channel layers' connections on the test's event loop.

    ``accepted=False`` expects a refusal; its close code is ``communicator.refused``.
    """
    if "in_memory_registry" in request.fixturenames:
        request.getfixturevalue("in_memory_registry")  # set up first, so it is restored after the clean-up
    opened: list[RegistryCommunicator] = []

    async def open_communicator(
        application: Any, path: str = "/ws/", *, accepted: bool = True, **options: Any
    ) -> RegistryCommunicator:
        communicator = RegistryCommunicator(application, path, **options)
        opened.append(communicator)
        connected, _ = await communicator.connect()
        if connected and not accepted:
            raise AssertionError("expected the socket to be refused; it was accepted")
        if accepted and not connected:
            raise AssertionError(f"expected the socket to be accepted; it was refused with {communicator.refused}")
        return communicator

    yield open_communicator
    for communicator in opened:
        await communicator.aclose()
    await close_channel_layers()
