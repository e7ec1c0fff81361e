"""The one way magikrun starts child processes (crun, runc, monitors, later qemu).

Every child gets ``close_fds`` with an explicit ``pass_fds``, no shell, and a clean
end: when the awaiting task fails or is cancelled, the child gets SIGTERM, a
bounded grace period, SIGKILL, and is waited for before the error propagates
(trio's ``run_process`` discipline). Waiting uses a pidfd on the event loop, not
a helper thread, so a single-threaded caller stays single-threaded (which is
what lets :func:`start_monitor` fork the warm interpreter safely).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import MagikrunTimeout

if TYPE_CHECKING:
    from .runtime import _monitor

__all__ = [
    "Completed",
    "MonitorReport",
    "detached_argv",
    "forkable",
    "run",
    "start_monitor",
    "terminate",
    "wait_exit",
]

DEFAULT_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when a child must be stopped."""

_DETACH = """
import json, os, sys
pid_file, path, target = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
r, w = os.pipe()
if os.fork():
    os.close(w)
    os._exit(0 if os.read(r, 1) == b"1" else 1)
os.close(r)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
log = os.open(pid_file + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
os.dup2(null, 0); os.dup2(null, 1); os.dup2(log, 2); os.close(null); os.close(log)
with open("/proc/self/stat", "rb") as f:
    start = f.read().rsplit(b")", 1)[1].split()[19].decode()
with open(pid_file + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {start}")
os.replace(pid_file + ".tmp", pid_file)
os.write(w, b"1"); os.close(w)
sys.path[:] = path
module, _, function = target.partition(":")
getattr(__import__(module, fromlist=[function]), function)(sys.argv[4:])
"""


