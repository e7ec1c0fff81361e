"""The Pod Runtime Interface: what every pod runtime (native, wasm, microvm) answers.

Statuses are derived from what really runs (exit files, pids), never from what a
caller last asked for, so a pod found again after its creator died reads the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

from ..platform._limits import EXEC_TIMEOUT
from ..runtime import ExecResult
from ._spec import PodSpec

__all__ = [
    "ContainerInfo",
    "LogLine",
    "PodHandle",
    "PodPhase",
    "PodRuntime",
    "PodStatus",
]

ContainerStateName = Literal["waiting", "running", "terminated"]
RuntimeName = Literal["native", "wasm", "microvm"]


class PodPhase(StrEnum):
    """A pod's phase, as Kubernetes names it."""

    PENDING = "Pending"
    """Accepted; not every app container runs yet (or it is being made)."""
    RUNNING = "Running"
    """Every app container was started and at least one still runs or is restarting."""
    SUCCEEDED = "Succeeded"
    """Every app container exited 0 and none will be restarted."""
    FAILED = "Failed"
    """Every app container ended, at least one with a non-zero code, none restarting."""
    UNKNOWN = "Unknown"
    """The pod's state could not be read (its record or processes are inconsistent)."""


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """One container of a pod as it really is now."""

    name: str
    image: str
    state: ContainerStateName
    exit_code: int | None
    reason: str | None
    started_at: datetime | None
    finished_at: datetime | None
    restart_count: int
    init: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "state": self.state,
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": _iso(self.started_at),
            "finishedAt": _iso(self.finished_at),
            "restartCount": self.restart_count,
            "init": self.init,
        }


@dataclass(frozen=True, slots=True)
class PodStatus:
    """A pod and its containers, as :meth:`PodRuntime.pod_status` reads them."""

    id: str
    name: str
    namespace: str
    runtime: RuntimeName
    phase: PodPhase
    ip: str | None
    containers: tuple[ContainerInfo, ...]
    created_at: datetime
    message: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (``pod status --json``)."""
        return {
            "id": self.id,
            "name": self.name,
            "namespace": self.namespace,
            "runtime": self.runtime,
            "phase": self.phase.value,
            "ip": self.ip,
            "containers": [c.to_dict() for c in self.containers],
            "createdAt": _iso(self.created_at),
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class PodHandle:
    """What :meth:`PodRuntime.run_pod` returns once every app container runs."""

    id: str
    name: str
    namespace: str
    runtime: RuntimeName
    ip: str | None


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a container wrote, from its CRI-format log."""

    container: str
    stream: Literal["stdout", "stderr"]
    time: datetime
    text: str


@runtime_checkable
class PodRuntime(Protocol):
    """Runs whole pods atomically: all of a pod runs, or nothing of it is left."""

    name: str
    """``"native"``, ``"wasm"`` or ``"microvm"``."""

    async def run_pod(self, spec: PodSpec) -> PodHandle:
        """Start every container; on failure undo all, raising ``PodStartFailed``."""
        ...

    async def stop_pod(self, pod_id: str, grace: float | None = None) -> None:
        """TERM every container, KILL after ``grace`` (None: the spec's grace period)."""
        ...

    async def delete_pod(self, pod_id: str, force: bool = False) -> None:
        """Remove everything of a stopped pod; ``force`` stops it first."""
        ...

    async def pod_status(self, pod_id: str) -> PodStatus: ...

    async def list_pods(self) -> list[PodStatus]: ...

    async def exec(
        self,
        pod_id: str,
        container: str | None,
        argv: Sequence[str],
        *,
        timeout: float = EXEC_TIMEOUT,
    ) -> ExecResult:
        """Run ``argv`` in a container (the first app container when ``None``)."""
        ...

    def logs(
        self,
        pod_id: str,
        container: str | None = None,
        *,
        follow: bool = False,
        tail: int | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        """The containers' log lines (all app containers when ``container`` is None)."""
        ...


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
