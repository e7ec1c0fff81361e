"""Infra extensions of a third-party test distribution (entry points in ``dist()``).

``recorder`` appends every event it gets to ``events.jsonl`` in its state dir; ``failstart``
fails in ``on_start``; ``slow`` takes ``config["delay"]`` seconds per event; ``flaky``
raises on every ``ContainerStarted``; ``porter`` serves ``late`` on ``config["port"]`` and,
at the first event of kind ``config["on"]``, requests the host port ``config["hostPort"]``
for it, writing ``ok`` or the refusal to ``port`` in its state dir; ``lingering`` takes
``config["stop"]`` seconds in ``on_stop`` (writing ``cut`` when it is cancelled meanwhile).
All of them record what they get.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from magikrun.infra import ContainerStarted, Event, InfraContext, InfraExtension


class Recorder(InfraExtension):
    async def on_start(self, ctx: InfraContext) -> None:
        (ctx.state_dir / "started").write_text(json.dumps({"config": ctx.config, "ip": ctx.pod_ip}))

    async def on_event(self, event: Event, ctx: InfraContext) -> None:
        with open(ctx.state_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"kind": type(event).__name__, **dataclasses.asdict(event)}) + "\n")

    async def on_stop(self, ctx: InfraContext) -> None:
        (ctx.state_dir / "stopped").write_text("yes")


class FailStart(Recorder):
    async def on_start(self, ctx: InfraContext) -> None:
        raise OSError("the mesh is unreachable")


class Slow(Recorder):
    async def on_event(self, event: Event, ctx: InfraContext) -> None:
        await asyncio.sleep(float(ctx.config["delay"]))  # type: ignore[index]
        await super().on_event(event, ctx)


class Flaky(Recorder):
    async def on_event(self, event: Event, ctx: InfraContext) -> None:
        if isinstance(event, ContainerStarted):
            raise ValueError(f"cannot handle {event.name}")
        await super().on_event(event, ctx)


class Porter(Recorder):
    server: asyncio.Server | None = None
    requested = False

    async def on_start(self, ctx: InfraContext) -> None:
        async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"late\n")
            await writer.drain()
            writer.close()

        config: dict[str, Any] = ctx.config  # type: ignore[assignment]
        self.server = await asyncio.start_server(late, ctx.pod_ip or "127.0.0.1", config["port"])
        await super().on_start(ctx)

    async def on_event(self, event: Event, ctx: InfraContext) -> None:
        await super().on_event(event, ctx)
        config: dict[str, Any] = ctx.config  # type: ignore[assignment]
        if self.requested or type(event).__name__ != config["on"]:
            return
        self.requested = True
        try:
            await ctx.request_tcp_port(config["hostPort"], config["port"])
        except RuntimeError as exc:
            (ctx.state_dir / "port").write_text(str(exc))
        else:
            (ctx.state_dir / "port").write_text("ok")

    async def on_stop(self, ctx: InfraContext) -> None:
        if self.server is not None:
            self.server.close()
        await super().on_stop(ctx)


class Lingering(Recorder):
    async def on_stop(self, ctx: InfraContext) -> None:
        try:
            await asyncio.sleep(float(ctx.config["stop"]))  # type: ignore[index]
        except asyncio.CancelledError:
            (ctx.state_dir / "cut").write_text("yes")
            raise
        await super().on_stop(ctx)