def detached_argv(pid_file: str, target: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``target`` (``"module:function"``, called with ``args``) as a
    daemon: its own session, stdin/stdout on /dev/null, stderr appended to
    ``pid_file.log``. The command exits 0 once ``pid_file`` holds the daemon's pid and
    start time, written before any (slow) import of magikrun, so the caller can record
    it and no zombie stays with the caller; 1 if the daemon died before that.
    """
    path = json.dumps(sys.path)
    return [sys.executable, "-I", "-S", "-c", _DETACH, pid_file, path, target, *args]


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished child: its argv, exit status (128+N for signal N) and captured output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


async def wait_exit(pid: int | None) -> None:
    """Wait, without a thread, until process ``pid`` (any process, not only a child) exits."""
    if pid is None:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def _exited_now() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, _exited_now)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    if proc.returncode is None:
        await wait_exit(proc.pid)
    code = proc.wait()
    return 128 - code if code < 0 else code


async def _collect(fd: int, sink: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        while True:
            await ready.wait()
            ready.clear()
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return
            sink.append(data)
    finally:
        loop.remove_reader(fd)


async def terminate(proc: subprocess.Popen[bytes], grace: float = DEFAULT_GRACE) -> None:
    """SIGTERM, wait up to ``grace`` seconds, SIGKILL, and wait until it is gone.

    Runs as its own task and is awaited to the end even if the caller is
    cancelled again meanwhile, so the child never outlives this call.
    """

    async def _stop() -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(_exited(proc), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await _exited(proc)

    task = asyncio.ensure_future(_stop())
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    task.result()


async def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    capture: bool = True,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    grace: float = DEFAULT_GRACE,
) -> Completed:
    """Run ``argv`` to completion; its exit status and (with ``capture``) its output.

    A non-zero exit is not an error here: callers map statuses to their own errors.
    Raises :class:`~magikrun.errors.MagikrunTimeout` after stopping the child when
    ``timeout`` runs out.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        close_fds=True,
        pass_fds=tuple(pass_fds),
        env=None if env is None else dict(env),
        cwd=cwd,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    try:
        if proc.stdin is not None:
            with proc.stdin:
                proc.stdin.write(input or b"")
        async with asyncio.timeout(timeout):
            readers = []
            if proc.stdout is not None and proc.stderr is not None:
                readers = [_collect(proc.stdout.fileno(), out), _collect(proc.stderr.fileno(), err)]
            await asyncio.gather(*readers)
            code = await _exited(proc)
    except TimeoutError as exc:
        await terminate(proc, grace)
        raise MagikrunTimeout(
            f"{argv[0]} did not finish within {timeout} s and was stopped",
            argv=" ".join(argv),
        ) from exc
    except BaseException:
        await terminate(proc, grace)
        raise
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return Completed(tuple(argv), code, b"".join(out), b"".join(err))


@dataclass(frozen=True, slots=True)
class MonitorReport:
    """What a monitor said about creation: the container pid, or why it failed."""

    ok: bool
    monitor_pid: int
    pid: int | None = None
    status: int | None = None
    reason: str = ""
    stderr: str = ""
    forked: bool = False
    """True when the monitor is a fork of this process (see :func:`start_monitor`)."""


def forkable() -> bool:
    """True when this process has one thread, the only state in which forking it is safe.

    Counts the kernel's threads, not Python's, so threads of native libraries
    (a compiler's thread pool, say) count too.
    """
    return (
        len(os.listdir("/proc/self/task")) == 1
        and threading.current_thread() is threading.main_thread()
    )


def _fork_monitor(
    spec: _monitor.MonitorSpec, report_w: int, child: _monitor.ChildMain | None
) -> int:
    """Fork the warm interpreter into a detached monitor; the session id (= pgid)."""
    from .runtime import _monitor  # runtime sits above this module: imported on use

    pid = os.fork()
    if pid != 0:
        os.waitpid(pid, 0)
        return pid
    code = 1
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if spec.log:
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            os.close(null)
        os.closerange(3, report_w)
        os.closerange(report_w + 1, os.sysconf("SC_OPEN_MAX"))
        code = _monitor.run_monitor(spec, report_w, child)
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return to the caller
        with contextlib.suppress(OSError):
            os.write(report_w, json.dumps({"ok": False, "reason": repr(exc)}).encode() + b"\n")
    finally:
        os._exit(code)


def _exec_monitor(spec: _monitor.MonitorSpec, report_w: int) -> subprocess.Popen[bytes]:
    """Start the monitor as a lean fresh interpreter (``-I -S``, stdlib only)."""
    from .runtime import _monitor

    stdio = subprocess.DEVNULL if spec.log else None
    return subprocess.Popen(
        [sys.executable, "-I", "-S", _monitor.__file__, spec.to_json(), str(report_w)],
        stdin=stdio,
        stdout=stdio,
        stderr=stdio,
        close_fds=True,
        pass_fds=(report_w,),
        start_new_session=True,
    )


async def start_monitor(
    spec: _monitor.MonitorSpec,
    *,
    timeout: float | None = None,
    child: _monitor.ChildMain | None = None,
) -> MonitorReport:
    """Start a detached monitor for ``spec`` and wait for its creation report.

    A single-threaded caller (see :func:`forkable`) forks itself (about a
    millisecond), and then ``child``, if given, is the container process: the
    monitor forks again and calls it, with no exec. A caller with other threads
    alive cannot fork safely; it starts ``python -I -S`` instead, whose container
    process is ``spec.argv``. ``MonitorReport.forked`` says which happened.
    If waiting fails or is cancelled, the monitor's whole process group gets
    SIGTERM, a grace period, then SIGKILL, before the error propagates.
    """
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    launcher: subprocess.Popen[bytes] | None = None
    forked = forkable()
    try:
        if forked:
            pgid = _fork_monitor(spec, report_w, child)
        else:
            launcher = _exec_monitor(spec, report_w)
            pgid = launcher.pid
    finally:
        os.close(report_w)
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            await _collect(report_r, chunks)
            if launcher is not None:
                await _exited(launcher)
    except BaseException:
        await _stop_group(pgid)
        raise
    finally:
        os.close(report_r)
    line = b"".join(chunks).split(b"\n", 1)[0]
    if not line:
        return MonitorReport(
            ok=False, monitor_pid=0, reason="the monitor died before reporting", forked=forked
        )
    message = json.loads(line)
    return MonitorReport(
        ok=bool(message.get("ok")),
        monitor_pid=int(message.get("monitor_pid", 0)),
        pid=message.get("pid"),
        status=message.get("status"),
        reason=str(message.get("reason", "")),
        stderr=str(message.get("stderr", "")),
        forked=forked,
    )


async def _stop_group(pgid: int, grace: float = DEFAULT_GRACE) -> None:
    """SIGTERM a process group, then SIGKILL it after ``grace``; wait until it is empty."""

    async def _stop() -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while loop.time() < deadline:
                await asyncio.sleep(0.01)
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return

    task = asyncio.ensure_future(_stop())
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    task.result()
