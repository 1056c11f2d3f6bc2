"""The two delivery strategies the contract suites run against, and what each can do.

A contract class (``ProtocolContract`` in ``test_protocol.py``, ...) holds tests written once;
each test module runs it through one ``Test...`` subclass per strategy, which mixes in one of
these declarations. The shared tests read the declarations: where the strategies differ, they
differ in what is declared here, never in which consumer class a test compares against.
"""

import pytest

from channel_registry import dispatch, groups
from channel_registry.consumers import GroupConsumer, RegistryConsumer
from channel_registry.dispatch import Dispatcher


class Backend:
    """What each strategy declares, and the fixture that opens sockets through its consumer."""

    consumer: type
    dispatcher: Dispatcher
    counts_tabs: bool
    keeps_rows: bool
    copy_budget_applies: bool

    @pytest.fixture
    def open_as(self, connect):
        """Open a socket as ``user`` through the consumer under test."""

        async def open_socket(user):
            return await connect(user, consumer=self.consumer)

        return open_socket


class MappingBackend(Backend):
    """``RegistryConsumer``: a ``UserChannel`` row per connection, found again at each send."""

    consumer = RegistryConsumer
    #: Its send functions: ``asend_to_user``, ``anotify_user``, ``adisconnect_user``...
    dispatcher = dispatch.mapping
    #: A send knows the channels it reached: an ack's ``delivered``, what ``disconnect_user`` returns.
    counts_tabs = True
    #: A ``UserChannel`` row per connection, and the presence signals that follow from them.
    keeps_rows = True
    #: ``FANOUT_LIMIT`` charges the sender for every copy, which only a count of them allows.
    copy_budget_applies = True


class GroupBackend(Backend):
    """``GroupConsumer``: a Channels group per user; nothing in the database."""

    consumer = GroupConsumer
    dispatcher = groups.groups
    #: A group cannot be listed: ``delivered`` is ``null`` and ``disconnect_user`` returns ``None``.
    counts_tabs = False
    keeps_rows = False
    #: Without a count of copies only ``RATE_LIMIT`` applies.
    copy_budget_applies = False
