"""magikrun: a unified OCI runtime for Linux containers, WebAssembly modules and microVMs."""

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"
__all__ = sorted([*_errors_all, "__version__"])
