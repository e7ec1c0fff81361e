"""The pod's infra program in the guest: vminit starts it and is its event source.

vminit runs the host's infra program unchanged (``python -I -m magikrun.infra POD DIR``)
before any container, connects to ``DIR/infra.sock`` from its event loop and waits
for ``ready`` (or ``failed``); then it writes container events in the JSON that
``magikrun.infra._events.event_to_json`` writes. Writing never blocks PID 1: messages
wait in a bounded buffer, events that do not fit are counted, and an ``EventsDropped``
event tells the extensions how many once there is room again. The program's port
requests go to the host as unsolicited frames (see :mod:`._protocol`), and the host's
answer is written back as the ``port-result`` the program waits for.

``DIR`` is on the guest's tmpfs, since a unix socket cannot be reached through a 9p
share; vminit copies the host-written ``pod.json`` into it and links ``DIR/state`` to
the ``state`` directory beside that file, so extensions' state is seen on the host as
it is for native pods. Standard library only.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import time
from collections.abc import Callable

from ._init import LogBuffer, Process, Supervisor

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["InfraRelay", "event"]

_CONNECT_POLL = 0.05
_LOG_TAIL = 5


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event as ``event_to_json`` writes it: ``kind`` (the class name), fields, time."""
    return {"kind": kind, **fields, "timestamp": time.time()}


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class InfraRelay:
    """Runs the infra program and holds vminit's one connection to it.

    ``state`` goes ``starting`` → ``ready`` (or ``failed``); ``on_failed`` gets
    ``{"extension": NAME or None, "error": TEXT}``, ``on_port`` each port request.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        spec: dict[str, Any],
        *,
        max_buffer: int,
        max_message: int,
        logs: LogBuffer,
        on_ready: Callable[[], None],
        on_failed: Callable[[dict[str, Any]], None],
        on_port: Callable[[dict[str, Any]], None],
    ) -> None:
        self._loop = supervisor.loop
        self._max_buffer = max_buffer
        self._max_message = max_message
        self.logs = logs
        """The program's output, whose tail explains an exit before ``ready``."""
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._on_port = on_port
        self.directory = str(spec["directory"])
        self.state = "starting"
        self.dropped = 0
        """Events not buffered since the last ``EventsDropped`` went out."""
        self.dropped_total = 0
        self._out: collections.deque[bytes] = collections.deque()
        self._in = b""
        self._sock: socket.socket | None = None
        self._write_fd: int | None = None
        self._closing = False
        _prepare(self.directory, str(spec["config"]))
        self.process: Process = supervisor.spawn(
            [str(arg) for arg in spec["argv"]],
            {},
            "/",
            lambda data: logs.feed("stdout", data),
            lambda data: logs.feed("stderr", data),
            self._exited,
        )
        self._loop.call_later(_CONNECT_POLL, self._connect)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "dropped_events": self.dropped_total}

    def _connect(self) -> None:
        if self.process.exit_code is not None or self._closing:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.directory + "/infra.sock")
        except OSError:  # not listening yet: the program is still importing
            sock.close()
            self._loop.call_later(_CONNECT_POLL, self._connect)
            return
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            return
        self._in += data
        while True:
            line, newline, rest = self._in.partition(b"\n")
            if not newline:
                break
            self._in = rest
            self._message(line)
        if len(self._in) > self._max_message:
            self.logs.feed("stderr", b"vminit: the infra program sent an oversized message\n")
            self._close()

    def _message(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "ready" and self.state == "starting":
            self.state = "ready"
            self._on_ready()
        elif kind == "failed" and self.state == "starting":
            self.state = "failed"
            extension, error = str(message.get("extension")), str(message.get("error"))
            self._on_failed({"extension": extension, "error": error})
        elif kind == "port":
            self._on_port(message)

    def _exited(self, process: Process) -> None:
        self.logs.flush()
        if self.state == "starting":
            self.state = "failed"
            tail = " / ".join(r["line"] for r in list(self.logs.records)[-_LOG_TAIL:])
            error = f"the infra program exited with code {process.exit_code}: {tail}"
            self._on_failed({"extension": None, "error": error})
        self._close()

    def send_event(self, kind: str, **fields: Any) -> None:
        """Queue one event for the extensions; counted as dropped when the buffer is full."""
        if self.state != "ready" or self._sock is None or self._closing:
            return
        if len(self._out) >= self._max_buffer:
            self.dropped += 1
            self.dropped_total += 1
            return
        self._out.append(_line({"type": "event", "event": event(kind, **fields)}))
        self._flush()

    def port_result(self, request: int, error: str | None) -> None:
        """The host's answer to port request ``request`` (not bounded: one per request)."""
        if self._sock is None:
            raise ConnectionError("the infra program is not connected")
        self._out.append(_line({"type": "port-result", "id": request, "error": error}))
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            if not self._out and self.dropped and not self._closing:
                count, self.dropped = self.dropped, 0
                report = event("EventsDropped", count=count)
                self._out.append(_line({"type": "event", "event": report}))
            if not self._out:
                break
            data = self._out[0]
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close()
                return
            if sent < len(data):
                self._out[0] = data[sent:]
                if self._write_fd is None:
                    self._write_fd = os.dup(sock.fileno())
                    self._loop.add_writer(self._write_fd, self._flush)
                return
            self._out.popleft()
        self._stop_writing()
        if self._closing:
            self._close()

    def _stop_writing(self) -> None:
        if self._write_fd is not None:
            self._loop.remove_writer(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = None

    def _close(self) -> None:
        self._stop_writing()
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._out.clear()
        if self._closing:
            Supervisor.signal_group(self.process, signal.SIGTERM)

    def shutdown(self) -> None:
        """Close the connection once every queued event is out, then TERM the program
        (which then drains its queues and runs ``on_stop`` within the pod's grace)."""
        if self._closing:
            return
        self._closing = True
        if self._sock is None or not self._out:
            self._close()


def _prepare(directory: str, config: str) -> None:
    os.makedirs(directory, mode=0o700)
    with open(config, "rb") as source, open(directory + "/pod.json", "wb") as target:
        target.write(source.read())
    os.symlink(os.path.dirname(config) + "/state", directory + "/state")
