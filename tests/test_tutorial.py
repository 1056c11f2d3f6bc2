"""The tutorial's project (docs/tutorial/, the files its page includes), run the way the page says:
``migrate``, ``runserver`` (daphne's), two people in a real browser, PostgreSQL and Redis."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .processes import SHARED_POSTGRES, create_database, drop_database, real_services_only
from .redis_servers import free_port
from .test_browser import CHROMIUM, CHROMIUM_ARGS, LIVE

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = [pytest.mark.browser, real_services_only]

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial"
ARTIFACTS = ROOT / "tests" / "artifacts"
PASSWORD = "tutorial-pass-123"
#: Seconds a tab may take to come back after the server restarts: client.js's backoff has full
#: jitter and grows to 30 s (maxDelay) while the server is down.
RECONNECT = 40

# The tutorial's settings as they are, on a database and a Redis key prefix of this run's own.
TEST_SETTINGS = """
from mysite.settings import *

DATABASES["default"].update(NAME={name!r}, HOST={host!r}, PORT={port!r}, USER={user!r})
CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = {name!r}
"""


def tutorial_commands() -> list[list[str]]:
    """The ``python manage.py ...`` lines of the tutorial's shell blocks, in page order, split as a shell would."""
    page = (ROOT / "docs" / "tutorial.md").read_text()
    lines = [line for block in re.findall(r"```sh\n(.*?)```", page, flags=re.S) for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("python manage.py ")]


def manage(project: Path, env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def project(tmp_path):
    """A copy of the tutorial's project on a database of its own; (its directory, its environment)."""
    directory = tmp_path / "mysite"
    shutil.copytree(TUTORIAL, directory, ignore=shutil.ignore_patterns("__pycache__"))
    name = f"tutorial_{os.getpid()}"
    create_database(SHARED_POSTGRES, name)
    (directory / "test_settings.py").write_text(TEST_SETTINGS.format(
        name=name, host=os.environ.get("PGHOST", "127.0.0.1"), port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER", "postgres"),
    ))  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "PYTEST_"))}
    env.update(DJANGO_SETTINGS_MODULE="test_settings", PYTHONPATH=str(directory), PYTHONUNBUFFERED="1")
    try:
        yield directory, env
    finally:
        drop_database(SHARED_POSTGRES, name)
        forget_redis_keys(name)


def forget_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


class RunServer:
    """``python manage.py runserver`` as the tutorial starts it (daphne's, since "daphne" is in
    INSTALLED_APPS), on a port of its own that it keeps across a restart; no autoreloader."""

    def __init__(self, project: Path, env: dict, command: list[str]) -> None:
        self.project, self.env = project, env
        self.port = free_port()
        self.command = [sys.executable, *command, f"127.0.0.1:{self.port}", "--noreload"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ARTIFACTS / "tutorial-runserver.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(self.command, cwd=self.project, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 30
        while not answers(f"{self.url}/accounts/login/"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"runserver did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def sign_in(browser, url: str, username: str):
    """A new browser profile signed in as ``username`` on the tutorial's page; the page."""
    page = browser.new_context().new_page()
    page.goto(f"{url}/")  # login_required: to the login page and back
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    wait_open(page)
    return page


def wait_open(page, within: float = 20) -> None:
    expect(page.locator("#state")).to_have_text("open", timeout=within * 1000)


def test_the_tutorial_works_as_written(project):
    """Poke from a view, "Mark all read" from a consumer, and a notification sent while the server
    was down, replayed when the tabs come back: in Chromium, with every command of the page."""
    directory, env = project
    commands = tutorial_commands()
    assert [command[1] for command in commands] == ["migrate", "shell", "runserver", "shell", "prune_channels"]
    migrate, create_users, runserver, notify_meanwhile, prune = commands
    manage(directory, env, *migrate)
    manage(directory, env, *create_users)
    server = RunServer(directory, env, runserver)
    server.start()
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            alice = sign_in(browser, server.url, "alice")
            bob = sign_in(browser, server.url, "bob")
            bob_again = bob.context.new_page()
            bob_again.goto(f"{server.url}/")
            wait_open(bob_again)
            bob_tabs = [bob, bob_again]

            # From a view: alice pokes bob; the view's notify_user reached both of his tabs.
            alice.fill("#poke input[name=username]", "bob")
            alice.click("#poke button[type=submit]")
            expect(alice.locator("#reached")).to_have_text("reached 2 tab(s)", timeout=LIVE)
            for tab in bob_tabs:
                expect(tab.locator("#alerts li").first).to_have_text("alice poked you", timeout=LIVE)
                expect(tab.locator("#unread")).to_have_text("1")
            expect(alice.locator("#unread")).to_have_text("0")

            # From a consumer: "Mark all read" in one of bob's tabs clears the counter in both.
            bob.click("#mark-read")
            for tab in bob_tabs:
                expect(tab.locator("#unread")).to_have_text("0", timeout=LIVE)

            # Sent while the server is down, shown once the tabs are back.
            server.stop()
            for tab in bob_tabs:
                expect(tab.locator("#state")).not_to_have_text("open", timeout=LIVE)
            manage(directory, env, *notify_meanwhile)
            server.start()
            for tab in bob_tabs:
                wait_open(tab, within=RECONNECT)
                expect(tab.locator("#alerts li").first).to_have_text("while you were away", timeout=LIVE)
                expect(tab.locator("#unread")).to_have_text("1")
        finally:
            browser.close()
            server.stop()

    assert "stale channel(s)" in manage(directory, env, *prune)
