"""Container lifecycle events delivered to infra extensions, and their JSON form."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ContainerCreated",
    "ContainerExited",
    "ContainerRestarted",
    "ContainerStarted",
    "Event",
    "EventsDropped",
    "PodStopping",
    "event_from_json",
    "event_to_json",
]


def _now() -> float:
    return time.time()


@dataclass(frozen=True, kw_only=True)
class ContainerCreated:
    """An app container was created (not started yet)."""

    name: str
    timestamp: float = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class ContainerStarted:
    """An app container's process runs as ``pid`` (host pid natively)."""

    name: str
    pid: int
    timestamp: float = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class ContainerExited:
    """An app container's process ended; ``reason`` is ``Completed`` or ``Error``."""

    name: str
    exit_code: int
    reason: str
    timestamp: float = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class ContainerRestarted:
    """The restart policy restarted a container (``restart_count`` restarts so far)."""

    name: str
    restart_count: int
    timestamp: float = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class PodStopping:
    """The pod is being stopped; its containers get ``grace`` seconds."""

    grace: float
    timestamp: float = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class EventsDropped:
    """``count`` events for this extension were dropped because its queue was full."""

    count: int
    timestamp: float = field(default_factory=_now)


Event = (
    ContainerCreated
    | ContainerStarted
    | ContainerExited
    | ContainerRestarted
    | PodStopping
    | EventsDropped
)

_KINDS: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        ContainerCreated,
        ContainerStarted,
        ContainerExited,
        ContainerRestarted,
        PodStopping,
        EventsDropped,
    )
}


def event_to_json(event: Event) -> dict[str, Any]:
    """The wire form: the fields plus ``kind`` (the class name)."""
    return {"kind": type(event).__name__, **dataclasses.asdict(event)}


def event_from_json(data: dict[str, Any]) -> Event:
    """Parse the wire form; ``ValueError`` on an unknown kind or wrong fields."""
    kind = _KINDS.get(str(data.get("kind")))
    if kind is None:
        raise ValueError(f"unknown event kind {data.get('kind')!r}")
    fields = {f.name: f.type for f in dataclasses.fields(kind)}
    values = {k: v for k, v in data.items() if k != "kind"}
    if not set(values) <= set(fields):
        raise ValueError(f"unknown fields in {kind.__name__}: {sorted(set(values) - set(fields))}")
    try:
        return kind(**values)
    except TypeError as exc:
        raise ValueError(f"bad {kind.__name__}: {exc}") from exc
