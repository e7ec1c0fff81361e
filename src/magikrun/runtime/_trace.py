"""A microVM start's timeline, for ``bench/vm_pod.py --trace`` (off unless asked for).

With ``$MAGIKRUN_TRACE`` naming a file, the pod runtime, the keeper and the guest
(through the marks in vminit's ``ready`` announcement) append one line per step:
the host's ``CLOCK_MONOTONIC`` (shared by every process), the pid and the step's name.
Guest steps are placed on that clock from the guest's uptime at ``ready``.
"""

from __future__ import annotations

import os
import time

__all__ = ["TRACE_ENV", "trace"]

TRACE_ENV = "MAGIKRUN_TRACE"


def trace(step: str, at: float | None = None) -> None:
    """Record ``step`` (at monotonic time ``at``, default now) when tracing is on."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    stamp = time.monotonic() if at is None else at
    with open(path, "a") as out:
        out.write(f"{stamp:.3f} {os.getpid()} {step}\n")
