"""The per-container monitor: owns the container process, its exit code and its log.

A monitor is a small process, detached from whoever created the container (own
session, re-parented to init), that is a child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``). It starts one argv — for a native container
``crun create …``, whose forked container init is re-parented to the monitor, for
a wasm container the wasm worker — and then:

* reports once, over a pipe, whether creation worked and the container's pid;
* writes the container's stdout/stderr to a CRI-format log
  (``RFC3339Nano stream P|F line``), line by line, so it can be read while it runs;
* records the exit code (128+N for signal N) in ``<dir>/exit`` when the container
  process ends, so neither depends on the creating process staying alive.

It imports only the standard library and nothing of magikrun, so that it can run
as ``python -I -S _monitor.py SPEC REPORT_FD`` as well as in a forked child of a
warm magikrun process (see ``magikrun._process.start_monitor``). Only in the
latter can the container process be a ``child`` callable run in a fork of the
monitor instead of an exec of ``argv`` (how a wasm worker skips interpreter
start-up and imports).

In ``ready="fd"`` mode a process that reports anything but ``ok`` is killed and
the monitor ends without an exit record: a container that never became ready
has no exit code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn, Protocol

__all__ = ["EXIT_FILE", "LOG_FILE", "MonitorSpec", "read_exit", "rfc3339_nano", "run_monitor"]

EXIT_FILE = "exit"
"""Name, inside the container directory, of the exit record the monitor writes."""
LOG_FILE = "container.log"
"""Name, inside the container directory, of the CRI-format log."""

_PR_SET_CHILD_SUBREAPER = 36
_MAX_LOG_LINE = 16 * 1024
"""Bytes after which a line without newline is written as a partial (``P``) record."""
_DRAIN_SECONDS = 2.0
"""How long output is still collected after the container process exited."""
_KILLED_WAIT = 5.0
"""Seconds the monitor waits for a process it SIGKILLed to be gone (D state aside)."""
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class MonitorSpec:
    """What a monitor runs and where it keeps its records."""

    argv: list[str]
    directory: str
    """The container's state directory: exit record, log and pid file go here."""
    ready: str = "exit"
    """``"exit"``: argv is an OCI runtime ``create``; creation worked when it exits 0,
    and the container process is the pid it wrote to ``pid_file``.
    ``"fd"``: argv is the container process itself; it writes one line to the fd
    named by ``$MAGIKRUN_READY_FD`` once ready (``ok``, or an error text)."""
    pid_file: str = ""
    log: bool = True
    """``True``: stdout/stderr go to the CRI log. ``False``: the container uses the
    monitor's stdio (a foreground ``run``)."""
    inherit_stdin: bool = False
    env: dict[str, str] | None = None
    cwd: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MonitorSpec:
        return cls(**json.loads(text))


def rfc3339_nano(ns: int | None = None) -> str:
    """``2026-01-02T03:04:05.123456789Z`` for a time in nanoseconds (now by default)."""
    ns = time.time_ns() if ns is None else ns
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def read_exit(directory: str) -> dict[str, Any] | None:
    """The exit record a monitor wrote, or ``None`` while the container has not exited."""
    try:
        with open(os.path.join(directory, EXIT_FILE), "rb") as f:
            record: dict[str, Any] = json.loads(f.read())
    except FileNotFoundError:
        return None
    return record


class _CriLog:
    """Turns one stream's bytes into CRI log records appended to a shared fd."""

    def __init__(self, fd: int, stream: str) -> None:
        self.fd = fd
        self.stream = stream.encode()
        self.pending = b""

    def feed(self, data: bytes) -> None:
        self.pending += data
        while True:
            newline = self.pending.find(b"\n", 0, _MAX_LOG_LINE + 1)
            if newline >= 0:
                self._write(b"F", self.pending[:newline])
                self.pending = self.pending[newline + 1 :]
            elif len(self.pending) > _MAX_LOG_LINE:
                self._write(b"P", self.pending[:_MAX_LOG_LINE])
                self.pending = self.pending[_MAX_LOG_LINE:]
            else:
                break

    def close(self) -> None:
        if self.pending:
            self._write(b"F", self.pending)
            self.pending = b""

    def _write(self, tag: bytes, line: bytes) -> None:
        os.write(self.fd, b"%s %s %s %s\n" % (rfc3339_nano().encode(), self.stream, tag, line))


