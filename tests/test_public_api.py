"""Every package's ``__all__`` is sorted and names exactly its public attributes (STYLE H2).

Packages are discovered by walking ``magikrun``, so new packages and names are checked
without editing this file. Packages export lazily (``magikrun._lazy``): attributes are
looked up through ``dir()``, and the imports a type checker sees must give the same objects.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import types

import pytest

import magikrun


def _packages() -> list[str]:
    found = [magikrun.__name__]
    for info in pkgutil.walk_packages(magikrun.__path__, prefix=f"{magikrun.__name__}."):
        if info.ispkg and not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return found


def _public_attributes(package: types.ModuleType) -> set[str]:
    public = set()
    for name in dir(package):
        if name.startswith("_"):
            continue
        value = getattr(package, name)
        if not isinstance(value, types.ModuleType) and type(value).__module__ != "__future__":
            public.add(name)  # (from __future__ import annotations binds a _Feature)
    return public


def _declared(package: types.ModuleType) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """What the package's ``__init__`` declares: the names bound under
    ``if typing.TYPE_CHECKING:`` (name -> (module, attribute)) and the names it hands to
    ``_lazy.attach``."""
    typed, lazy = {}, set()
    for node in ast.parse(inspect.getsource(package)).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "typing.TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.unparse(stmt)
                module = "." * stmt.level + (stmt.module or "")
                for alias in stmt.names:
                    typed[alias.asname or alias.name] = (module, alias.name)
        elif isinstance(node, ast.Assign) and "_lazy.attach(" in ast.unparse(node.value):
            exports = ast.literal_eval(node.value.args[1])  # type: ignore[attr-defined]
            lazy.update(n for names in exports.values() for n in names)
    return typed, lazy


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's isort-style order: CONSTANTS, then CamelCase, then the rest."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


def test_packages_are_discovered() -> None:
    assert {"magikrun", "magikrun.platform", "magikrun.cli"} <= set(_packages())


@pytest.mark.parametrize("name", _packages())
def test_all_is_sorted_and_exact(name: str) -> None:
    package = importlib.import_module(name)
    exported = getattr(package, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) in (sorted(exported), sorted(exported, key=_isort_key)), (
        f"{name}.__all__ is sorted neither plainly nor isort-style (ruff RUF022)"
    )
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(package, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    public = _public_attributes(package)
    listed = {n for n in exported if not n.startswith("_")}
    assert public - listed == set(), f"{name} has public names outside __all__"
    assert listed - public == set(), f"{name}.__all__ lists non-public names"


@pytest.mark.parametrize("name", _packages())
def test_lazy_names_match_what_type_checkers_see(name: str) -> None:
    package = importlib.import_module(name)
    typed, lazy = _declared(package)
    assert lazy == set(typed), f"{name}: lazy and TYPE_CHECKING names differ: {lazy ^ set(typed)}"
    for attribute, (module, original) in typed.items():
        expected = getattr(importlib.import_module(module, name), original)
        assert getattr(package, attribute) is expected, f"{name}.{attribute}"
