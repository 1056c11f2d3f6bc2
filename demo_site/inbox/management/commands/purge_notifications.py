from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from demo_site.inbox.models import Notification


class Command(BaseCommand):
    help = "Delete stored messages older than INBOX_RETENTION_DAYS (read or not); schedule it daily."

    def handle(self, **options) -> None:
        cutoff = timezone.now() - timedelta(days=settings.INBOX_RETENTION_DAYS)
        deleted, _ = Notification.objects.filter(created_at__lt=cutoff).delete()
        self.stdout.write(f"Deleted {deleted} messages older than {settings.INBOX_RETENTION_DAYS} days.")
