import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from channel_registry.cleanup import count_stale, prune_stale


def positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = (
        "Delete UserChannel rows whose server process stopped refreshing them "
        "(crashes, restarts). Run it from cron, Celery beat, or with --every."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--older-than", type=positive, metavar="SECONDS",
            help="Staleness threshold (default: CHANNEL_REGISTRY['STALE_AFTER']).",
        )
        parser.add_argument("--dry-run", action="store_true", help="Count stale rows, delete nothing.")
        parser.add_argument(
            "--every", type=positive, metavar="SECONDS",
            help="Keep running, pruning every SECONDS, until interrupted.",
        )

    def handle(
        self, *, older_than: float | None, dry_run: bool, every: float | None, verbosity: int, **options: Any
    ) -> None:
        if dry_run and every:
            raise CommandError("--dry-run and --every cannot be combined.")
        try:
            while True:
                self.prune_once(older_than, dry_run)
                if not every:
                    return
                time.sleep(every)
        except KeyboardInterrupt:
            self.stdout.write("Stopped.")

    def prune_once(self, older_than: float | None, dry_run: bool) -> None:
        if dry_run:
            self.stdout.write(f"{count_stale(older_than)} stale channel(s) would be deleted.")
        else:
            self.stdout.write(f"Deleted {prune_stale(older_than)} stale channel(s).")
