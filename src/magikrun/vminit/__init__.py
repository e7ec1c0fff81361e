"""The guest side of a microVM: PID 1 (vminit), its protocol, and the host's client.

The guest imports only vminit's stdlib-only modules (see ``_early``); the host uses
the names below.
"""

from ._client import (
    ControlClient,
    ExecOutput,
    GuestConfig,
    GuestInfra,
    GuestProcess,
    LogRecord,
)
from ._early import CONFIG_PATH, early_init_script
from ._protocol import PORT_NAME

__all__ = [
    "CONFIG_PATH",
    "PORT_NAME",
    "ControlClient",
    "ExecOutput",
    "GuestConfig",
    "GuestInfra",
    "GuestProcess",
    "LogRecord",
    "early_init_script",
]
