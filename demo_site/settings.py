"""Settings of the demo site.

Embedded by default: SQLite (``demo_site/db.sqlite3``) and the in-memory channel
layer, one process. ``DATABASE_URL`` (``postgres://…`` or ``sqlite:///path``) and
``REDIS_URL`` switch to PostgreSQL and channels_redis, so several daphne
processes can serve the same users.
"""

import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

from channel_registry.layers import redis_layer

BASE_DIR = Path(__file__).resolve().parent


def database_from_url(url: str) -> dict:
    """A ``DATABASES`` entry from ``postgres://user:password@host:port/name?option=value``
    or ``sqlite:///relative/path`` / ``sqlite:////absolute/path``.

    Connections are persistent: Channels closes old connections before every
    consumer handler, and with ``CONN_MAX_AGE=0`` each registry lookup would
    open a new one.
    """
    parts = urlsplit(url)
    persistent = {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": True}
    if parts.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path[1:]), **persistent}
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path[1:]),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "OPTIONS": dict(parse_qsl(parts.query)),
            **persistent,
        }
    raise ImproperlyConfigured(f"DATABASE_URL must start with postgres:// or sqlite:///, not {url!r}")


#: Public (it is in this file): fine on 127.0.0.1, refused once DJANGO_HTTPS=1 puts the demo on a network.
DEMO_SECRET_KEY = "demo-only-do-not-deploy-this-key"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", DEMO_SECRET_KEY)
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",  # the registry's "Online now" page and actions, for staff
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channel_registry",
    "demo_site.inbox",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "demo_site.inbox.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "demo_site.inbox.middleware.LoginRequiredMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "demo_site.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
ASGI_APPLICATION = "demo_site.asgi.application"

DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if os.environ.get("REDIS_URL"):
    CHANNEL_LAYERS = {"default": redis_layer(os.environ["REDIS_URL"], prefix=os.environ.get("REDIS_PREFIX", "demo"))}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "inbox"
LOGOUT_REDIRECT_URL = "login"

#: Days a stored message is kept; ``manage.py purge_notifications`` deletes older ones (run.sh runs it at start).
INBOX_RETENTION_DAYS = int(os.environ.get("DJANGO_INBOX_RETENTION_DAYS", "30"))

STATIC_URL = "static/"
USE_TZ = True
TIME_ZONE = "UTC"

# Behind a TLS-terminating proxy (docs/operations.md, "Deploy behind HTTPS"): secure cookies, X-Forwarded-Proto, HSTS.
if os.environ.get("DJANGO_HTTPS") == "1":
    if SECRET_KEY == DEMO_SECRET_KEY:
        raise ImproperlyConfigured(
            "DJANGO_HTTPS=1 serves the demo beyond this machine, so it needs a secret key of its own: set "
            "DJANGO_SECRET_KEY (e.g. to the output of `python -c 'import secrets; print(secrets.token_urlsafe(50))'`). "
            "The fallback key is public; with it anyone can sign session cookies."
        )
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    CSRF_TRUSTED_ORIGINS = [f"https://{host}" for host in ALLOWED_HOSTS]
    # Sent on responses to HTTPS requests only (SecurityMiddleware); 0 turns it off. No
    # includeSubDomains or preload: the demo does not speak for the rest of the domain.
    SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_HSTS_SECONDS", str(365 * 24 * 3600)))
