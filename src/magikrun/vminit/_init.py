"""PID 1's duties in the guest: an event loop, reaping, signal forwarding, processes.

Written on ``epoll`` rather than asyncio: under TCG importing asyncio alone costs
the boot over two seconds; and on the C modules (``_signal``, ``_heapq``,
``_collections``) rather than ``signal``, ``selectors``, ``heapq`` and ``collections``,
whose imports (``enum`` for the signal names, ``collections`` for selectors' keys)
cost it a few hundred milliseconds more. As PID 1 this process inherits every orphan, so it alone
calls ``waitpid(-1)`` (woken by SIGCHLD through the signal wakeup fd) and hands each
exit status to whoever started that pid; SIGTERM and SIGINT are passed on to the
processes it runs.
"""

from __future__ import annotations

import _heapq
import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typeshed has no stubs for _signal and _collections
    import signal as _signal
    from collections import deque
    from collections.abc import Callable, Mapping, Sequence
else:
    import _signal
    from _collections import deque

__all__ = ["LogBuffer", "Loop", "Output", "Process", "Supervisor", "now_rfc3339", "power_off"]

_RB_AUTOBOOT = 0x01234567
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def power_off() -> None:
    """End the VM: QEMU runs with ``-no-reboot``, so a reboot makes it exit."""
    import ctypes

    os.sync()
    ctypes.CDLL(None, use_errno=True).reboot(_RB_AUTOBOOT)
    os._exit(1)


def now_rfc3339() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


class Loop:
    """File-descriptor callbacks and timers on one epoll instance."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.running = True

    def _register(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        if fd in self._callbacks:
            raise KeyError(f"fd {fd} is already registered")
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def _unregister(self, fd: int) -> None:
        del self._callbacks[fd]
        self._epoll.unregister(fd)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._register(fd, select.EPOLLIN, callback)

    def remove_reader(self, fd: int) -> None:
        self._unregister(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` while ``fd`` is writable (one kind of interest per fd: callers
        that also read register a ``dup`` of it)."""
        self._register(fd, select.EPOLLOUT, callback)

    def remove_writer(self, fd: int) -> None:
        self._unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> list[bool]:
        """Run ``callback`` after ``delay`` s; set the returned flag's [0] to cancel it."""
        cancelled = [False]
        self._seq += 1

        def guarded() -> None:
            if not cancelled[0]:
                callback()

        _heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, guarded))
        return cancelled

    def run(self) -> None:
        while self.running:
            timeout = -1.0
            if self._timers:
                timeout = max(self._timers[0][0] - time.monotonic(), 0.0)
            for fd, _ in self._epoll.poll(timeout):
                callback = self._callbacks.get(fd)  # None: an earlier callback removed it
                if callback is not None:
                    callback()
            while self._timers and self._timers[0][0] <= time.monotonic():
                _heapq.heappop(self._timers)[2]()


class Output:
    """A child's stdout or stderr pipe, read as it comes."""

    def __init__(
        self, loop: Loop, fd: int, on_data: Callable[[bytes], None], on_eof: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._on_data = on_data
        self._on_eof = on_eof
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        if data:
            self._on_data(data)
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._on_eof()


class Process:
    """A started child: its output handlers run as data comes; ``on_done`` once it is over.

    "Over" means exited and both pipes at EOF, so no output is lost.
    """

    def __init__(self, pid: int, on_done: Callable[[Process], None]) -> None:
        self.pid = pid
        self.exit_code: int | None = None
        self._open = 2
        self._on_done = on_done

    @property
    def done(self) -> bool:
        return self.exit_code is not None and self._open == 0

    def stream_closed(self) -> None:
        self._open -= 1
        self._check()

    def exited(self, code: int) -> None:
        self.exit_code = code
        self._check()

    def _check(self) -> None:
        if self.done:
            self._on_done(self)


class Supervisor:
    """Spawns processes and reaps every child of PID 1."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self._children: dict[int, Process] = {}
        self._signalled: list[int] = []
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r = wake_r
        _signal.set_wakeup_fd(wake_w)
        for sig in (_signal.SIGCHLD, _signal.SIGTERM, _signal.SIGINT):
            _signal.signal(sig, self._note)
        loop.add_reader(wake_r, self._woken)
        self.on_signal: Callable[[int], None] = lambda sig: None

    def _note(self, sig: int, frame: object) -> None:
        if sig != _signal.SIGCHLD:
            self._signalled.append(sig)

    def _woken(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        while self._signalled:
            self.on_signal(self._signalled.pop(0))
        self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is not None:
                code = os.waitstatus_to_exitcode(status)
                child.exited(code if code >= 0 else 128 - code)

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        on_stdout: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
        on_done: Callable[[Process], None],
    ) -> Process:
        """Start ``argv`` in its own session with /dev/null as stdin and piped output."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        previous = os.getcwd()
        try:
            os.chdir(cwd)
            try:
                pid = os.posix_spawnp(
                    argv[0], list(argv), {"PATH": PATH, **env}, file_actions=actions, setsid=True
                )
            finally:
                os.chdir(previous)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        process = Process(pid, on_done)
        self._children[pid] = process
        Output(self.loop, out_r, on_stdout, process.stream_closed)
        Output(self.loop, err_r, on_stderr, process.stream_closed)
        return process

    @staticmethod
    def signal_group(process: Process, sig: int) -> None:
        """Signal a process's session (= process group), if anything of it is left."""
        if process.exit_code is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass


class LogBuffer:
    """The newest log records of one process, with absolute positions for followers."""

    def __init__(self, max_lines: int) -> None:
        self.records: deque[dict[str, str]] = deque(maxlen=max_lines)
        self.total = 0
        self._partial = {"stdout": b"", "stderr": b""}

    @property
    def dropped(self) -> int:
        return self.total - len(self.records)

    def feed(self, stream: str, data: bytes) -> None:
        lines = (self._partial[stream] + data).split(b"\n")
        self._partial[stream] = lines.pop()
        for line in lines:
            self._add(stream, line)

    def flush(self) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._add(stream, rest)
            self._partial[stream] = b""

    def _add(self, stream: str, line: bytes) -> None:
        text = line.decode(errors="replace")
        self.records.append({"time": now_rfc3339(), "stream": stream, "line": text})
        self.total += 1

    def since(self, position: int) -> list[dict[str, str]]:
        """Records from absolute ``position`` on (older ones that were dropped are skipped)."""
        start = max(position - self.dropped, 0)
        return list(self.records)[start:]
