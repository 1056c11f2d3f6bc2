"""Django integration: system checks, settings, admin."""

from datetime import timedelta

import pytest
from django.core import checks
from django.utils import timezone

from channel_registry.conf import registry_settings
from channel_registry.layers import redis_layer
from channel_registry.models import UserChannel

REDIS = "channels_redis.core.RedisChannelLayer"


def ids() -> set[str]:
    return {message.id for message in checks.run_checks() if message.id.startswith("channel_registry")}


def test_default_test_settings_pass_every_check():
    assert ids() == set()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"STALE_AFTR": 10}, "channel_registry.E001"),
        ({"HEARTBEAT_INTERVAL": 30, "STALE_AFTER": 30}, "channel_registry.E003"),
        ({"RATE_LIMIT": (0, 10)}, "channel_registry.E004"),
        ({"RATE_LIMIT": "20/10s"}, "channel_registry.E004"),
        ({"FANOUT_LIMIT": (200, 0)}, "channel_registry.E004"),
        ({"INBOUND_LIMIT": (512 * 1024,)}, "channel_registry.E004"),
        ({"INBOUND_USER_LIMIT": (512 * 1024, -1)}, "channel_registry.E004"),
        ({"MAX_CONNECTIONS_PER_USER": 0}, "channel_registry.E007"),
        ({"MAX_CONNECTIONS_PER_USER": "50"}, "channel_registry.E007"),
        ({"ON_LIMIT": "close_random"}, "channel_registry.E005"),
        ({"CAN_MESSAGE": "nowhere.policy"}, "channel_registry.E006"),
        ({"HANDSHAKE_LIMIT": (120,)}, "channel_registry.E004"),
        ({"RECOVERY_MAX_BYTES": 1024}, "channel_registry.E040"),
        ({"HISTORY_SENDER_SHARE": 1.5}, "channel_registry.E041"),
    ],
)
def test_misconfigured_options_are_reported(settings, options, expected):
    settings.CHANNEL_REGISTRY = options
    assert ids() == {expected}


def test_check_messages_say_what_to_do(settings):
    settings.CHANNEL_REGISTRY = {"HEARTBEAT_INTERVAL": 60, "STALE_AFTER": 30}
    [error] = [m for m in checks.run_checks() if m.id == "channel_registry.E003"]
    assert "STALE_AFTER (30) must be larger than HEARTBEAT_INTERVAL (60)" in error.msg
    assert "HEARTBEAT_INTERVAL=30, STALE_AFTER=90" in error.hint


def test_missing_channel_layer_is_an_error(settings):
    settings.CHANNEL_LAYERS = {}
    assert ids() == {"channel_registry.E010"}


@pytest.mark.parametrize(
    "host",
    [
        "redis://127.0.0.1:6379?protocol=2",
        {"address": "redis://127.0.0.1:6379", "protocol": 2},
        {"address": "redis://127.0.0.1:6379", "socket_timeout": 5, "protocol": 2},
    ],
)
def test_redis_host_with_the_idle_timeout_trap_is_an_error(settings, host):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": REDIS, "CONFIG": {"hosts": [host]}}}
    assert ids() == {"channel_registry.E011"}


@pytest.mark.parametrize(
    "host",
    [
        {"address": "redis://127.0.0.1:6379", "socket_timeout": 15},
        {"address": "redis://127.0.0.1:6379", "socket_timeout": 15, "protocol": 3},
        "redis://127.0.0.1:6379/0?socket_timeout=20",
    ],
)
def test_redis_host_on_resp3_warns_about_the_restart_trap(settings, host):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": REDIS, "CONFIG": {"hosts": [host]}}}
    assert ids() == {"channel_registry.W016"}


def test_the_url_query_wins_over_the_host_keys_as_in_redis_py(settings):
    host = {"address": "redis://127.0.0.1:6379/0?socket_timeout=5&protocol=3", "socket_timeout": 15, "protocol": 2}
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": REDIS, "CONFIG": {"hosts": [host]}}}
    assert ids() == {"channel_registry.E011", "channel_registry.W016"}


