"""The guest's end of the control channel: frames in, handlers, frames out."""

from __future__ import annotations

import binascii
import os
from _operator import _compare_digest as compare_digest  # hmac uses it; hmac loads OpenSSL

from ._init import LogBuffer, Process, Supervisor
from ._protocol import OPS, PORT_NAME, decode, encode

TYPE_CHECKING = False
if TYPE_CHECKING:  # typeshed has no stubs for _signal
    import signal as _signal
    from collections.abc import Callable
    from typing import Any

    from ._infra import InfraRelay
else:
    import _signal  # signal.py builds its enums, which costs the boot under TCG (see _init)

__all__ = ["ControlServer", "Service", "find_port"]

PORTS = "/sys/class/virtio-ports"
_INFRA_STOP_SLACK = 2.0
"""Seconds the infra program gets beyond the grace (its ``on_stop`` may use all of it)."""
STARTED_CHECK = 0.02
"""Seconds between the guest's checks for a pid file (a stat, not a process)."""


def find_port(name: str = PORT_NAME, ports: str = PORTS) -> str:
    """The ``/dev/vportNpM`` device whose virtio-serial port is called ``name``."""
    for entry in sorted(os.listdir(ports)):
        with open(f"{ports}/{entry}/name") as handle:
            if handle.read().strip() == name:
                return f"/dev/{entry}"
    raise FileNotFoundError(f"no virtio-serial port named {name}")


class Service:
    """A process started at boot (a container), restarted by its ``restart`` policy.

    The policy is Kubernetes': ``Always``, ``OnFailure`` (a non-zero exit) or
    ``Never``; a restart waits ``backoff`` seconds, doubling up to ``backoff_cap``.
    An init container (``spec["init"]``) runs once, to completion.
    """

    def __init__(self, name: str, logs: LogBuffer, spec: dict[str, Any]) -> None:
        self.name = name
        self.logs = logs
        self.spec = spec
        self.process: Process | None = None
        self.followers: list[tuple[Any, int]] = []
        self.restarts = 0
        self.restarting = False
        self.init = bool(spec.get("init"))

    def wants_restart(self) -> bool:
        assert self.process is not None
        if self.init:
            return False
        policy = self.spec.get("restart", "Never")
        return policy == "Always" or (policy == "OnFailure" and self.process.exit_code != 0)

    def backoff(self) -> float:
        base = float(self.spec.get("backoff", 1.0))
        return float(min(base * 2**self.restarts, float(self.spec.get("backoff_cap", 10.0))))

    def status(self) -> dict[str, Any]:
        process = self.process
        assert process is not None
        return {
            "state": "exited" if process.done else "running",
            "pid": process.pid,
            "exit_code": process.exit_code if process.done else None,
            "dropped_log_records": self.logs.dropped,
            "restarts": self.restarts,
            "restarting": self.restarting,
        }


