import asyncio
import signal
from argparse import ArgumentTypeError
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from channel_registry.compare import CompareError, Options, Report, check_room, compare_strategies


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not value.isdigit() or int(value) < minimum:
            raise ArgumentTypeError(f"expected a whole number of at least {minimum}, got {value!r}")
        return int(value)

    return parse


class Command(BaseCommand):
    help = (
        "Compare the mapping (RegistryConsumer) with per-user groups (GroupConsumer) on this project's channel "
        "layer and database: send to one user with 1 and 3 tabs, a fan-out, connect + disconnect, and what "
        "each can count. Uses throwaway users and rows, removed afterwards; refuses a database that does not "
        "look like a test or staging one unless --allow-database names it."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--iterations", type=at_least(10), default=Options.iterations, metavar="N",
            help=f"timed sends per case and strategy (default {Options.iterations}); fan-outs and connects scale "
                 "with it",
        )  # fmt: skip
        parser.add_argument(
            "--users", type=at_least(3), default=Options.users, metavar="N",
            help=f"throwaway users with 1 to 3 tabs each, the fan-out's recipients (default {Options.users})",
        )  # fmt: skip
        parser.add_argument(
            "--allow-database", metavar="NAME",
            help="run on this database although its name does not say test, staging, dev, demo or bench",
        )  # fmt: skip

    def handle(self, *, iterations: int, users: int, allow_database: str | None, **options: Any) -> None:
        try:
            check_room(allow_database)
            report = asyncio.run(self.compare(Options(iterations, users)))
        except CompareError as error:
            raise CommandError(str(error)) from error
        except KeyboardInterrupt:  # a second Ctrl-C, during the clean-up
            raise CommandError("interrupted before the clean-up finished") from None
        self.stdout.write(report.render())

    async def compare(self, options: Options) -> Report:
        """The comparison, which a Ctrl-C ends at its next round; a second one ends at once."""
        loop, stop = asyncio.get_running_loop(), asyncio.Event()

        def interrupted() -> None:
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)

        loop.add_signal_handler(signal.SIGINT, interrupted)
        try:
            return await compare_strategies(options, self.progress, stop)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    def progress(self, message: str) -> None:
        self.stderr.write(message)
        self.stderr.flush()
