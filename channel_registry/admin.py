from typing import Any

from django.contrib import admin, messages

from .cleanup import prune_stale
from .models import UserChannel


@admin.register(UserChannel)
class UserChannelAdmin(admin.ModelAdmin):
    list_display = ["user", "channel_name", "server", "connected_at", "last_seen", "stale"]
    list_filter = ["server"]
    list_select_related = ["user"]
    search_fields = ["channel_name", "server"]
    raw_id_fields = ["user"]
    readonly_fields = ["channel_name", "server", "connected_at", "last_seen"]
    actions = ["prune_stale_rows"]

    @admin.display(boolean=True, description="stale")
    def stale(self, obj: UserChannel) -> bool:
        return obj.is_stale

    @admin.action(description="Prune all stale channels (not only the selected ones)")
    def prune_stale_rows(self, request: Any, queryset: Any) -> None:
        deleted = prune_stale()
        self.message_user(request, f"Deleted {deleted} stale channel(s).", messages.SUCCESS)
