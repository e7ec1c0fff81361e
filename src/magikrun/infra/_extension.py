"""What an infra extension implements and what it is given (its ``InfraContext``)."""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ._events import Event

__all__ = ["InfraContext", "InfraExtension", "Placement", "PortRequester"]

Placement = Literal["native", "microvm"]
PortRequester = Callable[[str, int, int], Awaitable[None]]
"""``(protocol, host_port, container_port)``: asks the host for a forward; raises on refusal."""


@dataclass(kw_only=True)
class InfraContext:
    """One extension's view of its pod.

    ``config`` is the ``magikrun.io/infra-config.<name>`` annotation: parsed JSON when it
    parses as JSON, else the plain string (``None`` when absent).
    """

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    pod_ip: str | None
    placement: Placement
    config: object
    state_dir: Path
    logger: logging.Logger
    _request_port: PortRequester = field(repr=False)

    async def request_tcp_port(self, host_port: int, container_port: int) -> None:
        """Forward ``host_port`` on the host to ``container_port`` on the pod IP (TCP);
        undone when the pod goes. Raises ``RuntimeError`` when the host refuses."""
        await self._request_port("tcp", host_port, container_port)

    async def request_udp_port(self, host_port: int, container_port: int) -> None:
        """As :meth:`request_tcp_port`, for UDP."""
        await self._request_port("udp", host_port, container_port)


class InfraExtension(abc.ABC):
    """An extension living in the pod's infra process (natively or in a microVM).

    ``on_start`` must succeed before the pod's containers run (a failure fails the pod);
    ``on_event`` errors are logged and counted; ``on_stop`` must release what the
    extension holds even when it fails, like ``aclose``.
    """

    name: str = ""

    @abc.abstractmethod
    async def on_start(self, ctx: InfraContext) -> None:
        """Acquire resources (servers, ports); the pod waits for this."""

    @abc.abstractmethod
    async def on_event(self, event: Event, ctx: InfraContext) -> None:
        """React to one lifecycle event (in order, one at a time per extension)."""

    @abc.abstractmethod
    async def on_stop(self, ctx: InfraContext) -> None:
        """Release everything; called once, within the pod's grace period."""
