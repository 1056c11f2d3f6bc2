"""Names that moved or were renamed keep working for one release, with a ``DeprecationWarning``."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core import checks
from django.utils.module_loading import import_string

from channel_registry._moved import MOVED
from channel_registry.conf import registry_settings
from channel_registry.consumers import GroupConsumer

ROOT = Path(__file__).resolve().parent.parent


def test_group_consumer_still_imports_from_groups_with_a_warning():
    from channel_registry import groups

    with pytest.warns(DeprecationWarning, match=r"channel_registry\.consumers\.GroupConsumer"):
        moved = groups.GroupConsumer
    assert moved is GroupConsumer
    with pytest.raises(AttributeError):
        groups.NoSuchName  # noqa: B018


def test_the_from_import_form_warns_too():
    with pytest.warns(DeprecationWarning):
        from channel_registry.groups import GroupConsumer as moved
    assert moved is GroupConsumer


@pytest.mark.parametrize(("old", "new"), [(True, "user"), (False, None)])
def test_disconnect_on_logout_maps_to_close_on_logout(settings, old, new):
    settings.CHANNEL_REGISTRY = {"DISCONNECT_ON_LOGOUT": old}
    with pytest.warns(DeprecationWarning, match="CLOSE_ON_LOGOUT"):
        assert registry_settings().CLOSE_ON_LOGOUT == new
    messages = [m for m in checks.run_checks() if m.id.startswith("channel_registry")]
    assert [m.id for m in messages] == ["channel_registry.W031"]
    assert "CLOSE_ON_LOGOUT" in messages[0].hint


def test_the_new_name_wins_over_the_old_one(settings):
    settings.CHANNEL_REGISTRY = {"DISCONNECT_ON_LOGOUT": True, "CLOSE_ON_LOGOUT": "session"}
    with pytest.warns(DeprecationWarning):
        assert registry_settings().CLOSE_ON_LOGOUT == "session"


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_a_moved_module_imports_under_its_old_path_as_the_same_module(monkeypatch, old, new):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} moved to {re.escape(new)}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_old_layer_backend_path_still_loads(monkeypatch):
    from channel_registry.redis.layer import BatchedRedisChannelLayer

    monkeypatch.delitem(sys.modules, "channel_registry.redis_layer", raising=False)
    with pytest.warns(DeprecationWarning):
        assert import_string("channel_registry.redis_layer.BatchedRedisChannelLayer") is BatchedRedisChannelLayer


@pytest.mark.parametrize(
    ("package", "name", "module"),
    [("channel_registry.delivery", "send_many", "fanout"), ("channel_registry.history", "History", "log")],
)
def test_a_module_that_became_a_package_still_answers_its_names(package, name, module):
    new = importlib.import_module(f"{package}.{module}")
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(package)}\.{name} moved to {re.escape(new.__name__)}"):
        assert getattr(importlib.import_module(package), name) is getattr(new, name)
    with pytest.raises(AttributeError):
        importlib.import_module(package).NoSuchName  # noqa: B018


def test_the_package_itself_uses_no_old_path():
    """Every module imported fresh, with DeprecationWarning an error: none reaches an old path."""
    modules = [f"channel_registry.{path.stem}" for path in (ROOT / "channel_registry").glob("*.py")]
    code = "import django, importlib; django.setup()\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in [*modules, *MOVED.values()] if "__init__" not in name
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