ChildMain = Callable[[], NoReturn]
"""A container process as a function, run in a fork of the monitor (never returns)."""


class _Launcher(Protocol):
    pid: int
    returncode: int | None


@dataclass(slots=True)
class _Forked:
    """The container process when it is a fork of the monitor (no exec)."""

    pid: int
    returncode: int | None = None


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _report(fd: int | None, message: dict[str, Any]) -> None:
    if fd is None:
        return
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise


class _Monitor:
    def __init__(self, spec: MonitorSpec, report_fd: int, child: ChildMain | None) -> None:
        self.spec = spec
        self.child = child
        self.not_ready = False
        self.report_fd: int | None = report_fd
        self.readers: dict[int, _CriLog | None] = {}
        self.stderr_before_ready = b""
        self.container_pid: int | None = None
        self.exit_code: int | None = None
        self.reaped: dict[int, int] = {}
        self.ready_fd = -1
        self.ready_line = b""
        self.err_fd = -1
        self.childless = False

    def run(self) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        launcher = self._spawn()
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        for fd in self.readers:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
        drain_deadline: float | None = None
        while True:
            self._reap(launcher)
            if self.exit_code is not None and drain_deadline is None:
                drain_deadline = time.monotonic() + _DRAIN_SECONDS
            if self.not_ready:
                self._reap_killed(launcher)
                return 1
            if self.exit_code is not None and not self.readers:
                break
            if self.report_fd is None and self.childless and self.exit_code is None:
                break  # the container process ended without being our descendant
            if (
                self.report_fd is not None
                and launcher.returncode is not None
                and not (self.spec.ready == "fd" and self.ready_fd in self.readers)
            ):
                if not self._check_ready(launcher):
                    return 1
            if drain_deadline is not None and time.monotonic() >= drain_deadline:
                break
            timeout = None if drain_deadline is None else max(drain_deadline - time.monotonic(), 0)
            for fd, _events in poller.poll(None if timeout is None else int(timeout * 1000) + 1):
                if fd == wake_r:
                    while True:
                        try:
                            if not os.read(wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    continue
                self._read(fd, poller, launcher)
        for writer in self.readers.values():
            if writer is not None:
                writer.close()
        if self.exit_code is not None:
            record = {"exitCode": self.exit_code, "finished": rfc3339_nano()}
            _write_atomic(os.path.join(self.spec.directory, EXIT_FILE), json.dumps(record).encode())
        return 0

    def _spawn(self) -> _Launcher:
        spec = self.spec
        env = dict(os.environ if spec.env is None else spec.env)
        pass_fds: tuple[int, ...] = ()
        ready_w = -1
        if spec.ready == "fd":
            self.ready_fd, ready_w = os.pipe2(os.O_CLOEXEC)
            env["MAGIKRUN_READY_FD"] = str(ready_w)
            pass_fds = (ready_w,)
            self.readers[self.ready_fd] = None
        out_w = err_w = None
        if spec.log:
            log_fd = os.open(
                os.path.join(spec.directory, LOG_FILE),
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            self.readers[out_r] = _CriLog(log_fd, "stdout")
            self.readers[err_r] = _CriLog(log_fd, "stderr")
            self.err_fd = err_r
        stdin = None if spec.inherit_stdin else subprocess.DEVNULL
        try:
            if self.child is not None:
                return self._fork_child(self.child, env, out_w, err_w, ready_w)
            return subprocess.Popen(
                spec.argv,
                stdin=stdin,
                stdout=out_w,
                stderr=err_w,
                close_fds=True,
                pass_fds=pass_fds,
                env=env,
                cwd=spec.cwd,
            )
        finally:
            for fd in (out_w, err_w, ready_w):
                if fd is not None and fd >= 0:
                    os.close(fd)

    def _fork_child(
        self,
        child: ChildMain,
        env: dict[str, str],
        out_w: int | None,
        err_w: int | None,
        ready_w: int,
    ) -> _Forked:
        """Fork the container process and give it what ``Popen`` would: stdio, env, cwd,
        default signal handling, and no fd but 0-2 and the ready fd."""
        pid = os.fork()
        if pid != 0:
            return _Forked(pid)
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            if not self.spec.inherit_stdin:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
            for fd, target in ((out_w, 1), (err_w, 2)):
                if fd is not None:
                    os.dup2(fd, target)
            if ready_w >= 0:
                if ready_w != 3:
                    os.dup2(ready_w, 3)
                env["MAGIKRUN_READY_FD"] = "3"
            os.closerange(4 if ready_w >= 0 else 3, os.sysconf("SC_OPEN_MAX"))
            os.environ.clear()
            os.environ.update(env)
            if self.spec.cwd is not None:
                os.chdir(self.spec.cwd)
            child()
        finally:
            os._exit(127)

    def _read(self, fd: int, poller: select.poll, launcher: _Launcher) -> None:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        writer = self.readers.get(fd)
        if fd == self.ready_fd:
            if data:
                self.ready_line += data
                if b"\n" not in self.ready_line:
                    return
            poller.unregister(fd)
            del self.readers[fd]
            os.close(fd)
            self._ready_from_fd(launcher)
            return
        if not data:
            poller.unregister(fd)
            del self.readers[fd]
            os.close(fd)
            if writer is not None:
                writer.close()
            return
        if fd == self.err_fd and self.report_fd is not None:
            self.stderr_before_ready = (self.stderr_before_ready + data)[-8192:]
        if writer is not None:
            writer.feed(data)

    def _ready_from_fd(self, launcher: _Launcher) -> None:
        line = self.ready_line.split(b"\n", 1)[0].decode(errors="replace")
        if line == "ok" and launcher.returncode is None:
            self.container_pid = launcher.pid
            self._send({"ok": True, "pid": launcher.pid})
            return
        self._send_failure(launcher, line or "the process closed its ready fd")
        if launcher.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(launcher.pid, signal.SIGKILL)
        self.not_ready = True

    def _check_ready(self, launcher: _Launcher) -> bool:
        """Called once the launcher has exited while a report is still owed."""
        if self.spec.ready == "fd":
            self._send_failure(launcher, "the process exited before it was ready")
            return False
        if launcher.returncode != 0:
            self._send_failure(launcher, "")
            return False
        try:
            with open(self.spec.pid_file, "rb") as f:
                pid = int(f.read().strip() or b"0")
        except (OSError, ValueError) as exc:
            self._send_failure(launcher, f"no container pid: {exc}")
            return False
        self.container_pid = pid
        if pid in self.reaped:
            self.exit_code = _exit_code(self.reaped[pid])
        self._send({"ok": True, "pid": pid})
        return True

    def _send(self, message: dict[str, Any]) -> None:
        message["monitor_pid"] = os.getpid()
        _report(self.report_fd, message)
        if self.report_fd is not None:
            os.close(self.report_fd)
            self.report_fd = None

    def _send_failure(self, launcher: _Launcher, reason: str) -> None:
        if self.err_fd in self.readers:
            while True:
                try:
                    data = os.read(self.err_fd, _READ_CHUNK)
                except BlockingIOError:
                    break
                if not data:
                    break
                self.stderr_before_ready = (self.stderr_before_ready + data)[-8192:]
        self._send(
            {
                "ok": False,
                "status": launcher.returncode,
                "reason": reason,
                "stderr": self.stderr_before_ready.decode(errors="replace"),
            }
        )

    def _reap_killed(self, launcher: _Launcher) -> None:
        """Wait for the process killed for never becoming ready, so that nothing of it
        outlives the monitor (SIGKILL takes effect asynchronously)."""
        deadline = time.monotonic() + _KILLED_WAIT
        while launcher.returncode is None and not self.childless:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.005)
            self._reap(launcher)

    def _reap(self, launcher: _Launcher) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.childless = True
                return
            if pid == 0:
                return
            if pid == launcher.pid:
                launcher.returncode = _exit_code(status)
            if pid == self.container_pid:
                self.exit_code = _exit_code(status)
            else:
                self.reaped[pid] = status


def run_monitor(spec: MonitorSpec, report_fd: int, child: ChildMain | None = None) -> int:
    """Be the monitor in this process; returns the monitor's own exit status.

    With ``child`` the container process is a fork running it instead of ``spec.argv``.
    """
    return _Monitor(spec, report_fd, child).run()


def _main(argv: list[str]) -> None:
    spec = MonitorSpec.from_json(argv[1])
    report_fd = int(argv[2])
    if os.fork() != 0:
        os._exit(0)
    os._exit(run_monitor(spec, report_fd))


if __name__ == "__main__":
    _main(sys.argv)
