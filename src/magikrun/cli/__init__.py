"""The ``magikrun`` command. Thin: it parses, calls the library, prints."""

from ._main import main as main

__all__ = ["main"]
