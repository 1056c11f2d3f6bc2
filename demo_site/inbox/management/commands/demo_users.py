from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

USERNAMES = ("alice", "bob", "carol")
PASSWORD = "demo-pass-123"


class Command(BaseCommand):
    help = "Create the demo users alice, bob and carol, or reset their password; safe to run again."

    def handle(self, **options) -> None:
        for username in USERNAMES:
            user, _ = get_user_model().objects.get_or_create(username=username)
            user.set_password(PASSWORD)
            user.save()
        self.stdout.write(f"Demo users: {', '.join(USERNAMES)} (password: {PASSWORD})")
