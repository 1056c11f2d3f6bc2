"""The inbox page and the small JSON endpoints it calls with fetch()."""

import math

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import DatabaseError
from django.http import JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from channel_registry import ChannelLayerUnavailable, protocol
from channel_registry.conf import registry_settings
from channel_registry.delivery.mapping import MappingStrategy
from channel_registry.views import EventStreamView

from .consumers import InboxMessages
from .models import Notification
from .presence import PRESENCE_GROUP, broadcast_presence, online_people

#: Most unread messages one request returns.
UNREAD_LIMIT = 50


@require_GET
def inbox(request):
    people = get_user_model().objects.filter(is_active=True).exclude(pk=request.user.pk).order_by("username")
    return render(request, "inbox/inbox.html", {"people": people})


class InboxEventStream(EventStreamView):
    """``/events/``: the library's event stream, plus the presence group."""

    groups = [PRESENCE_GROUP]

    async def get(self, request):
        broadcast_presence.attach()
        return await super().get(request)


@require_GET
async def presence(request):
    return JsonResponse({"online": await sync_to_async(online_people)()})


@require_POST
async def send_message(request):
    """A direct message from a page on the event-stream transport, which cannot send.

    The same frames as the socket protocol — a ``direct`` frame in, an ``ack`` or
    ``error`` frame out — and the same code path (:class:`InboxMessages`), so
    ``CAN_MESSAGE``, the sender's budgets and the privacy options apply alike.
    """
    user = await request.auser()
    try:
        payload = protocol.decode_frame(request.body.decode(), registry_settings().MAX_MESSAGE_BYTES)
        ack = await InboxMessages(user, MappingStrategy()).send(protocol.parse_direct(payload))
    except protocol.ProtocolError as error:
        return error_response(error)
    except UnicodeDecodeError:
        return JsonResponse(protocol.error_frame(protocol.INVALID_JSON, "body is not UTF-8"), status=400)
    except (DatabaseError, ChannelLayerUnavailable):
        unavailable = protocol.ProtocolError(protocol.UNAVAILABLE, "the server cannot deliver messages right now")
        return error_response(unavailable)
    return JsonResponse(ack)


#: HTTP status of each error code; the body is the error frame a socket would get.
ERROR_STATUS = {protocol.RATE_LIMITED: 429, protocol.UNAVAILABLE: 503, protocol.FORBIDDEN: 403}


def error_response(error: protocol.ProtocolError) -> JsonResponse:
    response = JsonResponse(error.frame(), status=ERROR_STATUS.get(error.code, 400))
    if error.retry_after is not None:
        response["Retry-After"] = str(math.ceil(error.retry_after))
    return response


@require_GET
async def unread_notifications(request):
    user = await request.auser()
    unread = Notification.objects.unread().filter(recipient=user)[:UNREAD_LIMIT]
    return JsonResponse({"unread": [notification.as_json() async for notification in unread]})


@require_POST
async def mark_all_read(request):
    user = await request.auser()
    marked = await Notification.objects.unread().filter(recipient=user).aupdate(read_at=timezone.now())
    return JsonResponse({"marked": marked})
