"""The README's quick start, followed literally in a new Django project."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Runs inside the new project: log in, open a socket with the session cookie, call the view.
CLIENT = textwrap.dedent("""
    import asyncio, json, os, django
    os.environ["DJANGO_SETTINGS_MODULE"] = "mysite.settings"
    django.setup()
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth.models import User
    from django.test import Client
    from mysite.asgi import application

    async def main():
        await sync_to_async(User.objects.create_user)("reader", password="pw")
        client = Client(HTTP_HOST="localhost")
        await sync_to_async(client.login)(username="reader", password="pw")
        cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
        # As a browser sends them: the page's host, the cookie, the page's exact origin.
        headers = [(b"host", b"localhost"), (b"cookie", cookie), (b"origin", b"http://localhost")]
        tabs = [WebsocketCommunicator(application, "/ws/", headers=headers) for _ in range(2)]
        for tab in tabs:
            assert (await tab.connect())[0]
            assert (await tab.receive_json_from())["type"] == "position"
        response = await sync_to_async(client.get)("/hello/")
        print(json.dumps({"view": response.json(), "tabs": [await tab.receive_json_from() for tab in tabs]}))
        for tab in tabs:
            await tab.disconnect()

    asyncio.run(main())
""")


def readme_blocks(heading: str) -> dict[str, str]:
    """The python blocks of a README section, keyed by the file their first comment names."""
    section = ROOT.joinpath("README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {re.match(r"# (\S+)", block).group(1): block for block in blocks}


def run(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}  # pytest-django sets it
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_quick_start_works_in_a_new_project(tmp_path):
    blocks = readme_blocks("Quick start")
    assert set(blocks) == {"settings.py", "mysite/asgi.py", "mysite/urls.py"}
    run(str(BIN / "django-admin"), "startproject", "mysite", str(tmp_path), cwd=tmp_path)
    settings = tmp_path / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + "\n" + blocks["settings.py"])
    (tmp_path / "mysite" / "asgi.py").write_text(blocks["mysite/asgi.py"])
    (tmp_path / "mysite" / "urls.py").write_text(blocks["mysite/urls.py"])

    python = str(BIN / "python")
    run(python, "manage.py", "migrate", "-v0", cwd=tmp_path)
    checked = run(python, "manage.py", "check", "--fail-level", "WARNING", cwd=tmp_path)
    assert "no issues" in checked.stdout
    # The JS client ships as a static file of the app (the wheel test runs this against the wheel).
    found = run(python, "manage.py", "findstatic", "channel_registry/client.js", "-v0", cwd=tmp_path).stdout
    assert found.strip().endswith("channel_registry/static/channel_registry/client.js")
    output = run(python, "-c", CLIENT, cwd=tmp_path).stdout
    assert '"view": {"tabs_reached": 2}' in output
    assert output.count('{"type": "notification", "data": {"text": "hello from a view"}, "epoch": ') == 2

