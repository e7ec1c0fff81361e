"""Platform facts: limits, paths, and what this machine can run."""

from ._detect import *  # noqa: F403
from ._detect import __all__ as _detect_all
from ._limits import *  # noqa: F403
from ._limits import __all__ as _limits_all
from ._paths import ENV_ROOT as ENV_ROOT
from ._paths import Paths as Paths

__all__ = sorted([*_detect_all, *_limits_all, "ENV_ROOT", "Paths"])
