"""A host project's own test run with the library installed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


HOST_TEST = textwrap.dedent("""
    import pytest
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth.models import User

    from channel_registry.consumers import RegistryConsumer


    @pytest.mark.asyncio
    @pytest.mark.django_db(transaction=True)
    async def test_leaves_a_socket_open():
        communicator = WebsocketCommunicator(RegistryConsumer.as_asgi(), "/ws/")
        communicator.scope["user"] = await User.objects.acreate(username="host")
        assert (await communicator.connect())[0]
""")


def test_a_host_projects_test_run_ends_without_a_traceback(tmp_path):
    """pytest-django drops the test database before the interpreter exits; the library's exit
    clean-up must notice that its rows went with it, not fail against the real database."""
    (tmp_path / "test_host.py").write_text(HOST_TEST)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(BIN / "python"), "-m", "pytest", "-c", os.devnull, "-p", "no:cacheprovider", "-q", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "1 passed" in output
    assert "Traceback" not in output and "could not delete" not in output, output
