"""The demo site's own safety settings, each in a new process: settings are read once per process."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_process(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` after ``django.setup()`` with the demo's settings, on a SQLite file of its own."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "REDIS_"))}
    environ.update(DJANGO_SETTINGS_MODULE="demo_site.settings", PYTHONPATH=str(ROOT),
                   DATABASE_URL=f"sqlite:///{tmp_path / 'demo.sqlite3'}", **env)  # fmt: skip
    script = f"import django\ndjango.setup()\n{code}"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_https_refuses_the_public_fallback_secret_key(tmp_path):
    refused = demo_process("", tmp_path, DJANGO_HTTPS="1")
    assert refused.returncode != 0
    assert "ImproperlyConfigured" in refused.stderr and "set DJANGO_SECRET_KEY" in refused.stderr
    assert demo_process("", tmp_path, DJANGO_HTTPS="1", DJANGO_SECRET_KEY="a-real-secret").returncode == 0
    assert demo_process("", tmp_path).returncode == 0  # on 127.0.0.1 the demo starts as it is


HSTS = """
from django.test import Client
client = Client()
print(client.get("/login/", headers={"x-forwarded-proto": "https"}).headers.get("Strict-Transport-Security"))
print(client.get("/login/").headers.get("Strict-Transport-Security"))
"""


def test_https_sends_hsts_on_https_responses(tmp_path):
    served = demo_process(HSTS, tmp_path, DJANGO_HTTPS="1", DJANGO_SECRET_KEY="s", DJANGO_ALLOWED_HOSTS="testserver")
    assert served.stdout.split() == ["max-age=31536000", "None"], served.stderr
    shorter = demo_process(HSTS, tmp_path, DJANGO_HTTPS="1", DJANGO_SECRET_KEY="s",
                           DJANGO_ALLOWED_HOSTS="testserver", DJANGO_HSTS_SECONDS="600")  # fmt: skip
    assert shorter.stdout.split()[0] == "max-age=600"
    plain = demo_process(HSTS, tmp_path, DJANGO_ALLOWED_HOSTS="testserver")
    assert plain.stdout.split() == ["None", "None"]


PURGE = """
from datetime import timedelta
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone
from demo_site.inbox.models import Notification

call_command("migrate", verbosity=0)
alice, bob = User.objects.create(username="alice"), User.objects.create(username="bob")
now = timezone.now()
for days, read in ((31, None), (31, now), (29, None), (0, None)):
    Notification.objects.create(recipient=bob, sender=alice, message=days, read_at=read,
                                created_at=now - timedelta(days=days))
call_command("purge_notifications")
print(sorted(Notification.objects.values_list("message", flat=True)))
"""


def test_stored_messages_are_purged_after_the_retention_period(tmp_path):
    purged = demo_process(PURGE, tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.splitlines() == ["Deleted 2 messages older than 30 days.", "[0, 29]"]