def test_a_unix_socket_keeps_redis_py_s_stale_connection_check(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": REDIS, "CONFIG": {"hosts": ["unix:///tmp/redis.sock?socket_timeout=20"]}}}
    assert ids() == set()


def test_a_host_given_as_a_tuple_has_both_traps(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": REDIS, "CONFIG": {"hosts": [("127.0.0.1", 6379)]}}}
    assert ids() == {"channel_registry.E011", "channel_registry.W016"}


@pytest.mark.parametrize(
    "host",
    [
        {"address": "redis://127.0.0.1:6379", "socket_timeout": 15, "protocol": 2},
        {"address": "redis://127.0.0.1:6379", "socket_timeout": None, "protocol": 2},
        "redis://127.0.0.1:6379/0?socket_timeout=20&protocol=2",
        redis_layer("redis://127.0.0.1:6379")["CONFIG"]["hosts"][0],
    ],
)
def test_redis_host_with_a_long_timeout_and_resp2_passes(settings, host):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": REDIS, "CONFIG": {"hosts": [host]}}}
    assert ids() == set()


SENTINELS = [("127.0.0.1", 26379), ("127.0.0.1", 26380)]


def test_a_sentinel_host_from_redis_layer_passes_and_keeps_the_user_s_options(settings):
    host = redis_layer({"sentinels": SENTINELS, "master_name": "main", "sentinel_kwargs": {"password": "x"}})
    settings.CHANNEL_LAYERS = {"default": host}
    assert ids() == set()
    entry = host["CONFIG"]["hosts"][0]
    assert entry["socket_timeout"] == 15 and entry["protocol"] == 2 and entry["master_name"] == "main"
    assert entry["sentinel_kwargs"] == {
        "socket_timeout": 3, "socket_connect_timeout": 3, "protocol": 2, "password": "x"
    }  # fmt: skip


@pytest.mark.parametrize(
    "host, expected",
    [
        ({"sentinels": SENTINELS, "socket_timeout": 15}, "channel_registry.E060"),
        ({"master_name": "main", "sentinels": [], "socket_timeout": 15}, "channel_registry.E060"),
        ({"sentinels": SENTINELS, "master_name": "main", "socket_timeout": 15}, "channel_registry.E061"),
        (
            {"sentinels": SENTINELS, "master_name": "main", "socket_timeout": 15, "sentinel_kwargs": {"protocol": 2}},
            "channel_registry.E061",
        ),
    ],
)
def test_a_sentinel_host_without_what_the_library_needs_is_an_error(settings, host, expected):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": REDIS, "CONFIG": {"hosts": [host]}}}
    assert ids() == {expected}


def test_redis_layer_refuses_a_sentinel_host_without_a_master_name():
    with pytest.raises(ValueError, match="master_name"):
        redis_layer({"sentinels": SENTINELS})


def test_sharded_stock_layer_gets_an_info_note(settings):
    urls = ("redis://127.0.0.1:6379", "redis://127.0.0.1:6380")
    settings.CHANNEL_LAYERS = {"default": redis_layer(*urls, backend=REDIS)}
    assert ids() == {"channel_registry.I012"}
    settings.CHANNEL_LAYERS = {"default": redis_layer(*urls)}  # the library's layer sends to the right shard
    assert ids() == set()


def test_conn_max_age_zero_warns(settings, monkeypatch):
    monkeypatch.setitem(settings.DATABASES["default"], "CONN_MAX_AGE", 0)
    assert ids() == {"channel_registry.W020"}
    monkeypatch.setitem(settings.DATABASES["default"], "OPTIONS", {"pool": True})
    assert ids() == set()


def test_settings_are_typed_and_follow_override(settings):
    assert registry_settings().STALE_AFTER == 90
    settings.CHANNEL_REGISTRY = {"STALE_AFTER": 120, "RATE_LIMIT": [5, 1]}
    assert registry_settings().STALE_AFTER == 120
    assert registry_settings().RATE_LIMIT == (5, 1)


@pytest.mark.django_db
def test_admin_lists_rows_with_a_stale_flag_and_prunes(admin_client, django_user_model):
    user = django_user_model.objects.create_user("owner")
    UserChannel.objects.create(user=user, channel_name="specific.a!fresh", server="s1")
    stale = UserChannel.objects.create(user=user, channel_name="specific.a!old", server="s1")
    UserChannel.objects.filter(pk=stale.pk).update(last_seen=timezone.now() - timedelta(hours=1))

    page = admin_client.get("/admin/channel_registry/userchannel/")
    assert page.status_code == 200
    assert b"specific.a!fresh" in page.content and b"specific.a!old" in page.content
    assert page.content.count(b'alt="True"') == 1  # the stale flag, on one row only

    response = admin_client.post(
        "/admin/channel_registry/userchannel/",
        {"action": "prune_stale_rows", "_selected_action": [stale.pk]},
        follow=True,
    )
    assert b"Deleted 1 stale channel(s)." in response.content
    assert list(UserChannel.objects.values_list("channel_name", flat=True)) == ["specific.a!fresh"]
