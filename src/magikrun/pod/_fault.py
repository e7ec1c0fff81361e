"""Fault injection for tests: fail ``run_pod`` at a named step.

Steps are ``pull``, ``bundle``, ``netns``, ``network``, ``infra``, ``init:NAME``,
``create:NAME``, ``start:NAME`` and ``supervisor``. A hook is a callable given the
step's name; ``MAGIKRUN_FAULT=step[:mode]`` makes one from the environment for
crash tests in a subprocess: mode ``raise`` (the default) raises, ``exit`` ends the
process at once with ``os._exit`` (as ``kill -9`` would).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import BackendFailed, InvalidArgument

__all__ = ["ENV_FAULT", "FaultHook", "fault_from_env"]

ENV_FAULT = "MAGIKRUN_FAULT"
FaultHook = Callable[[str], None]


def fault_from_env() -> FaultHook | None:
    """The hook ``$MAGIKRUN_FAULT`` asks for, or None when it is unset."""
    value = os.environ.get(ENV_FAULT)
    if not value:
        return None
    step, _, mode = value.rpartition(":")
    if mode not in ("raise", "exit"):
        step, mode = value, "raise"
    if not step:
        raise InvalidArgument(
            f"{ENV_FAULT}={value!r} names no step", hint="use STEP, STEP:raise or STEP:exit"
        )

    def hook(current: str) -> None:
        if current != step:
            return
        if mode == "exit":
            os._exit(137)
        raise BackendFailed(f"fault injected at step {current}", hint="unset " + ENV_FAULT)

    return hook
