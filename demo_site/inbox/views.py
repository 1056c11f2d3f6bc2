"""The inbox page and the small JSON endpoints it calls with fetch()."""

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.http import JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from channel_registry import asend_to_user, protocol
from channel_registry.conf import registry_settings
from channel_registry.views import EventStreamView

from .consumers import store_direct
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

    The same frames as the socket protocol: a ``direct`` frame in, an ``ack`` or
    ``error`` frame out, and the recipient's tabs get the same ``direct`` frame.
    """
    user = await request.auser()
    try:
        payload = protocol.decode_frame(request.body.decode(), registry_settings().MAX_MESSAGE_BYTES)
        direct = protocol.parse_direct(payload)
        if not await recipient_exists(user.pk, direct.to):
            raise protocol.ProtocolError(protocol.UNKNOWN_RECIPIENT, f"no other active user with id {direct.to}")
    except protocol.ProtocolError as error:
        return JsonResponse(error.frame(), status=400)
    except UnicodeDecodeError:
        return JsonResponse(protocol.error_frame(protocol.INVALID_JSON, "body is not UTF-8"), status=400)
    frame = protocol.direct_frame(user.pk, direct)
    delivery = await asend_to_user(direct.to, {"type": protocol.DIRECT_EVENT, "frame": frame})
    await store_direct(user.pk, direct)
    return JsonResponse(protocol.ack_frame(direct.id, delivery.sent))


async def recipient_exists(sender_id, recipient_id) -> bool:
    users = get_user_model().objects.filter(pk=recipient_id, is_active=True).exclude(pk=sender_id)
    return await users.aexists()


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
