"""Infra extensions of a third-party test distribution (entry points in ``dist()``).

``recorder`` appends every event it gets to ``events.jsonl`` in its state dir; ``failstart``
fails in ``on_start``; ``slow`` takes ``config["delay"]`` seconds per event; ``flaky``
raises on every ``ContainerStarted``. All of them record what they get.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

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
