"""The vocabulary every runtime backend shares: status, state document, the protocol.

The container state machine is the OCI runtime spec's: ``creating → created →
running → stopped``. Guards live on :class:`ContainerStatus` so that every
backend answers "may I start/kill/delete now?" the same way.
"""

from __future__ import annotations

import enum
import signal as _signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import InvalidArgument

__all__ = [
    "OCI_VERSION",
    "ContainerState",
    "ContainerStatus",
    "ExecResult",
    "OciRuntime",
    "parse_signal",
]

OCI_VERSION = "1.0.2"
"""The runtime-spec version of the state documents magikrun writes."""


class ContainerStatus(enum.Enum):
    """Where a container is in its lifecycle (OCI runtime spec, "State")."""

    CREATING = "creating"
    """Being created; the container process does not exist yet or is being set up."""
    CREATED = "created"
    """Created and waiting at the barrier; ``start`` runs the user's process."""
    RUNNING = "running"
    """The user's process has been started and has not exited."""
    STOPPED = "stopped"
    """The container process has exited (or never started and was killed)."""

    @property
    def can_start(self) -> bool:
        return self is ContainerStatus.CREATED

    @property
    def can_kill(self) -> bool:
        return self in (ContainerStatus.CREATED, ContainerStatus.RUNNING)

    @property
    def can_delete(self) -> bool:
        """Without ``force``; with it, any status may be deleted."""
        return self is ContainerStatus.STOPPED

    @property
    def can_exec(self) -> bool:
        return self is ContainerStatus.RUNNING


@dataclass(frozen=True, slots=True)
class ContainerState:
    """The OCI state document of one container, plus two runtime extras.

    ``to_oci()`` gives exactly the spec's fields (``ociVersion``, ``id``,
    ``status``, ``pid`` while created or running, ``bundle``, ``annotations``)
    followed by the extras ``created`` (RFC 3339) and ``exitCode`` (once stopped).
    """

    id: str
    status: ContainerStatus
    bundle: Path
    pid: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    created: str = ""
    exit_code: int | None = None
    oci_version: str = OCI_VERSION

    def to_oci(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ociVersion": self.oci_version,
            "id": self.id,
            "status": self.status.value,
        }
        if self.pid is not None and self.status in (
            ContainerStatus.CREATED,
            ContainerStatus.RUNNING,
        ):
            doc["pid"] = self.pid
        doc["bundle"] = str(self.bundle)
        doc["annotations"] = dict(self.annotations)
        if self.created:
            doc["created"] = self.created
        if self.exit_code is not None:
            doc["exitCode"] = self.exit_code
        return doc


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a process run inside a container gave back."""

    exit_code: int
    """Its exit status; 128+N when signal N ended it."""
    stdout: bytes
    stderr: bytes


def parse_signal(value: int | str) -> int:
    """A signal number from ``9``, ``"9"``, ``"KILL"`` or ``"SIGKILL"`` (case-insensitive)."""
    if isinstance(value, int):
        number = value
    elif value.strip().isdigit():
        number = int(value.strip())
    else:
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        member = getattr(_signal.Signals, name, None) if name.isidentifier() else None
        if not isinstance(member, _signal.Signals):
            raise InvalidArgument(
                f"unknown signal {value!r}",
                hint="use a name such as TERM, SIGKILL or HUP, or a number from 1 to 64",
                signal=value,
            )
        number = int(member)
    if not 1 <= number <= _signal.SIGRTMAX:
        raise InvalidArgument(
            f"signal {number} is out of range",
            hint=f"use a signal number from 1 to {int(_signal.SIGRTMAX)}",
            signal=value,
        )
    return number


@runtime_checkable
class OciRuntime(Protocol):
    """One single-container backend, driven through the OCI runtime lifecycle.

    Every verb refreshes the container's state first and raises
    :class:`~magikrun.errors.InvalidState` (with ``id``, ``status`` and ``verb``),
    changing nothing, when the status does not allow it.
    """

    name: str
    """The backend's name, as ``--runtime`` and ``run.oci.handler`` spell it."""
    aliases: tuple[str, ...]
    """Other names that select it."""
    features: frozenset[str]
    """Feature tags ``magikrun system info`` lists (e.g. ``"exec"``, ``"console-socket"``)."""

    def can_handle(self, spec: Mapping[str, Any]) -> bool:
        """Whether this backend claims a bundle's ``config.json`` on its own."""
        ...

    def is_available(self) -> bool: ...

    def unavailable_reason(self) -> str | None:
        """Why the backend cannot run on this machine, or ``None`` when it can."""
        ...

    async def create(
        self,
        id: str,
        bundle: str | Path,
        *,
        pid_file: str | Path | None = None,
        console_socket: str | Path | None = None,
        foreground: bool = False,
    ) -> ContainerState:
        """Create the container; ``foreground`` gives it this process's stdio, not the log."""
        ...

    async def start(self, id: str) -> ContainerState: ...

    async def state(self, id: str) -> ContainerState: ...

    async def kill(self, id: str, signal: int | str, all: bool = False) -> None: ...

    async def delete(self, id: str, force: bool = False) -> None: ...

    async def wait(self, id: str) -> int:
        """Block until the container process exits; its exit code (128+N for signal N)."""
        ...

    async def exec(
        self,
        id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult: ...

    async def ps(self, id: str) -> list[int]:
        """Host pids of the container's processes."""
        ...
