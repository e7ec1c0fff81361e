"""Every package's ``__all__`` is sorted and names exactly its public attributes (STYLE H2).

Packages are discovered by walking ``magikrun``, so new packages and names are checked
without editing this file.
"""

from __future__ import annotations

import importlib
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
    return {
        name
        for name, value in vars(package).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and type(value).__module__ != "__future__"  # from __future__ import annotations
    }


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
