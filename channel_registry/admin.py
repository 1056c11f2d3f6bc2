"""The registry in Django's admin: who is online now, each server process's heartbeat, and actions on them.

Besides the table of rows, the "Online now" page lists the users with live
connections and every server process that has rows, and lets an operator
disconnect users and prune stale rows; the table's actions end single
connections. Looking needs the model's view permission; acting needs staff
with its change permission, and every action leaves a ``LogEntry``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, Max, Min, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST

from .cleanup import count_stale, prune_stale
from .conf import registry_settings
from .delivery.mapping import MappingStrategy
from .dispatch import disconnect_user
from .models import Transport, UserChannel, stale_cutoff
from .protocol import CLOSE_FORBIDDEN, CLOSE_REAUTHENTICATE, CLOSE_SESSION_ENDED, CLOSE_UNAVAILABLE, DISCONNECT_EVENT

#: The close codes an operator may choose, with what the bundled JS client does on each.
CLOSE_CODES = [
    (CLOSE_FORBIDDEN, f"{CLOSE_FORBIDDEN}: closed by the application (the client stays closed)"),
    (CLOSE_SESSION_ENDED, f"{CLOSE_SESSION_ENDED}: signed out (the client stays closed)"),
    (CLOSE_REAUTHENTICATE, f"{CLOSE_REAUTHENTICATE}: reconnect once, the session is checked again"),
    (CLOSE_UNAVAILABLE, f"{CLOSE_UNAVAILABLE}: server unavailable (the client retries with backoff)"),
]

#: Users on one page of "Online now": what one disconnect can select, so it stays a bounded loop.
USERS_PER_PAGE = 100


def close_code_field(required: bool = True) -> forms.TypedChoiceField:
    return forms.TypedChoiceField(
        choices=CLOSE_CODES, coerce=int, initial=CLOSE_FORBIDDEN, required=required, label="Close code"
    )


class CloseCodeActionForm(ActionForm):
    """The table's action bar, with the code that "End the selected connections" closes with.

    Optional: the other actions have no use for it (and a request without it means the default).
    """

    code = close_code_field(required=False)


class DisconnectForm(forms.Form):
    users = forms.ModelMultipleChoiceField(queryset=get_user_model()._default_manager.all())
    code = close_code_field()


def online_users() -> QuerySet[UserChannel, dict[str, Any]]:
    """One row per user with a live connection: how many, on how many processes, of which kind, since when."""
    return (
        UserChannel.objects.live()
        .values("user_id")
        .annotate(**connection_counts(), processes=Count("server", distinct=True), since=Min("connected_at"))
        .order_by("since", "user_id")
    )


def connection_counts() -> dict[str, Count]:
    """Connections, and how many of them are sockets and event streams, per group of rows."""
    return {
        "connections": Count("pk"),
        "sockets": Count("pk", filter=Q(transport=Transport.SOCKET)),
        "streams": Count("pk", filter=Q(transport=Transport.STREAM)),
    }


def server_processes() -> list[dict[str, Any]]:
    """One row per server process with rows, live or not, and whether it stopped beating.

    A process's newest ``last_seen`` is its last heartbeat (or its last connect,
    if later). Older than ``STALE_AFTER``, every one of its rows is stale: the
    process died, hangs, or lost its database.
    """
    rows = list(
        UserChannel.objects.values("server")
        .annotate(**connection_counts(), users=Count("user", distinct=True), last_heartbeat=Max("last_seen"))
        .order_by("server")
    )
    cutoff = stale_cutoff()
    for row in rows:
        row["stopped"] = row["last_heartbeat"] < cutoff
    return rows


def log(request: HttpRequest, flag: int, entries: Iterable[tuple[Any, str]]) -> None:
    """One ``LogEntry`` per ``(object, message)``, in one INSERT.

    An object is a model instance, or a model itself for an action on rows nobody selected (a prune).
    """
    LogEntry.objects.bulk_create(log_entry(request, flag, obj, message) for obj, message in entries)


def log_entry(request: HttpRequest, flag: int, obj: Any, message: str) -> LogEntry:
    whole_model = isinstance(obj, type)
    return LogEntry(
        user_id=request.user.pk,
        content_type=ContentType.objects.get_for_model(obj),
        object_id=None if whole_model else str(obj.pk),
        object_repr=str(obj._meta.verbose_name_plural if whole_model else obj)[:200],
        action_flag=flag,
        change_message=message,
    )


@admin.register(UserChannel)
class UserChannelAdmin(admin.ModelAdmin):
    list_display = ["user", "channel_name", "transport", "server", "connected_at", "last_seen", "stale"]
    list_filter = ["transport", "server"]
    list_select_related = ["user"]
    search_fields = ["channel_name", "server"]
    raw_id_fields = ["user"]
    readonly_fields = ["channel_name", "transport", "server", "connected_at", "last_seen"]
    actions = ["end_connections", "prune_stale_rows"]
    action_form = CloseCodeActionForm
    change_list_template = "admin/channel_registry/userchannel/change_list.html"

    @admin.display(boolean=True, description="stale")
    def stale(self, obj: UserChannel) -> bool:
        return obj.is_stale

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("online/", view(self.online_view), name=f"{prefix}_online"),
            path("online/disconnect/", view(require_POST(self.disconnect_view)), name=f"{prefix}_disconnect"),
            path("online/prune/", view(require_POST(self.prune_view)), name=f"{prefix}_prune"),
            *super().get_urls(),
        ]

    # ------------------------------------------------------------------ actions on the table

    @admin.action(description="End the selected connections", permissions=["change"])
    def end_connections(self, request: HttpRequest, queryset: QuerySet[UserChannel]) -> None:
        code = int(request.POST.get("code") or CLOSE_FORBIDDEN)  # validated by the action form
        rows = list(queryset)
        event = {"type": DISCONNECT_EVENT, "code": code}
        delivery = async_to_sync(MappingStrategy().send_batches)([(event, [row.channel_name for row in rows])])
        log(request, CHANGE, [(row, f"Ended with {code} from the admin.") for row in rows])
        self.message_user(request, f"Sent {code} to {delivery.sent} of {len(rows)} connection(s).", messages.SUCCESS)

    @admin.action(description="Prune all stale channels (not only the selected ones)", permissions=["change"])
    def prune_stale_rows(self, request: HttpRequest, queryset: QuerySet[UserChannel]) -> None:
        self.prune_now(request)

    # ------------------------------------------------------------------ "Online now"

    def online_view(self, request: HttpRequest) -> TemplateResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        page = Paginator(online_users(), USERS_PER_PAGE).get_page(request.GET.get("p"))
        users = get_user_model()._default_manager.in_bulk([row["user_id"] for row in page])
        for row in page:
            row["user"] = users.get(row["user_id"], row["user_id"])
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Online now",
            "processes": server_processes(),
            "page": page,
            "stale_rows": count_stale(),
            "stale_after": registry_settings().STALE_AFTER,
            "can_act": self.has_change_permission(request),
            "disconnect_form": DisconnectForm(),
        }
        return TemplateResponse(request, "admin/channel_registry/userchannel/online.html", context)

    def disconnect_view(self, request: HttpRequest) -> HttpResponse:
        """``disconnect_user`` for each selected user, with the chosen code: every connection, every process."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        form = DisconnectForm(request.POST)
        if not form.is_valid():
            self.message_user(request, "Select at least one user and a close code.", messages.WARNING)
            return self.back_to_online()
        code = form.cleaned_data["code"]
        reached = [(user, disconnect_user(user, code)) for user in form.cleaned_data["users"]]
        message = "Disconnected with {} from the admin: {} connection(s)."
        log(request, CHANGE, [(user, message.format(code, n)) for user, n in reached])
        total = sum(n or 0 for _, n in reached)
        self.message_user(request, f"Sent {code} to {total} connection(s) of {len(reached)} user(s).", messages.SUCCESS)
        return self.back_to_online()

    def prune_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        self.prune_now(request)
        return self.back_to_online()

    def prune_now(self, request: HttpRequest) -> None:
        deleted = prune_stale()
        log(request, DELETION, [(UserChannel, f"Pruned {deleted} stale row(s) from the admin.")])
        self.message_user(request, f"Deleted {deleted} stale channel(s).", messages.SUCCESS)

    def back_to_online(self) -> HttpResponseRedirect:
        name = f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_online"
        return HttpResponseRedirect(reverse(name))
