"""mysite: an existing Django project that already serves Channels with daphne.

The tutorial (docs/tutorial.md) adds the block at the end; tests/test_tutorial.py runs this
project as it stands, on PostgreSQL and Redis.
"""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "tutorial-only-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "alerts",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "mysite.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
ASGI_APPLICATION = "mysite.asgi.application"
DATABASES = {"default": {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "mysite",
    "HOST": "127.0.0.1",
    "USER": "postgres",
}}
CHANNEL_LAYERS = {"default": {
    "BACKEND": "channels_redis.core.RedisChannelLayer",
    "CONFIG": {"hosts": ["redis://127.0.0.1:6379"]},
}}
STATIC_URL = "static/"
LOGIN_REDIRECT_URL = "/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

# [channel_registry]
INSTALLED_APPS += ["channel_registry"]

from channel_registry.layers import redis_layer  # noqa: E402

# The same Redis, through the library's layer: batched receive and timeouts that keep idle sockets open.
CHANNEL_LAYERS = {"default": redis_layer("redis://127.0.0.1:6379")}
# Persistent database connections: each consumer message would open a new one otherwise.
DATABASES["default"]["CONN_MAX_AGE"] = None
CHANNEL_REGISTRY = {"HEARTBEAT_INTERVAL": 30, "STALE_AFTER": 90}
# [/channel_registry]
