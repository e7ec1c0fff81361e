"""WebAssembly (WASI preview 1) containers on wasmtime, behind the OCI lifecycle.

A wasm bundle is an ordinary OCI bundle, read the way crun's wasm handler reads
it: the module is ``process.args[0]`` resolved inside ``root.path`` (relative to
``process.cwd``), its argv is ``process.args`` and its environment ``process.env``.
The rootfs is preopened as ``/`` (read-only when ``root.readonly``) and every
directory bind mount as its destination; WASI preview 1 preopens only directories,
so file bind mounts are not visible to the module.

Each container is a worker process (:mod:`._wasm_worker`) owned by the same
per-container monitor native containers have, which writes its CRI log and exit
code. ``create`` validates and compiles the module in the calling process (or
takes it from the cache), so a bad module fails there, before any state exists.
When the caller is single-threaded (:func:`magikrun._process.forkable`) the
monitor is a fork of it and the worker a fork of the monitor that runs the
module already loaded — a few milliseconds from create to exit; otherwise the
monitor and worker are fresh interpreters (hundreds of milliseconds), and
``WasmtimeRuntime.forked`` counts which way each create went.

Limits come from the runtime's arguments, overridable per
bundle with the annotations ``io.magikrun.wasm.fuel`` and
``io.magikrun.wasm.memory-pages``; a bundle's ``io.magikrun.wasm.module.digest``
(BundleBuilder writes it) must match the module, or create fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import posixpath
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _process
from ..errors import (
    BackendFailed,
    CreateFailed,
    InvalidBundle,
    MagikrunError,
    NotSupported,
)
from ..platform import (
    CONTAINER_START_TIMEOUT,
    DEFAULT_WASM_FUEL,
    MAX_CONTAINERS,
    MAX_WASM_MEMORY_PAGES,
    MAX_WASM_MODULE_SIZE,
    Paths,
)
from ._crun import load_bundle_config, rootfs_of
from ._monitor import MonitorSpec
from ._store import ContainerStore, process_start_time, validate_container_id
from ._types import ContainerState, ContainerStatus, ExecResult, parse_signal
from ._wasm_worker import WorkerSpec, load, open_in_root, serve

__all__ = ["DIGEST_ANNOTATION", "FUEL_ANNOTATION", "MEMORY_PAGES_ANNOTATION", "WasmtimeRuntime"]

FUEL_ANNOTATION = "io.magikrun.wasm.fuel"
DIGEST_ANNOTATION = "io.magikrun.wasm.module.digest"
"""Set by BundleBuilder: the module's digest, which the worker checks before compiling."""
MEMORY_PAGES_ANNOTATION = "io.magikrun.wasm.memory-pages"
_WORKER = "magikrun.runtime._wasm_worker"
_SPEC_FILE = "wasm-worker.json"
_EXEC_FIFO = "exec.fifo"
_MONITOR_EXIT_WAIT = 10.0
"""Seconds a forced delete waits for the monitor after SIGKILL of the worker."""


def _bad(bundle: Path, message: str, hint: str) -> InvalidBundle:
    return InvalidBundle(message, hint=hint, bundle=str(bundle))


def _positive_annotation(
    bundle: Path, annotations: Mapping[str, str], key: str, default: int
) -> int:
    """A limit the bundle sets through an annotation, else ``default``."""
    raw = annotations.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) <= 0:
        raise _bad(
            bundle, f"annotation {key}={raw!r} is not a positive integer", f"set {key} to a number"
        )
    return int(raw)


def _preopens(bundle: Path, spec: Mapping[str, Any], rootfs: Path) -> list[tuple[str, str, bool]]:
    """The rootfs as ``/``, then each directory bind mount at its destination."""
    root = spec.get("root") or {}
    preopens = [(str(rootfs), "/", bool(root.get("readonly", False)))]
    mounts = spec.get("mounts", [])
    if not isinstance(mounts, list):
        raise _bad(bundle, "mounts must be a list", "see the OCI runtime spec")
    for mount in mounts:
        if not isinstance(mount, dict):
            raise _bad(bundle, "each mount must be an object", "see the OCI runtime spec")
        options = mount.get("options") or []
        if mount.get("type") != "bind" and not {"bind", "rbind"} & set(options):
            continue
        source, destination = mount.get("source"), mount.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            raise _bad(bundle, "a bind mount needs source and destination", "set both paths")
        if not destination.startswith("/"):
            raise _bad(
                bundle, f"mount destination {destination!r} is not absolute", "use an absolute path"
            )
        host = bundle / source
        if host.is_dir():
            preopens.append((str(host), posixpath.normpath(destination), "ro" in options))
    return preopens


def _env(bundle: Path, process: Mapping[str, Any]) -> list[tuple[str, str]]:
    env = process.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise _bad(bundle, "process.env must be a list of KEY=value strings", "fix process.env")
    return [(key, value) for key, _, value in (e.partition("=") for e in env)]


