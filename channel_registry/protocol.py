"""The wire protocol of the registry consumers: parsing client frames, building server frames.

Pure functions, no I/O: everything a client can send is validated here, and every
problem becomes a :class:`ProtocolError` carrying the code the client receives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeGuard

#: The wire protocol's version, ``"<major>.<minor>"``, carried as ``"protocol"`` by the history
#: frame every connection starts with (``position``; ``recovered`` or ``reset`` when it resumes).
#: A new minor version only adds frames or fields, which a client ignores; a new major version
#: changes something a client relies on. Servers before 0.2 announce none.
PROTOCOL_VERSION = "1.0"

MAX_ID_LENGTH = 64
# Containers nested deeper than this are refused: no real message needs them, and
# every serializer on the way (JSON, msgpack) recurses once per level.
MAX_DEPTH = 32
# A whole frame nested deeper than this is invalid JSON on every interpreter. Without it the
# answer depended on the C parser's recursion limit: about 1,000 levels on Python 3.11,
# 1,500 on 3.12 and 10,000 on 3.13 (where a 16 KiB frame can never reach it).
MAX_FRAME_DEPTH = 512
# JSON numbers outside this range lose precision in browsers.
MAX_SAFE_INTEGER = 2**53 - 1

# Close codes a client can act on. Only 1000 and 3000 to 4999 are codes every
# server can send (autobahn, under daphne, refuses 1011), so all are 4xxx.
#: No signed-in user at the handshake. Do not retry: sign in first.
CLOSE_UNAUTHENTICATED = 4401
#: Closed by the application (``disconnect_user``'s default). Do not retry.
CLOSE_FORBIDDEN = 4403
#: The session that opened the connection has ended: logout, or the user was deactivated. Do not retry.
CLOSE_SESSION_ENDED = 4410
#: The user's credentials changed (password): reconnect once, and the handshake
#: checks the session again — the session that changed it stays signed in, the others get 4401.
CLOSE_REAUTHENTICATE = 4409
#: Over the per-user connection limit. Do not retry: it would only evict another tab.
CLOSE_TOO_MANY = 4429
#: Over the user's handshake or resume budget (``HANDSHAKE_LIMIT``, ``RESUME_LIMIT``): the
#: close reason is the number of seconds to wait before retrying (HTTP 429 ``Retry-After`` for streams).
CLOSE_RETRY_LATER = 4430
#: The connection kept sending after its frames were refused (``INBOUND_LIMIT``).
#: Reconnect only after a long delay, and send less.
CLOSE_TOO_FAST = 4420
#: The server cannot register connections right now (database or Redis down). Retry with backoff.
CLOSE_UNAVAILABLE = 4503

# Error codes, as documented in docs/protocol.md.
INVALID_JSON = "invalid_json"
INVALID_PAYLOAD = "invalid_payload"
UNKNOWN_TYPE = "unknown_type"
TOO_LARGE = "too_large"
UNKNOWN_RECIPIENT = "unknown_recipient"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
#: An event stream over ``MAX_CONNECTIONS_PER_USER`` (HTTP 429; sockets get close code 4429).
TOO_MANY_CONNECTIONS = "too_many_connections"


class ProtocolError(Exception):
    """A frame the server refuses; becomes an ``error`` frame, never a closed socket."""

    def __init__(self, code: str, detail: str, client_id: Any = None, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.client_id = client_id
        #: Seconds after which the same frame would be accepted (``rate_limited``).
        self.retry_after = retry_after

    def frame(self) -> dict[str, Any]:
        return error_frame(self.code, self.detail, self.client_id, self.retry_after)


@dataclass(frozen=True)
class Direct:
    """A validated ``direct`` frame from a client."""

    to: int
    message: Any
    id: str | int | None = None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, which JSON cannot carry back out
        raise ValueError(text)
    return value


def _message_problem(value: Any) -> str | None:
    """Why the message cannot travel, if it cannot: too deep to be reasonable, or an
    integer that msgpack (channels_redis's serializer) cannot encode."""
    depth, level = 0, [value]
    while level:
        depth += any(isinstance(item, (dict, list)) for item in level)
        if depth > MAX_DEPTH:
            return f"'message' is nested deeper than {MAX_DEPTH} levels"
        if any(_is_int(v) and not -(2**63) <= v < 2**64 for v in level):
            return "'message' holds an integer outside the 64-bit range"
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
    return None


def _depth(value: Any) -> int:
    """How many containers deep ``value`` is (0 for a scalar), without recursing."""
    depth, level = 0, [value]
    while containers := [item for item in level if isinstance(item, (dict, list))]:
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def decode_frame(text: str | None, max_bytes: int) -> dict[str, Any]:
    """Turn one WebSocket frame into a JSON object, or raise the matching error."""
    if text is None:
        raise ProtocolError(INVALID_PAYLOAD, "binary frames are not accepted; send JSON text")
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError(TOO_LARGE, f"frame larger than {max_bytes} bytes")
    try:
        payload = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise ProtocolError(INVALID_JSON, "frame is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ProtocolError(INVALID_JSON, "frame must be a JSON object")
    if text.count("[") + text.count("{") > MAX_FRAME_DEPTH and _depth(payload) > MAX_FRAME_DEPTH:
        raise ProtocolError(INVALID_JSON, f"frame is nested deeper than {MAX_FRAME_DEPTH} levels")
    try:  # "\ud800" escapes decode to lone surrogates that no serializer can encode
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(INVALID_JSON, "frame holds an unpaired UTF-16 surrogate") from None
    return payload


def read_client_id(payload: dict[str, Any]) -> str | int | None:
    """The optional client ``id``; ``None`` when absent or unusable (it is echoed back)."""
    client_id = payload.get("id")
    if _is_int(client_id) and abs(client_id) <= MAX_SAFE_INTEGER:
        return client_id
    if isinstance(client_id, str) and len(client_id) <= MAX_ID_LENGTH:
        return client_id
    return None


def parse_direct(payload: dict[str, Any]) -> Direct:
    client_id = read_client_id(payload)
    if "id" in payload and payload["id"] is not None and client_id is None:
        raise ProtocolError(
            INVALID_PAYLOAD,
            f"'id' must be a string of at most {MAX_ID_LENGTH} characters or an integer",
        )
    to = payload.get("to")
    if not _is_int(to) or not 0 < to <= MAX_SAFE_INTEGER:
        raise ProtocolError(INVALID_PAYLOAD, "'to' must be a positive integer user id", client_id)
    if "message" not in payload:
        raise ProtocolError(INVALID_PAYLOAD, "'message' is required", client_id)
    problem = _message_problem(payload["message"])
    if problem:
        raise ProtocolError(INVALID_PAYLOAD, problem, client_id)
    return Direct(to=to, message=payload["message"], id=client_id)


def error_frame(code: str, detail: str, client_id: Any = None, retry_after: float | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if client_id is not None:
        frame["id"] = client_id
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return frame


def ack_frame(client_id: Any, delivered: int | None) -> dict[str, Any]:
    return {"type": "ack", "id": client_id, "delivered": delivered}


def direct_frame(sender_id: Any, direct: Direct) -> dict[str, Any]:
    """What every tab of the recipient receives; the sender comes from the scope."""
    return {
        "type": "direct",
        "from": sender_id,
        "message": direct.message,
        "id": direct.id,
        "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def notification_frame(data: Any) -> dict[str, Any]:
    return {"type": "notification", "data": data}


def with_position(frame: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """``frame`` plus the ``epoch`` and ``seq`` of the recoverable event it carries (the
    event's internal position key left out, when the frame is the event itself)."""
    position = event.get(POSITION_KEY)
    if not isinstance(position, list):  # not recoverable, or not passed through a cursor
        return frame
    fields = {name: value for name, value in frame.items() if name != POSITION_KEY}
    return {**fields, "epoch": position[0], "seq": position[1]}


def history_frame(event: dict[str, Any]) -> dict[str, Any]:
    """``position``, ``recovered`` or ``reset``: the cursor's event as the client sees it."""
    return {**event, "type": event["type"].removeprefix("registry.")}


PONG = {"type": "pong"}

#: Channels events the registry consumers handle.
NOTIFY_EVENT = "registry.notify"
DIRECT_EVENT = "registry.direct"
DISCONNECT_EVENT = "registry.disconnect"
#: The key a recoverable event carries its ``[epoch, seq]`` under (set by the history).
POSITION_KEY = "registry.position"
