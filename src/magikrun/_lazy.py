"""Lazy package namespaces (PEP 562).

A package's ``__init__`` names which private module holds each public name; the
module is imported on first access of one of its names. So ``magikrun state ID``
or a wasm worker does not import httpx, rich or wasmtime because some sibling
module of the package it needs does. Each ``__init__`` also imports the same
names under ``if typing.TYPE_CHECKING:`` for type checkers (``tests/test_public_api.py``
checks the two lists agree).

Example::

    __getattr__, __dir__ = _lazy.attach(__name__, {"._service": ("ImageService",)})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["attach"]


def attach(
    package: str, exports: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return the ``__getattr__`` and ``__dir__`` for ``package``.

    ``exports`` maps a module (relative to ``package``, e.g. ``"._auth"``) to the
    names it provides. A name is imported once, then kept in the package's namespace.
    """
    origin: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in origin:
                raise ValueError(
                    f"{package}: {name} is exported by both {origin[name]} and {module}"
                )
            origin[name] = module

    def __getattr__(name: str) -> Any:
        module = origin.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *origin})

    return __getattr__, __dir__
