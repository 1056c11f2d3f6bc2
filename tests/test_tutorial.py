"""The tutorial's project (docs/tutorial/, the files its page includes), run the way the page says:
``migrate``, ``runserver`` (daphne's), two people in a real browser, PostgreSQL and Redis."""

import os
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

# The tutorial's settings as they are, on a database and a Redis key prefix of this run's own.
TEST_SETTINGS = """
from mysite.settings import *

DATABASES["default"].update(NAME={name!r}, HOST={host!r}, PORT={port!r}, USER={user!r})
CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = {name!r}
"""


def manage(project: Path, env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def project(tmp_path):
    """A copy of the tutorial's project, migrated, with alice and bob; (its directory, its environment)."""
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
        manage(directory, env, "migrate", "--no-input", "-v0")
        create = "from django.contrib.auth.models import User\n" + "".join(
            f"User.objects.create_user({name!r}, password={PASSWORD!r})\n" for name in ("alice", "bob"))
        manage(directory, env, "shell", "-c", create)
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


@pytest.fixture
def runserver(project):
    """``python manage.py runserver`` (daphne's, since "daphne" is in INSTALLED_APPS); its URL."""
    directory, env = project
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "tutorial-runserver.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
                                  cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not answers(f"{url}/accounts/login/"):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"runserver did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(30)


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


def wait_open(page) -> None:
    expect(page.locator("#state")).to_have_text("open", timeout=10_000)


def test_the_tutorial_project_pokes_and_marks_read_across_tabs(project, runserver):
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            alice = sign_in(browser, runserver, "alice")
            bob = sign_in(browser, runserver, "bob")
            bob_again = bob.context.new_page()
            bob_again.goto(f"{runserver}/")
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
        finally:
            browser.close()

    directory, env = project
    assert "stale channel(s)" in manage(directory, env, "prune_channels")
