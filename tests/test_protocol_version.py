"""The protocol version every connection's first frame announces, for sockets and event streams."""

from __future__ import annotations

import re
from pathlib import Path

from channel_registry import asend_to_user
from channel_registry.protocol import PROTOCOL_VERSION

from . import test_faults
from .processes import real_services_only
from .test_access_processes import EventStream
from .test_faults import NOTIFY

CLIENT_JS = Path(__file__).resolve().parent.parent / "channel_registry/static/channel_registry/client.js"

# The fault tests' fixtures: daphne processes, private Redis servers, a throw-away database.
demo_database = test_faults.demo_database
stack = test_faults.stack
collect_garbage_after_the_loop_closed = test_faults.collect_garbage_after_the_loop_closed


def test_the_version_is_major_dot_minor_and_the_bundled_client_speaks_it():
    assert re.fullmatch(r"[1-9]\d*\.\d+", PROTOCOL_VERSION)
    declared = re.search(r'^export const PROTOCOL_VERSION = "([^"]+)";$', CLIENT_JS.read_text(), re.MULTILINE)
    assert declared and declared[1] == PROTOCOL_VERSION, "bump client.js's PROTOCOL_VERSION with the server's"


@real_services_only
async def test_a_real_daphne_announces_the_version_first_on_sockets_and_event_streams(stack):
    stack.start_redis()
    [daphne] = stack.daphnes(1)
    [alice] = await stack.users("alice")

    tab = await stack.open_tab(daphne, alice)
    await tab.more_than(0, 10)
    first = tab.frames[0]
    assert first == {"type": "position", "epoch": first["epoch"], "seq": 0, "protocol": PROTOCOL_VERSION}
    await tab.close()

    # A client coming back gets the version too: on the recovered frame, after what it missed.
    await asend_to_user(alice, {"type": NOTIFY, "data": "missed"})
    back = await stack.tab(daphne, alice, path=f"/ws/registry/?since={first['epoch']}:0")
    await back.wait_for(lambda frame: frame.get("type") == "recovered", 10)
    assert [frame["type"] for frame in back.frames[:2]] == ["notification", "recovered"]
    assert back.frames[1]["protocol"] == PROTOCOL_VERSION

    stream = await EventStream.open(daphne.port, alice.session)
    try:
        assert stream.events[0]["event"] == "position"
        assert stream.events[0]["data"]["protocol"] == PROTOCOL_VERSION
    finally:
        await stream.close()
