from django.conf import settings
from django.db import models
from django.utils import timezone


class NotificationQuerySet(models.QuerySet):
    def unread(self) -> "NotificationQuerySet":
        return self.filter(read_at__isnull=True)


class Notification(models.Model):
    """A direct message kept for its recipient, who may have been offline when it was sent.

    Live delivery goes through the registry; this row is what a tab opened later
    loads on demand ("unread"), instead of every page rendering it.
    """

    recipient = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    sender = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    #: The message as the client sent it: any JSON value, shown as text.
    message = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)
    read_at = models.DateTimeField(null=True, blank=True)

    objects = NotificationQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["recipient", "read_at"], name="inbox_unread")]

    def __str__(self) -> str:
        return f"to {self.recipient_id} at {self.created_at:%Y-%m-%d %H:%M}"

    def as_json(self) -> dict:
        return {
            "id": self.pk,
            "from": self.sender_id,
            "message": self.message,
            "sent_at": self.created_at.isoformat(),
        }
