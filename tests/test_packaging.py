"""What type checkers and installers see of the package (no Django needed)."""

import ast
from pathlib import Path

import channel_registry

PACKAGE = Path(channel_registry.__file__).parent


def test_every_lazy_public_name_is_imported_for_type_checkers_from_its_module():
    """``__getattr__`` hides the public names from mypy and editors; the TYPE_CHECKING block shows them."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    [block] = [
        node for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    ]  # fmt: skip
    imported = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == channel_registry._PUBLIC
    assert sorted(imported) == channel_registry.__all__


def test_the_public_names_resolve_at_run_time():
    for name, module in channel_registry._PUBLIC.items():
        assert getattr(channel_registry, name).__module__ == f"channel_registry.{module}"
