"""The host's side of the control protocol: typed messages and the client.

Kept apart from :mod:`._protocol` so that the guest's PID 1 never imports asyncio or
dataclasses (seconds of boot time under TCG).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import VmControlError
from ..platform._limits import (
    INFRA_EVENT_QUEUE,
    INFRA_MESSAGE_MAX,
    VM_CONTROL_MAX_FRAME,
    VM_CONTROL_TIMEOUT,
    VM_EXEC_MAX_OUTPUT,
    VM_LOG_MAX_LINES,
)
from ._protocol import decode, encode

__all__ = [
    "INFRA_GUEST_DIR",
    "ControlClient",
    "ExecOutput",
    "GuestConfig",
    "GuestInfra",
    "GuestProcess",
    "LogRecord",
]

INFRA_GUEST_DIR = "/run/magikrun-infra"
"""The infra program's directory in the guest (tmpfs: its socket cannot live on 9p)."""
_EVENT_QUEUE = 256
"""Unsolicited frames (port requests) the host holds for its reader before refusing more."""


@dataclass(frozen=True, slots=True)
class GuestProcess:
    """A process vminit starts at boot, with captured logs (a container, or the infra program)."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    restart: str = "Never"
    """Kubernetes' restart policy, applied by vminit: Always, OnFailure or Never."""
    backoff: float = 1.0
    """Seconds before the first restart (doubling up to ``backoff_cap``)."""
    backoff_cap: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": self.cwd,
            "restart": self.restart,
            "backoff": self.backoff,
            "backoff_cap": self.backoff_cap,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuestProcess:
        return cls(
            name=str(data["name"]),
            argv=tuple(str(arg) for arg in data["argv"]),
            env={str(k): str(v) for k, v in data.get("env", {}).items()},
            cwd=str(data.get("cwd", "/")),
            restart=str(data.get("restart", "Never")),
            backoff=float(data.get("backoff", 1.0)),
            backoff_cap=float(data.get("backoff_cap", 10.0)),
        )


@dataclass(frozen=True, slots=True)
class GuestInfra:
    """The pod's infra program, which vminit starts before any container.

    ``config`` is the host-written ``pod.json`` in a shared directory; vminit copies it
    into ``directory`` and links ``directory/state`` to ``state`` beside it.
    """

    argv: tuple[str, ...]
    config: str
    directory: str = INFRA_GUEST_DIR

    def to_dict(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "config": self.config, "directory": self.directory}


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """What the host bakes into a VM for its init: the token, the limits, what to run."""

    token: str
    processes: tuple[GuestProcess, ...] = ()
    never_ready: bool = False
    """Test-only: the init never reports ready (to exercise the boot deadline)."""
    mounts: tuple[tuple[str, str], ...] = ()
    """Writable 9p shares ((tag, guest path) pairs) mounted before the processes start."""
    setup: tuple[tuple[str, ...], ...] = ()
    """Commands run (in order, each must succeed) before the processes start."""
    address: str | None = None
    """The guest's eth0 address (``IP/PREFIX``), set before ``setup``; None leaves eth0 down."""
    gateway: str | None = None
    """The guest's default route (with ``address``)."""
    init: tuple[GuestProcess, ...] = ()
    """Init containers: run one by one, each to a zero exit, before ``processes``."""
    infra: GuestInfra | None = None
    read_only_mounts: tuple[tuple[str, str], ...] = ()
    """Read-only 9p shares ((tag, guest path) pairs), e.g. the infra program's Python."""

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "token": self.token,
                "processes": [process.to_dict() for process in self.processes],
                "init": [process.to_dict() for process in self.init],
                "infra": None if self.infra is None else self.infra.to_dict(),
                "never_ready": self.never_ready,
                "mounts": [list(mount) for mount in self.mounts],
                "read_only_mounts": [list(mount) for mount in self.read_only_mounts],
                "setup": [list(argv) for argv in self.setup],
                "network": None
                if self.address is None
                else {"address": self.address, "gateway": self.gateway},
                "limits": {
                    "max_frame": VM_CONTROL_MAX_FRAME,
                    "exec_max_output": VM_EXEC_MAX_OUTPUT,
                    "log_max_lines": VM_LOG_MAX_LINES,
                    "infra_buffer": INFRA_EVENT_QUEUE,
                    "infra_message_max": INFRA_MESSAGE_MAX,
                },
            }
        ).encode()


