"""Sphinx configuration of the channel_registry docs (``make docs``; furo theme, pages in MyST Markdown).

The API reference imports the package, so Django is configured here with the smallest
settings that load every public module: SQLite in memory and the in-memory channel layer.
"""

import sys
from pathlib import Path

import django
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

settings.configure(
    INSTALLED_APPS=[
        "django.contrib.admin",
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "channel_registry",
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}},
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    SECRET_KEY="docs-only",
)
django.setup()

import channel_registry  # noqa: E402  (after django.setup(): the package loads models)

project = "channel_registry"
author = "channel_registry contributors"
release = version = channel_registry.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "tutorial/**", "testing/**"]
html_theme = "furo"
html_title = f"channel_registry {release}"
# [text](page.md#heading-slug) links between pages, as GitHub renders them.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
