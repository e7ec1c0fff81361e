"""The container process of a wasm container: one process per module.

The worker is started by the container's monitor (``ready="fd"``) in one of two
ways. Usually the monitor is a fork of the creating process, which has already
compiled the module (or taken it from the cache), and the worker is a fork of the
monitor that calls :func:`serve` with it: no exec, no interpreter start-up, no
imports. When the creating process had other threads alive, forking it is not
safe; then the monitor is a fresh interpreter that execs ``python -I -m
magikrun.runtime._wasm_worker SPEC_FILE`` (:func:`main`), which opens and loads
the module itself. Either way the worker does at create everything else that can
fail — linking WASI, opening preopened directories — and says ``ok`` (or one JSON
error line) on ``$MAGIKRUN_READY_FD``. It then blocks opening
its exec fifo for writing, as crun's container init does, until ``start`` opens the
fifo for reading; then it runs the module and exits with the module's exit code
(see :mod:`magikrun.runtime._wasm_engine` for the table).

Terminating signals are taken by a helper thread with ``sigwait``: before the
module runs the worker exits at once with 128+N; while it runs, the engine's epoch
is bumped so that wasm code stops at its next check and the worker exits with
128+N after writing why to stderr (the container log). Its stdio is what the
monitor gives it: /dev/null and pipes into the CRI log, or for a foreground run the
caller's own stdin, stdout and stderr; the module gets the same.

The spec file sits in the container's state directory (mode 0600: it holds the
environment).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .. import _fs
from ..errors import InvalidBundle, LimitExceeded, MagikrunError, UnsafeRootfsPath

if TYPE_CHECKING:
    from ._wasm_engine import CompiledModule, WasmEngine

__all__ = ["READY_FD_ENV", "WorkerSpec", "load", "main", "open_in_root", "serve"]

READY_FD_ENV = "MAGIKRUN_READY_FD"
_CATCH = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGTERM,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGALRM,
    }
)
_INTERRUPT_GRACE = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """Everything a worker needs, written by :class:`WasmtimeRuntime` at create."""

    rootfs: str
    """Host path of the container's root filesystem (preopened as ``/``)."""
    module: str
    """The module's path inside ``rootfs`` (``process.args[0]``)."""
    argv: list[str]
    env: list[tuple[str, str]]
    preopens: list[tuple[str, str, bool]]
    """``(host, guest, readonly)`` for the rootfs and each bind mount."""
    fuel: int
    memory_pages: int
    module_size: int
    cache_dir: str
    exec_fifo: str
    digest: str | None = None
    """The ``sha256:`` digest the bundle recorded for the module, checked before compiling."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        raw: dict[str, Any] = json.loads(text)
        raw["env"] = [tuple(pair) for pair in raw["env"]]
        raw["preopens"] = [tuple(item) for item in raw["preopens"]]
        return cls(**raw)


def open_in_root(root: str, path: str, *, max_size: int) -> int:
    """Open the regular file ``path`` as if ``root`` were ``/``; it cannot lead outside.

    Refuses anything but a regular file no larger than ``max_size``.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _fs.open_in_root(
            root_fd, path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        )
    except (OSError, UnsafeRootfsPath) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc.message
        raise InvalidBundle(
            f"cannot open the wasm module {path!r} inside the rootfs {root}: {reason}",
            hint="process.args[0] must name a .wasm file inside root.path",
            path=path,
        ) from exc
    finally:
        os.close(root_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InvalidBundle(
            f"the wasm module {path!r} is not a regular file",
            hint="process.args[0] must name a .wasm file inside root.path",
            path=path,
        )
    if info.st_size > max_size:
        os.close(fd)
        raise LimitExceeded(
            f"wasm module {path} is {info.st_size} bytes, over the limit of {max_size}",
            hint="use a smaller module or raise the module size limit",
            path=path,
            size=info.st_size,
        )
    os.set_blocking(fd, True)
    return fd


class _Signals:
    """Takes terminating signals on a helper thread and turns them into exits or interrupts.

    An epoch interrupt stops wasm code at once but not a module blocked in a WASI
    call (a sleep, a read); if the module has not stopped after ``_INTERRUPT_GRACE``
    seconds the worker exits with 128+N anyway.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.interrupt: Callable[[int], None] | None = None
        signal.pthread_sigmask(signal.SIG_BLOCK, _CATCH)
        threading.Thread(target=self._wait, name="signals", daemon=True).start()

    def running(self, interrupt: Callable[[int], None]) -> None:
        with self.lock:
            self.interrupt = interrupt

    def _wait(self) -> None:
        signum = signal.sigwait(_CATCH)
        with self.lock:
            if self.interrupt is None:
                os._exit(128 + signum)
            self.interrupt(signum)
        time.sleep(_INTERRUPT_GRACE)
        name = signal.Signals(signum).name
        os.write(2, f"magikrun: wasm module stopped by {name} inside a WASI call\n".encode())
        os._exit(128 + signum)


def _error_line(exc: BaseException) -> bytes:
    if isinstance(exc, MagikrunError):
        message, hint = exc.message, exc.hint
    else:
        message, hint = f"{type(exc).__name__}: {exc}", "see the container log"
    return json.dumps({"error": type(exc).__name__, "message": message, "hint": hint}).encode()


def load(spec: WorkerSpec) -> tuple[WasmEngine, CompiledModule]:
    """Open the module inside the rootfs and validate and compile it (or take it from the cache).

    The engine compiles on the calling thread (no thread pool), so a process that
    loaded a module can still be forked safely.
    """
    from ._wasm_engine import WasmEngine, WasmLimits

    engine = WasmEngine(
        cache_dir=Path(spec.cache_dir),
        limits=WasmLimits(
            fuel=spec.fuel, memory_pages=spec.memory_pages, module_size=spec.module_size
        ),
    )
    module_fd = open_in_root(spec.rootfs, spec.module, max_size=spec.module_size)
    try:
        compiled = engine.load_fd(module_fd, name=spec.module, expected_digest=spec.digest)
    finally:
        os.close(module_fd)
    return engine, compiled


def serve(setup: Callable[[], tuple[WorkerSpec, WasmEngine, CompiledModule]]) -> NoReturn:
    """Be the container process: set up, report readiness, wait for start, run, exit.

    ``setup`` gives the spec and the loaded module; what it raises is reported as
    the create failure on ``$MAGIKRUN_READY_FD``.
    """
    signals = _Signals()
    ready_fd = int(os.environ.pop(READY_FD_ENV))
    try:
        spec, engine, compiled = setup()
        from ._wasm_engine import Preopen, WasiSpec

        prepared = engine.prepare(
            compiled,
            WasiSpec(
                argv=tuple(spec.argv),
                env=tuple(spec.env),
                preopens=tuple(Preopen(h, g, ro) for h, g, ro in spec.preopens),
                inherit_stdin=True,
            ),
        )
    except (MagikrunError, OSError, ValueError, KeyError, TypeError) as exc:
        os.write(ready_fd, _error_line(exc) + b"\n")
        os._exit(1)
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    fifo = os.open(spec.exec_fifo, os.O_WRONLY | os.O_CLOEXEC)
    # From here a signal interrupts the module instead of ending the worker, so that
    # a kill right after start returns is reported as the module's stop.
    signals.running(engine.interrupt)
    os.write(fifo, b"0")
    os.close(fifo)
    result = engine.run(prepared)
    if result.message:
        os.write(2, f"magikrun: {result.message}\n".encode())
    os._exit(result.exit_code)


def _setup_from_file(path: str) -> tuple[WorkerSpec, WasmEngine, CompiledModule]:
    spec = WorkerSpec.from_json(Path(path).read_text())
    return (spec, *load(spec))


def main(argv: list[str] | None = None) -> NoReturn:
    """The exec'd worker: ``python -I -m magikrun.runtime._wasm_worker SPEC_FILE``."""
    args = sys.argv if argv is None else argv
    if len(args) != 2 or READY_FD_ENV not in os.environ:
        sys.exit(f"usage: {READY_FD_ENV}=FD python -m magikrun.runtime._wasm_worker SPEC_FILE")
    serve(lambda: _setup_from_file(args[1]))


if __name__ == "__main__":
    main()