@dataclass(frozen=True, slots=True)
class ExecOutput:
    """A finished exec in the guest: exit code (128+N for signal N) and its output."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False
    timed_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "stdout": base64.b64encode(self.stdout).decode(),
            "stderr": base64.b64encode(self.stderr).decode(),
            "truncated": self.truncated,
            "timed_out": self.timed_out,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecOutput:
        return cls(
            exit_code=int(data["exit_code"]),
            stdout=base64.b64decode(data["stdout"]),
            stderr=base64.b64decode(data["stderr"]),
            truncated=bool(data.get("truncated")),
            timed_out=bool(data.get("timed_out")),
        )


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One line a guest process wrote: when (RFC 3339), which stream, the text."""

    time: str
    stream: str
    line: str

    def to_dict(self) -> dict[str, str]:
        return {"time": self.time, "stream": self.stream, "line": self.line}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogRecord:
        return cls(time=str(data["time"]), stream=str(data["stream"]), line=str(data["line"]))


class ControlClient:
    """The host's end of the channel: requests multiplexed by id over one stream.

    Example::

        client = await ControlClient.open(sock, token)
        await client.wait_ready(timeout=60)
        out = await client.exec(["uname", "-r"])
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._token = token
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._closed: VmControlError | None = None
        self._lock = asyncio.Lock()
        self.rejections: list[str] = []
        """Errors the guest sent for frames it could not read (no request id), and
        unsolicited frames refused because ``next_event``'s queue was full."""
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_EVENT_QUEUE)
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def open(cls, sock: socket.socket, token: str) -> ControlClient:
        """A client over a connected stream socket (QEMU's chardev, or vsock)."""
        reader, writer = await asyncio.open_unix_connection(
            sock=sock, limit=VM_CONTROL_MAX_FRAME + 1
        )
        return cls(reader, writer, token)

    def _fail(self, error: VmControlError) -> None:
        if self._closed is None:
            self._closed = error
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()
        for queue in self._pending.values():
            queue.put_nowait({"ok": False, "error": str(error), "closed": True})
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait({"closed": True})

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    self._fail(VmControlError("the guest sent a frame over the size limit"))
                    return
                except asyncio.IncompleteReadError:
                    self._fail(VmControlError("the VM's control channel closed"))
                    return
                try:
                    message: dict[str, Any] = decode(line)
                except ValueError:
                    self._fail(VmControlError("the guest sent a malformed frame"))
                    return
                if message.get("event") == "ready" and not self._ready.done():
                    self._ready.set_result(message)
                elif "event" in message and "id" not in message:
                    try:
                        self._events.put_nowait(message)
                    except asyncio.QueueFull:
                        self.rejections.append(f"unsolicited frame dropped: {message}")
                request_id = message.get("id")
                if request_id is None and message.get("ok") is False:
                    self.rejections.append(str(message.get("error")))
                queue = self._pending.get(request_id) if isinstance(request_id, int) else None
                if queue is not None:
                    queue.put_nowait(message)
        except OSError as exc:
            self._fail(VmControlError(f"the VM's control channel broke: {exc}"))

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """The guest's ready announcement (kernel release, boot time)."""
        async with asyncio.timeout(timeout):
            return await asyncio.shield(self._ready)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (for tests of the guest's limits)."""
        async with self._lock:
            self._writer.write(data)
            await self._writer.drain()

    async def _stream(
        self, op: str, timeout: float | None, **args: Any
    ) -> AsyncIterator[dict[str, Any]]:
        if self._closed is not None:
            raise self._closed
        request_id = next(self._ids)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending[request_id] = queue
        try:
            await self.send_raw(encode({"id": request_id, "op": op, **args}, VM_CONTROL_MAX_FRAME))
            while True:
                async with asyncio.timeout(timeout):
                    message = await queue.get()
                if "item" in message:
                    yield message
                    continue
                if not message.get("ok"):
                    raise VmControlError(f"the guest refused {op!r}: {message.get('error')}", op=op)
                yield message
                return
        except TimeoutError as exc:
            raise VmControlError(f"the guest did not answer {op!r} within {timeout} s") from exc
        finally:
            del self._pending[request_id]

    async def request(
        self, op: str, *, timeout: float | None = VM_CONTROL_TIMEOUT, **args: Any
    ) -> Any:
        """Send one request and return its result; :class:`VmControlError` if refused."""
        result: Any = None
        async for message in self._stream(op, timeout, **args):
            result = message.get("result")
        return result

    async def hello(self) -> None:
        await self.request("hello", token=self._token)

    async def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("ping")
        return result

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        timeout: float = VM_CONTROL_TIMEOUT,
    ) -> ExecOutput:
        """Run ``argv`` in the guest (no tty); a command that overruns ``timeout`` is killed."""
        result = await self.request(
            "exec",
            timeout=timeout + VM_CONTROL_TIMEOUT,
            argv=list(argv),
            env=dict(env or {}),
            cwd=cwd,
            limit=timeout,
        )
        return ExecOutput.from_dict(result)

    async def status(self) -> dict[str, dict[str, Any]]:
        """Per process: ``state`` (running/exited), ``pid``, ``exit_code``."""
        result: dict[str, dict[str, Any]] = await self.request("status")
        return result

    async def logs(
        self, name: str, *, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[LogRecord]:
        """A process's log records; with ``follow`` until it has exited."""
        timeout = None if follow else VM_CONTROL_TIMEOUT
        async for message in self._stream("logs", timeout, name=name, tail=tail, follow=follow):
            if "item" in message:
                yield LogRecord.from_dict(message["item"])

    async def next_event(self) -> dict[str, Any]:
        """The next unsolicited frame other than ``ready`` (a port request);
        :class:`VmControlError` once the channel closed."""
        if self._events.empty() and self._closed is not None:
            raise self._closed
        message = await self._events.get()
        if message.get("closed"):
            assert self._closed is not None
            raise self._closed
        return message

    async def boot(self) -> dict[str, Any]:
        """How far the guest got starting the pod: ``stage``, ``failure``, ``infra``."""
        result: dict[str, Any] = await self.request("boot")
        return result

    async def port_result(self, request: int, error: str | None) -> None:
        """Answer the guest's port request ``request`` (``error`` None: it is open)."""
        await self.request("port-result", request=request, error=error)

    async def started(self, pid_files: Mapping[str, str]) -> list[str]:
        """Return once each named process's container runs (its ``pid_files`` entry
        exists in the guest) or the process has ended: the guest checks, the host waits
        (without a deadline of its own: bound it with ``asyncio.timeout``). The names of
        the processes that ended without crun ever running their container."""
        result = await self.request("started", timeout=None, files=dict(pid_files))
        return [str(name) for name in result["never_ran"]]

    async def hold(self, grace: float | None = None) -> None:
        """No more restarts of the guest's processes; with ``grace``, the pod's infra
        extensions are told it is stopping (before the host TERMs the containers)."""
        await self.request("hold", grace=grace)

    async def stop(self, grace: float) -> None:
        """Stop every process (SIGTERM, ``grace`` s, SIGKILL) and power the guest off."""
        await self.request("stop", timeout=grace + VM_CONTROL_TIMEOUT, grace=grace)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
