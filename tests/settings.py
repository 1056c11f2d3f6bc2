"""Test settings. ``CR_TEST_STACK`` picks the services:

- ``real`` (default): PostgreSQL (``PGHOST``/``PGPORT``/``PGUSER``, default
  127.0.0.1:5432, postgres) and channels_redis on ``REDIS_URL``
  (default redis://127.0.0.1:6379);
- ``memory``: SQLite and the in-memory channel layer, the second configuration.

Database and Redis key prefix carry the process id, so two runs on one machine
never share state.
"""

import os

from channel_registry.layers import redis_layer

STACK = os.environ.get("CR_TEST_STACK", "real")
RUN_ID = f"{os.getpid()}"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "channel_registry",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if STACK == "real":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "NAME": os.environ.get("PGDATABASE", "postgres"),
        "CONN_MAX_AGE": None,
        "CONN_HEALTH_CHECKS": True,
        "TEST": {"NAME": f"test_channel_registry_{RUN_ID}"},
    }}
    CHANNEL_LAYERS = {"default": redis_layer(REDIS_URL, prefix=f"crtest{RUN_ID}")}
elif STACK == "memory":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": "channel_registry.sqlite3",
        "CONN_MAX_AGE": None,
        # A file, not :memory:, so a test can make it unreachable (in-memory ones never close).
        "TEST": {"NAME": f"/tmp/test_channel_registry_{RUN_ID}.sqlite3"},
    }}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    raise RuntimeError(f"CR_TEST_STACK must be 'real' or 'memory', not {STACK!r}")
