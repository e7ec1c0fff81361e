"""The infra program: holds the pod's namespaces and runs the pod's infra extensions.

``python -I -m magikrun.infra POD_ID`` only holds the namespaces until SIGTERM/SIGINT/SIGHUP.
``python -I -m magikrun.infra POD_ID DIR`` also runs the extensions named in ``DIR/pod.json``
(written by the host) and serves the host on the unix socket ``DIR/infra.sock``
(newline-delimited JSON, one connection at a time). The host connects, the program starts
every extension and answers ``{"type": "ready"}`` or ``{"type": "failed", "extension",
"error"}``; then the host sends ``{"type": "event", "event": {...}}`` lines. An extension's
port request goes to the connected host as ``{"type": "port", "id", "protocol",
"host_port", "container_port"}`` and is answered by ``{"type": "port-result", "id",
"error"}``. In a microVM, vminit runs the same program and relays its control channel to
that socket. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..platform._limits import INFRA_EVENT_QUEUE, INFRA_MESSAGE_MAX
from ._channel import ChannelClosed, read_message, write_message
from ._events import Event, EventsDropped, PodStopping, event_from_json
from ._extension import InfraContext, InfraExtension

__all__ = ["ENTRY_POINT_GROUP", "instantiate", "main"]

ENTRY_POINT_GROUP = "magikrun.infra_extensions"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_log = logging.getLogger("magikrun.infra")


def instantiate(name: str, target: str) -> InfraExtension:
    """The extension ``name`` made from its entry point's ``target`` (``module:attr``, as
    the host resolved it: see ``_host.resolve_extensions``)."""
    module, _, attr = target.partition(":")
    found: Any = importlib.import_module(module.strip())
    for part in attr.strip().split(".") if attr.strip() else ():
        found = getattr(found, part)
    extension = found()
    if not isinstance(extension, InfraExtension):
        raise TypeError(f"entry point {name!r} is not an InfraExtension")
    extension.name = extension.name or name
    return extension


@dataclass
class _Running:
    extension: InfraExtension
    ctx: InfraContext
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(INFRA_EVENT_QUEUE))
    dropped: int = 0
    errors: int = 0


class _Infra:
    def __init__(self, directory: Path, pod: dict[str, Any]) -> None:
        self.directory = directory
        self.pod = pod
        self.running: list[_Running] = []
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.one_at_a_time = asyncio.Lock()
        self.pending: dict[int, tuple[dict[str, Any], asyncio.Future[str | None]]] = {}
        """Port requests not answered yet, by id: a host connection that ends leaves its
        requests to the next one (``run_pod`` hands over to the pod's supervisor)."""
        self.next_id = 0
        self.ready = False
        self.grace = float(pod.get("grace", 5.0))
        """The pod's grace period; a ``PodStopping`` event brings the one of this stop."""

    async def request_port(self, protocol: str, host_port: int, container_port: int) -> None:
        await self.connected.wait()
        assert self.writer is not None
        self.next_id += 1
        message = {
            "type": "port",
            "id": self.next_id,
            "protocol": protocol,
            "host_port": host_port,
            "container_port": container_port,
        }
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = (message, future)
        try:
            await write_message(self.writer, message)
        except OSError as exc:  # still pending: the next host connection gets it
            _log.info("port request %d waits for the next host: %s", self.next_id, exc)
        error = await future
        if error is not None:
            raise RuntimeError(f"port {host_port}->{container_port}/{protocol} refused: {error}")

    def context(self, name: str) -> InfraContext:
        state = self.directory / "state" / name
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        raw = self.pod.get("config", {}).get(name)
        config: object = raw
        if isinstance(raw, str):
            with contextlib.suppress(ValueError):
                config = json.loads(raw)
        return InfraContext(
            name=self.pod["name"],
            namespace=self.pod["namespace"],
            uid=self.pod.get("uid", ""),
            labels=self.pod.get("labels", {}),
            annotations=self.pod.get("annotations", {}),
            pod_ip=self.pod.get("pod_ip"),
            placement=self.pod.get("placement", "native"),
            config=config,
            state_dir=state,
            logger=logging.getLogger(f"magikrun.infra.{name}"),
            _request_port=self.request_port,
        )

    async def start(self) -> None:
        """Load and start every extension, in order; undo the started ones on failure."""
        for name in self.pod.get("extensions", []):
            try:
                extension = instantiate(name, str(self.pod["targets"][name]))
                running = _Running(extension, self.context(name))
                await extension.on_start(running.ctx)
            except Exception as exc:
                await self.stop(asyncio.get_running_loop().time())
                raise _StartFailed(name, f"{type(exc).__name__}: {exc}") from exc
            self.running.append(running)

    def deliver(self, event: Event) -> None:
        if isinstance(event, PodStopping):
            self.grace = event.grace
        for running in self.running:
            try:
                running.queue.put_nowait(event)
            except asyncio.QueueFull:
                running.dropped += 1
                _log.warning(
                    "extension %s is slow: event %s dropped (%d so far)",
                    running.extension.name,
                    type(event).__name__,
                    running.dropped,
                )

    async def consume(self, running: _Running) -> None:
        while True:
            event = await running.queue.get()
            await self.call(running, event)
            if running.dropped:  # a drop happens while the queue is full: reported after
                dropped, running.dropped = running.dropped, 0  # the next event at the latest
                await self.call(running, EventsDropped(count=dropped))
            running.queue.task_done()

    async def call(self, running: _Running, event: Event) -> None:
        try:
            await running.extension.on_event(event, running.ctx)
        except Exception:  # noqa: BLE001 - an extension's bug is counted, not fatal
            running.errors += 1
            _log.exception(
                "extension %s failed on %s (%d errors so far)",
                running.extension.name,
                type(event).__name__,
                running.errors,
            )

    async def stop(self, deadline: float) -> None:
        """``on_stop`` of every started extension, in reverse, until ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        for running in reversed(self.running):
            try:
                async with asyncio.timeout_at(max(deadline, loop.time() + 1.0)):
                    await running.extension.on_stop(running.ctx)
            except Exception:  # noqa: BLE001 - the others still get to stop
                _log.exception("extension %s failed to stop", running.extension.name)
        self.running.clear()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One host connection at a time: a second one waits until the first ends (the
        pod runtime hands over to the supervisor, the supervisor to ``stop_pod``)."""
        async with self.one_at_a_time:
            self.writer = writer
            self.connected.set()
            self.idle.clear()
            try:
                for message, _ in list(self.pending.values()):
                    await write_message(writer, message)
                while True:
                    self.handle(await read_message(reader))
            except (ChannelClosed, OSError) as exc:
                if self.pending:
                    _log.info(
                        "the host left %d port requests for the next one: %s",
                        len(self.pending),
                        exc,
                    )
            finally:
                self.writer = None
                self.connected.clear()
                self.idle.set()
                writer.close()

    async def handshake(self) -> bool:
        """Start the extensions once the host is there; tell it the verdict."""
        await self.connected.wait()
        try:
            await self.start()
        except _StartFailed as exc:
            _log.error("extension %s failed to start: %s", exc.extension, exc.error)
            if self.writer is not None:
                await write_message(
                    self.writer, {"type": "failed", "extension": exc.extension, "error": exc.error}
                )
            return False
        if self.writer is not None:
            await write_message(self.writer, {"type": "ready"})
        return True

    async def drain(self) -> None:
        """Until the host's connection ended and every event it sent was handled (the
        stop waits for this, within grace: the host closes before it stops the infra)."""
        await self.idle.wait()
        for running in self.running:
            await running.queue.join()

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "event":
            try:
                self.deliver(event_from_json(message["event"]))
            except (KeyError, TypeError, ValueError) as exc:
                _log.warning("bad event from the host: %s", exc)
        elif kind == "port-result":
            _, future = self.pending.pop(int(message.get("id", -1)), (None, None))
            if future is not None and not future.done():
                error = message.get("error")
                future.set_result(None if error is None else str(error))
        else:
            _log.warning("unknown message type from the host: %r", kind)


class _StartFailed(Exception):
    def __init__(self, extension: str, error: str) -> None:
        super().__init__(f"{extension}: {error}")
        self.extension = extension
        self.error = error


async def _run(directory: Path) -> int:
    pod = json.loads((directory / "pod.json").read_text())
    sys.path.extend(p for p in pod.get("path", []) if p not in sys.path)
    infra = _Infra(directory, pod)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    sock = directory / "infra.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    server = await asyncio.start_unix_server(infra.serve, path=str(sock), limit=INFRA_MESSAGE_MAX)
    os.chmod(sock, 0o600)
    async with server:
        async with asyncio.TaskGroup() as group:
            handshake = group.create_task(infra.handshake())
            stop = group.create_task(stopping.wait())
            await asyncio.wait([handshake, stop], return_when=asyncio.FIRST_COMPLETED)
            handshake.cancel()
            stop.cancel()
        if handshake.cancelled():  # stopped before the extensions were all up
            await infra.stop(asyncio.get_running_loop().time() + infra.grace)
            return 0
        if not handshake.result():
            await stopping.wait()
            return 1
        async with asyncio.TaskGroup() as group:
            consumers = [group.create_task(infra.consume(r)) for r in infra.running]
            await stopping.wait()
            # One grace for the queued events and on_stop together, so the host's
            # grace-bound kill of the infra process never cuts on_stop short.
            deadline = asyncio.get_running_loop().time() + infra.grace
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await infra.drain()
            for task in consumers:
                task.cancel()
        await infra.stop(deadline)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Hold the namespaces (and run extensions) until SIGTERM/SIGINT/SIGHUP; 0 then,
    1 when an extension failed to start, 2 on a usage error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m magikrun.infra POD_ID [DIR]", file=sys.stderr)
        return 2
    if len(args) == 1:
        # Blocked and waited for, not handled: blocked signals reach a pid namespace's
        # init too, and no signal slips in between a check and a wait.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        signal.sigwait(_STOP_SIGNALS)
        return 0
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    return asyncio.run(_run(Path(args[1])))
