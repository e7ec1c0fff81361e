"""The infra process's main loop: wait for a stop signal, exit cleanly."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def main(argv: Sequence[str] | None = None) -> int:
    """Hold the namespaces until SIGTERM/SIGINT/SIGHUP; 0 then, 2 on a usage error.

    The signals are blocked and waited for, not handled: blocked signals reach a pid
    namespace's init too, and no signal can slip in between a check and a wait.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m magikrun.infra POD_ID", file=sys.stderr)
        return 2
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    signal.sigwait(_STOP_SIGNALS)
    return 0
