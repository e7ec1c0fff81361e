"""The ``health`` extension: an HTTP endpoint listing the pod's containers, from events only.

Config (``magikrun.io/infra-config.health``, JSON): ``{"port": 8080, "hostPort": 18080}``;
``port`` (default 8080) is where it listens on the pod IP, ``hostPort`` (optional) is asked
of the host as a TCP forward. ``GET /`` answers the pod and its containers, ``GET
/containers`` the containers alone: name, state (``created``/``running``/``exited``),
pid, exit code, reason, restart count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from ._events import (
    ContainerCreated,
    ContainerExited,
    ContainerRestarted,
    ContainerStarted,
    Event,
    EventsDropped,
    PodStopping,
)
from ._extension import InfraContext, InfraExtension

__all__ = ["HealthExtension"]

DEFAULT_PORT = 8080
_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0


class HealthExtension(InfraExtension):
    """Serves the pod's container states as JSON over HTTP."""

    name = "health"

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.stopping = False
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def on_start(self, ctx: InfraContext) -> None:
        config = ctx.config if isinstance(ctx.config, dict) else {}
        port = _port(config.get("port", DEFAULT_PORT), "port")
        self._server = await asyncio.start_server(
            lambda r, w: self._serve(r, w, ctx),
            host=ctx.pod_ip or "127.0.0.1",
            port=port,
            limit=_MAX_REQUEST,
        )
        if "hostPort" in config:
            await ctx.request_tcp_port(_port(config["hostPort"], "hostPort"), port)
        ctx.logger.info("serving on %s:%d", ctx.pod_ip or "127.0.0.1", port)

    async def on_event(self, event: Event, ctx: InfraContext) -> None:
        if isinstance(event, PodStopping):
            self.stopping = True
            return
        if isinstance(event, EventsDropped):
            self.dropped += event.count
            return
        entry = self.containers.setdefault(
            event.name,
            {"name": event.name, "state": "created", "restartCount": 0},
        )
        if isinstance(event, ContainerCreated):
            entry["state"] = "created"
        elif isinstance(event, ContainerStarted):
            entry.update(state="running", pid=event.pid, startedAt=event.timestamp)
            entry.pop("exitCode", None)
        elif isinstance(event, ContainerExited):
            entry.update(
                state="exited",
                exitCode=event.exit_code,
                reason=event.reason,
                finishedAt=event.timestamp,
            )
        elif isinstance(event, ContainerRestarted):
            entry["restartCount"] = event.restart_count

    async def on_stop(self, ctx: InfraContext) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    def document(self, ctx: InfraContext, path: str) -> tuple[int, object]:
        containers = sorted(self.containers.values(), key=lambda c: str(c["name"]))
        if path == "/containers":
            return 200, containers
        if path == "/":
            return 200, {
                "pod": {"name": ctx.name, "namespace": ctx.namespace, "ip": ctx.pod_ip},
                "stopping": self.stopping,
                "eventsDropped": self.dropped,
                "containers": containers,
            }
        return 404, {"error": f"no such path {path!r}; try / or /containers"}

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: InfraContext
    ) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            body: object
            if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                status, body = 405, {"error": "only GET"}
            else:
                status, body = self.document(ctx, parts[1].split("?", 1)[0])
            data = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + (data if parts[0:1] != ["HEAD"] else b"")
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away or sent no request gets no answer
        except asyncio.LimitOverrunError:
            pass  # a request head over _MAX_REQUEST bytes is dropped
        finally:
            writer.close()


def _port(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError(f"health config {field} must be a port number (1-65535), not {value!r}")
    return value