class ControlServer:
    """Serves the host's requests; everything but ``hello`` waits for the token.

    :meth:`boot` runs the pod: the infra program (when the pod has extensions) until it
    is ready, then each init container to completion, in order, then the app
    containers. ``stage`` and ``failure`` (what stopped the boot) answer ``boot``.
    """

    def __init__(
        self,
        fd: int,
        config: dict[str, Any],
        supervisor: Supervisor,
        on_stop: Callable[[], None],
    ) -> None:
        self._fd = fd
        self._token = str(config["token"]).encode()
        limits = config["limits"]
        self._max_frame = int(limits["max_frame"])
        self._max_output = int(limits["exec_max_output"])
        self._max_lines = int(limits["log_max_lines"])
        self._infra_buffer = int(limits["infra_buffer"])
        self._infra_message_max = int(limits["infra_message_max"])
        self._supervisor = supervisor
        self._on_stop = on_stop
        self._authenticated = False
        self._buffer = b""
        self._discarding = False
        self.services: dict[str, Service] = {}
        self.holding = False
        """Set by ``hold`` and ``stop``: no more restarts."""
        self.stage = "infra"
        self.failure: dict[str, Any] | None = None
        self.infra: InfraRelay | None = None
        self._inits: list[dict[str, Any]] = []
        self._apps: list[dict[str, Any]] = []
        self._told_stopping = False
        supervisor.on_signal = self._forward
        supervisor.loop.add_reader(fd, self._readable)

    def send(self, message: dict[str, Any]) -> None:
        """Write one frame; the port fd is blocking, and the host always reads."""
        data = encode(message, self._max_frame)
        while data:
            data = data[os.write(self._fd, data) :]

    def boot(self, config: dict[str, Any]) -> None:
        """Start the pod: infra program, init containers one by one, app containers."""
        self._inits = [{**spec, "init": True} for spec in config.get("init", [])]
        self._apps = list(config.get("processes", []))
        infra = config.get("infra")
        if not infra:
            self._next()
            return
        from ._infra import InfraRelay  # (its socket import costs a boot without infra)

        self.infra = InfraRelay(
            self._supervisor,
            infra,
            max_buffer=self._infra_buffer,
            max_message=self._infra_message_max,
            logs=LogBuffer(self._max_lines),
            on_ready=self._next,
            on_failed=self._failed,
            on_port=self._port_request,
        )

    def _next(self) -> None:
        if self.holding:
            return
        if self._inits:
            self.stage = "init"
            self.start(self._inits.pop(0))
            return
        self.stage = "apps"
        for spec in self._apps:
            self.start(spec)

    def _failed(self, failure: dict[str, Any]) -> None:
        self.failure = failure

    def _port_request(self, message: dict[str, Any]) -> None:
        """An extension's port request, passed on to the host as an unsolicited frame."""
        self.send(
            {
                "event": "port",
                "request": message.get("id"),
                "protocol": message.get("protocol"),
                "host_port": message.get("host_port"),
                "container_port": message.get("container_port"),
            }
        )

    def _event(self, kind: str, **fields: Any) -> None:
        if self.infra is not None:
            self.infra.send_event(kind, **fields)

    def start(self, spec: dict[str, Any]) -> None:
        """Start one boot-time process whose output becomes log records (kept across
        restarts)."""
        service = self.services.get(str(spec["name"]))
        restarted = service is not None
        if service is None:
            service = Service(str(spec["name"]), LogBuffer(self._max_lines), spec)
            self.services[service.name] = service
        service.restarting = False
        service.process = self._supervisor.spawn(
            [str(arg) for arg in spec["argv"]],
            {str(k): str(v) for k, v in spec.get("env", {}).items()},
            str(spec.get("cwd", "/")),
            lambda data: self._logged(service, "stdout", data),
            lambda data: self._logged(service, "stderr", data),
            lambda process: self._service_done(service),
        )
        if restarted:
            self._event("ContainerRestarted", name=service.name, restart_count=service.restarts)
        else:
            self._event("ContainerCreated", name=service.name)
        self._event("ContainerStarted", name=service.name, pid=service.process.pid)

    def _forward(self, sig: int) -> None:
        for service in self.services.values():
            if service.process is not None:
                Supervisor.signal_group(service.process, sig)

    def _logged(self, service: Service, stream: str, data: bytes) -> None:
        service.logs.feed(stream, data)
        self._feed_followers(service)

    def _service_done(self, service: Service) -> None:
        service.logs.flush()
        assert service.process is not None
        code = service.process.exit_code
        reason = "Completed" if code == 0 else "Error"
        self._event("ContainerExited", name=service.name, exit_code=code, reason=reason)
        if service.init:
            if code == 0:
                self._next()
            else:
                self.failure = {"kind": "init", "name": service.name, "exit_code": code}
        elif not self.holding and service.wants_restart():
            service.restarting = True
            delay = service.backoff()
            service.restarts += 1
            self._supervisor.loop.call_later(delay, lambda: self._restart(service))
        self._feed_followers(service)

    def _restart(self, service: Service) -> None:
        if self.holding:
            service.restarting = False
            self._feed_followers(service)
            return
        self.start(service.spec)

    def _feed_followers(self, service: Service) -> None:
        finished = service.process is not None and service.process.done and not service.restarting
        remaining = []
        for request_id, position in service.followers:
            for record in service.logs.since(position):
                self.send({"id": request_id, "item": record})
            if finished:
                self.send({"id": request_id, "ok": True, "result": None})
            else:
                remaining.append((request_id, service.logs.total))
        service.followers = remaining

    def _readable(self) -> None:
        data = os.read(self._fd, 65536)
        if not data:
            # The host end is not connected: poll again later instead of spinning on HUP.
            loop = self._supervisor.loop
            loop.remove_reader(self._fd)
            loop.call_later(0.1, lambda: loop.add_reader(self._fd, self._readable))
            return
        self._buffer += data
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                if len(self._buffer) > self._max_frame:
                    self._buffer, self._discarding = b"", True
                return
            self._buffer = rest
            if self._discarding or len(line) + 1 > self._max_frame:
                self._discarding = False
                error = f"frame over {self._max_frame} bytes"
                self.send({"id": None, "ok": False, "error": error})
                continue
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        request_id: Any = None
        try:
            request: dict[str, Any] = decode(line)
            request_id = request.get("id")
            op = request.get("op")
            if op == "hello":
                # a failed hello also ends an earlier session's rights
                self._authenticated = compare_digest(
                    str(request.get("token", "")).encode(), self._token
                )
                if not self._authenticated:
                    raise PermissionError("bad token")
                self.send({"id": request_id, "ok": True, "result": None})
                return
            if not self._authenticated:
                raise PermissionError("say hello with the VM's token first")
            handler = None
            if isinstance(op, str) and op in OPS:
                handler = getattr(self, "_op_" + op.replace("-", "_"), None)
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            handler(request_id, request)
        except Exception as exc:  # noqa: BLE001 - every failure is the host's answer
            self.send({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _op_ping(self, request_id: Any, request: dict[str, Any]) -> None:
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        result = {"kernel": os.uname().release, "uptime": uptime}
        self.send({"id": request_id, "ok": True, "result": result})

    def _op_exec(self, request_id: Any, request: dict[str, Any]) -> None:
        argv = [str(arg) for arg in request["argv"]]
        if not argv:
            raise ValueError("exec needs a command")
        env = {str(k): str(v) for k, v in request.get("env", {}).items()}
        out: list[bytes] = []
        err: list[bytes] = []
        state = {"truncated": False, "timed_out": False}

        def collect(sink: list[bytes]) -> Callable[[bytes], None]:
            def add(data: bytes) -> None:
                room = self._max_output - sum(map(len, sink))
                if len(data) > room:
                    state["truncated"] = True
                sink.append(data[: max(room, 0)])

            return add

        def done(process: Process) -> None:
            timer[0] = True
            result = {
                "exit_code": process.exit_code,
                "stdout": binascii.b2a_base64(b"".join(out), newline=False).decode(),
                "stderr": binascii.b2a_base64(b"".join(err), newline=False).decode(),
                **state,
            }
            self.send({"id": request_id, "ok": True, "result": result})

        process = self._supervisor.spawn(
            argv, env, str(request.get("cwd", "/")), collect(out), collect(err), done
        )

        def overdue() -> None:
            state["timed_out"] = True
            Supervisor.signal_group(process, _signal.SIGKILL)

        timer = self._supervisor.loop.call_later(float(request["limit"]), overdue)

    def _op_status(self, request_id: Any, request: dict[str, Any]) -> None:
        result = {name: service.status() for name, service in self.services.items()}
        self.send({"id": request_id, "ok": True, "result": result})

    def _op_boot(self, request_id: Any, request: dict[str, Any]) -> None:
        """How far the boot got, what stopped it, the infra program's state."""
        result = {
            "stage": self.stage,
            "failure": self.failure,
            "infra": None if self.infra is None else self.infra.status(),
        }
        self.send({"id": request_id, "ok": True, "result": result})

    def _op_port_result(self, request_id: Any, request: dict[str, Any]) -> None:
        """The host's answer to a port request (``request``: its id; ``error`` or null)."""
        if self.infra is None:
            raise ValueError("this pod runs no infra program")
        error = request.get("error")
        self.infra.port_result(int(request["request"]), None if error is None else str(error))
        self.send({"id": request_id, "ok": True, "result": None})

    def _op_logs(self, request_id: Any, request: dict[str, Any]) -> None:
        service = self.services.get(str(request["name"]))
        if service is None:
            raise KeyError(f"no process {request['name']!r}")
        tail = request.get("tail")
        logs = service.logs
        start = 0 if tail is None else max(logs.total - int(tail), 0)
        service.followers.append((request_id, start))
        if not request.get("follow"):
            for record in logs.since(start):
                self.send({"id": request_id, "item": record})
            service.followers.pop()
            self.send({"id": request_id, "ok": True, "result": None})
            return
        self._feed_followers(service)

    def _stopping(self, grace: float) -> None:
        """No more restarts or boot steps; the extensions hear ``PodStopping`` once."""
        self.holding = True
        if not self._told_stopping:
            self._told_stopping = True
            self._event("PodStopping", grace=grace)

    def _op_hold(self, request_id: Any, request: dict[str, Any]) -> None:
        """No more restarts (before the host stops the containers one by one); with
        ``grace``, the extensions are told the pod is stopping."""
        self.holding = True
        if request.get("grace") is not None:
            self._stopping(float(request["grace"]))
        self.send({"id": request_id, "ok": True, "result": None})

    def _op_stop(self, request_id: Any, request: dict[str, Any]) -> None:
        """TERM the containers, KILL them after ``grace``; then the infra program, told
        of every exit first, gets its own ``grace`` the same way; answer, power off."""
        grace = float(request.get("grace", 10.0))
        self._stopping(grace)
        apps = [s.process for s in self.services.values() if s.process and not s.process.done]
        infra = self.infra
        loop = self._supervisor.loop
        infra_told = [infra is None]

        def kill_all(processes: list[Process]) -> None:
            for process in processes:
                Supervisor.signal_group(process, _signal.SIGKILL)

        def finish() -> None:
            if not all(process.done for process in apps):
                loop.call_later(0.02, finish)
                return
            if not infra_told[0] and infra is not None:
                infra_told[0] = True
                infra.shutdown()
                loop.call_later(grace + _INFRA_STOP_SLACK, lambda: kill_all([infra.process]))
            if infra is not None and not infra.process.done:
                loop.call_later(0.02, finish)
                return
            self.send({"id": request_id, "ok": True, "result": None})
            loop.call_later(0.05, self._on_stop)

        for process in apps:
            Supervisor.signal_group(process, _signal.SIGTERM)
        loop.call_later(grace, lambda: kill_all(apps))
        finish()

    def _op_started(self, request_id: Any, request: dict[str, Any]) -> None:
        """Answer once each named process has started its container, so the host waits
        instead of polling with execs (each one a process under TCG).

        ``files`` maps process names to the pid file their ``crun run --pid-file``
        writes once the container runs; a process that already ended (or restarts)
        counts as started. The answer names those that ended with no pid file: crun
        could not run their container (a missing program), which fails the pod, where a
        container that ran and then exited is a running pod that fails later, as natively.
        """
        files = {str(name): str(path) for name, path in request["files"].items()}
        unknown = sorted(set(files) - set(self.services))
        if unknown:
            raise KeyError(f"no process {unknown[0]!r}")

        def started(service: Service, path: str) -> bool:
            process = service.process
            over = process is None or process.done or service.restarts > 0
            return over or service.restarting or os.path.exists(path)

        def check() -> None:
            if all(started(self.services[name], path) for name, path in files.items()):
                never_ran = [name for name, path in files.items() if not os.path.exists(path)]
                self.send({"id": request_id, "ok": True, "result": {"never_ran": never_ran}})
            else:
                self._supervisor.loop.call_later(STARTED_CHECK, check)

        check()
