"""Names that moved or were renamed keep working for one release, with a ``DeprecationWarning``."""

import pytest
from django.core import checks

from channel_registry.conf import registry_settings
from channel_registry.consumers import GroupConsumer


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