class WasmtimeRuntime:
    """WASI preview-1 modules as containers: one worker process each, run by wasmtime.

    ```python
    rt = WasmtimeRuntime(Paths.resolve(root))
    await rt.create("hello", "/path/to/bundle")   # compiles (or loads from cache)
    await rt.start("hello")
    code = await rt.wait("hello")                  # proc_exit(N) -> N
    await rt.delete("hello")
    ```

    **Parameters:**

    * `paths` - the magikrun root: state in ``paths.containers``, compiled modules in
      ``paths.cache / "wasm"``.
    * `store` - the shared `ContainerStore` (one is made from `paths` if not given).
    * `fuel`, `memory_pages`, `module_size` - default limits of every module.
    * `max_containers` - the container limit of a store made here.
    """

    name = "wasm"
    aliases: tuple[str, ...] = ("wasmtime", "wasi", "wasm32-wasi")
    features = frozenset({"wasm", "wasi-preview1", "fuel", "pid-file", "logs"})

    def __init__(
        self,
        paths: Paths,
        *,
        store: ContainerStore | None = None,
        fuel: int = DEFAULT_WASM_FUEL,
        memory_pages: int = MAX_WASM_MEMORY_PAGES,
        module_size: int = MAX_WASM_MODULE_SIZE,
        max_containers: int = MAX_CONTAINERS,
    ) -> None:
        self.paths = paths
        self.store = store or ContainerStore(paths, max_containers=max_containers)
        self.fuel = fuel
        self.memory_pages = memory_pages
        self.module_size = module_size
        self.forked = 0
        """How many creates started their worker by forking this process (the fast way)."""
        self.spawned = 0
        """How many had to start fresh interpreters because this process had other threads."""

    @property
    def cache_dir(self) -> Path:
        """Where compiled modules are kept (keyed by module digest, engine settings, version)."""
        return self.paths.cache / "wasm"

    def can_handle(self, spec: Mapping[str, Any]) -> bool:
        """A bundle whose ``process.args[0]`` is a ``.wasm`` file."""
        process = spec.get("process")
        args = process.get("args") if isinstance(process, dict) else None
        return isinstance(args, list) and bool(args) and str(args[0]).endswith(".wasm")

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("wasmtime") is None:
            return "the wasmtime Python package is not installed (pip install 'wasmtime>=50,<51')"
        return None

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def _worker_spec(self, bundle: Path, spec: Mapping[str, Any], directory: Path) -> WorkerSpec:
        """The worker's instructions, checked as far as can be without compiling."""
        rootfs = rootfs_of(bundle, spec).resolve()
        process = spec["process"]
        if process.get("terminal"):
            raise NotSupported(
                "a wasm container cannot have a terminal",
                hint="set process.terminal to false; its output goes to the log or your stdio",
                bundle=str(bundle),
            )
        args: list[str] = process["args"]
        module = posixpath.join(process.get("cwd") or "/", args[0])
        annotations = spec.get("annotations", {})
        fuel = _positive_annotation(bundle, annotations, FUEL_ANNOTATION, self.fuel)
        pages = _positive_annotation(
            bundle, annotations, MEMORY_PAGES_ANNOTATION, self.memory_pages
        )
        if pages > MAX_WASM_MEMORY_PAGES:
            raise _bad(
                bundle,
                f"annotation {MEMORY_PAGES_ANNOTATION}={pages} is above {MAX_WASM_MEMORY_PAGES}",
                f"ask for at most {MAX_WASM_MEMORY_PAGES} pages (4 GiB)",
            )
        os.close(open_in_root(str(rootfs), module, max_size=self.module_size))
        return WorkerSpec(
            rootfs=str(rootfs),
            module=module,
            argv=list(args),
            env=_env(bundle, process),
            preopens=_preopens(bundle, spec, rootfs),
            fuel=fuel,
            memory_pages=pages,
            module_size=self.module_size,
            cache_dir=str(self.cache_dir),
            exec_fifo=str(directory / _EXEC_FIFO),
            digest=annotations.get(DIGEST_ANNOTATION),
        )

    async def create(
        self,
        id: str,
        bundle: str | os.PathLike[str],
        *,
        pid_file: str | os.PathLike[str] | None = None,
        console_socket: str | os.PathLike[str] | None = None,
        foreground: bool = False,
    ) -> ContainerState:
        """Create the container: the module is compiled and linked, and waits for `start`.

        With ``foreground`` the module's stdout/stderr are this process's own
        (as ``magikrun run``) instead of the CRI log.
        """
        validate_container_id(id)
        bundle_path = Path(bundle).absolute()
        if console_socket is not None:
            raise NotSupported(
                "a wasm container has no terminal, so --console-socket cannot be used",
                hint="drop --console-socket; read the output from the log or run in the foreground",
                id=id,
            )
        spec = load_bundle_config(bundle_path)
        worker = self._worker_spec(bundle_path, spec, self.store.directory(id))
        try:
            engine, compiled = load(worker)
        except MagikrunError as exc:
            raise CreateFailed(
                f"cannot create wasm container {id!r}: {exc.message}", hint=exc.hint, id=id
            ) from exc
        record = self.store.reserve(
            id, backend=self.name, bundle=bundle_path, annotations=spec.get("annotations", {})
        )
        directory = self.store.directory(id)
        report: _process.MonitorReport | None = None
        try:
            spec_file = directory / _SPEC_FILE
            fd = os.open(spec_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(worker.to_json())
            os.mkfifo(worker.exec_fifo, 0o600)
            report = await _process.start_monitor(
                MonitorSpec(
                    argv=[
                        sys.executable,
                        "-I",
                        "-m",
                        "magikrun.runtime._wasm_worker",
                        str(spec_file),
                    ],
                    directory=str(directory),
                    ready="fd",
                    log=not foreground,
                    inherit_stdin=foreground,
                    env={},
                ),
                timeout=CONTAINER_START_TIMEOUT,
                child=lambda: serve(lambda: (worker, engine, compiled)),
            )
            if report.forked:
                self.forked += 1
            else:
                self.spawned += 1
            if not report.ok:
                raise _create_failed(id, report)
            record = self.store.mark_created(record, report, pid_file)
        except BaseException as exc:
            await self._undo_create(id, report, exc)
            raise
        return record.to_state()

    async def _undo_create(
        self, id: str, report: _process.MonitorReport | None, exc: BaseException
    ) -> None:
        """Stop the worker and monitor a failed create started and remove its record.

        A monitor whose worker failed has no exit to record, so it is killed at once.
        """
        try:
            if report is not None and report.monitor_pid:
                if report.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(report.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(report.monitor_pid, signal.SIGKILL)
                await _process.wait_exit(report.monitor_pid)
            self.store.remove(id)
        except (OSError, MagikrunError) as cleanup:
            exc.add_note(f"cleanup of container {id!r} failed: {cleanup}")

    async def start(self, id: str) -> ContainerState:
        """Release the worker through its exec fifo; the module runs from here on."""
        record = self.store.guard(id, "start")
        fifo = self.store.directory(id) / _EXEC_FIFO
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            released = await _read_token(fd, CONTAINER_START_TIMEOUT)
        finally:
            os.close(fd)
        if not released:
            state = self.store.load(id)
            raise BackendFailed(
                f"the wasm worker of container {id!r} did not take the start signal "
                f"(it is {state.status.value})",
                hint="see the container log; delete it with 'magikrun delete --force ID'",
                id=id,
            )
        fifo.unlink()
        return self.store.update(record, status=ContainerStatus.RUNNING).to_state()

    async def state(self, id: str) -> ContainerState:
        return self.store.load(id).to_state()

    async def kill(self, id: str, signal: int | str, all: bool = False) -> None:
        """Signal the worker: TERM, INT, HUP, QUIT, USR1/2 and ALRM stop the module
        through an epoch interrupt (exit 128+N); other signals act on the process."""
        number = parse_signal(signal)
        record = self.store.guard(id, "kill")
        if record.pid is not None and process_start_time(record.pid) == record.pid_start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, number)

    async def delete(self, id: str, force: bool = False) -> None:
        record = self.store.load(id) if force else self.store.guard(id, "delete")
        if record.monitor_pid is not None and record.monitor_alive():
            alive = record.pid is not None and process_start_time(record.pid) == record.pid_start
            await _kill_and_wait(record.pid if alive else None, record.monitor_pid)
        self.store.remove(id)

    async def wait(self, id: str) -> int:
        return await self.store.wait_exit(id)

    async def exec(
        self,
        id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Not possible: a wasm module is one process with no way to run another inside."""
        raise NotSupported(
            f"cannot exec into wasm container {id!r}: a WebAssembly module has no processes "
            "to join",
            hint="run another wasm container on the same volumes instead",
            id=id,
        )

    async def ps(self, id: str) -> list[int]:
        """The worker's pid: a wasm container is that one process."""
        record = self.store.guard(id, "kill")
        return [record.pid] if record.pid is not None else []


def _create_failed(id: str, report: _process.MonitorReport) -> CreateFailed:
    """The worker's own error (one JSON line) as a CreateFailed, else the monitor's reason."""
    try:
        detail = json.loads(report.reason)
    except ValueError:
        detail = None
    if isinstance(detail, dict) and "message" in detail:
        return CreateFailed(
            f"cannot create wasm container {id!r}: {detail['message']}",
            hint=str(detail.get("hint") or "see the module and the bundle"),
            id=id,
        )
    text = (report.stderr or report.reason).strip()
    return CreateFailed(
        f"cannot create wasm container {id!r}: {text or 'the worker failed'}",
        hint="see the message above; the worker process could not start",
        id=id,
    )


async def _read_token(fd: int, timeout: float) -> bool:
    """Wait for the worker's byte on the exec fifo; False if it closed or never came."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def _wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, _wake)
    try:
        async with asyncio.timeout(timeout):
            await ready
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    try:
        return os.read(fd, 1) == b"0"
    except BlockingIOError:
        return False


async def _kill_and_wait(pid: int | None, monitor_pid: int) -> None:
    """SIGKILL the worker, then wait (bounded) for its monitor to record the exit and end."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        await asyncio.wait_for(_process.wait_exit(monitor_pid), _MONITOR_EXIT_WAIT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(monitor_pid, signal.SIGKILL)
        await _process.wait_exit(monitor_pid)
