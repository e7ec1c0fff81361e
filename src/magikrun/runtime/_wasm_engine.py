"""Compile and run one WASI preview-1 module on wasmtime-py, within magikrun's limits.

The engine is what a wasm container's worker process runs; it knows nothing of
containers. It enforces three limits: fuel (about one unit per instruction),
linear-memory size (store limits) and module size (checked on the open file before
it is read). ``interrupt()`` bumps the engine's epoch, which stops running wasm code
at its next loop back-edge or call, from any thread.

How a run ends, and the exit code it gives::

    proc_exit(N)                  N & 0xFF, as exit(3) gives (wasmtime's own WASI
                                  refuses 126 and above; magikrun's proc_exit does not)
    returned from _start          0
    out of fuel                   152  (128 + SIGXCPU, as a CPU-time limit would)
    memory limit, then a trap     137  (128 + SIGKILL, as the kernel's OOM killer gives)
    any other trap                134  (128 + SIGABRT, as an abort)
    interrupted by signal N       128 + N

Compiled modules are cached in ``cache_dir`` under the module's sha256 and a key of
the engine settings and wasmtime version, since wasmtime rejects a serialized
module made by other settings; a hit refreshes the file's mtime, which is what
:func:`~magikrun.runtime._wasm_cache.sweep_module_cache` ages by. The cache
directory must be magikrun's own: deserializing runs native code from it.

Example::

    engine = WasmEngine(cache_dir=paths.cache / "wasm")
    compiled = engine.load_fd(fd, name="hello.wasm")
    result = engine.run(engine.prepare(compiled, WasiSpec(argv=("hello.wasm",))))
    result.exit_code
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from ..errors import (
    BackendFailed,
    DigestMismatch,
    InvalidArgument,
    InvalidBundle,
    LimitExceeded,
    MagikrunError,
)
from ..platform._limits import DEFAULT_WASM_FUEL, MAX_WASM_MEMORY_PAGES, MAX_WASM_MODULE_SIZE
from ._wasm_cache import CACHE_SUFFIX, TEMP_PREFIX

__all__ = [
    "EXIT_MEMORY_LIMIT",
    "EXIT_OUT_OF_FUEL",
    "EXIT_TRAP",
    "WASM_PAGE_SIZE",
    "CompiledModule",
    "Preopen",
    "PreparedRun",
    "WasiSpec",
    "WasmEngine",
    "WasmLimits",
    "WasmResult",
    "WasmStop",
]

WASM_PAGE_SIZE = 65_536
EXIT_TRAP = 128 + signal.SIGABRT
EXIT_OUT_OF_FUEL = 128 + signal.SIGXCPU
EXIT_MEMORY_LIMIT = 128 + signal.SIGKILL
_WASI_MODULE = "wasi_snapshot_preview1"
_COMPONENT_PREAMBLE = b"\0asm\x0d\x00\x01\x00"


class WasmStop(enum.StrEnum):
    """Why a module stopped running."""

    EXITED = "exited"
    TRAPPED = "trapped"
    OUT_OF_FUEL = "out-of-fuel"
    MEMORY_LIMIT = "memory-limit"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True, kw_only=True)
class WasmLimits:
    """The limits one module runs under; each defaults to the seed's figure."""

    fuel: int = DEFAULT_WASM_FUEL
    memory_pages: int = MAX_WASM_MEMORY_PAGES
    module_size: int = MAX_WASM_MODULE_SIZE

    def __post_init__(self) -> None:
        for name, value, ceiling in (
            ("fuel", self.fuel, None),
            ("memory_pages", self.memory_pages, MAX_WASM_MEMORY_PAGES),
            ("module_size", self.module_size, MAX_WASM_MODULE_SIZE),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(
                    f"wasm limit {name} must be a positive integer, not {value!r}",
                    hint="pass a whole number above zero",
                    limit=name,
                )
            if ceiling is not None and value > ceiling:
                raise InvalidArgument(
                    f"wasm limit {name}={value} is above magikrun's maximum {ceiling}",
                    hint=f"use at most {ceiling}",
                    limit=name,
                )


@dataclass(frozen=True, slots=True)
class Preopen:
    """A host directory the module sees at ``guest`` (a volume or bind mount)."""

    host: str
    guest: str
    readonly: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class WasiSpec:
    """What the module sees: argv, environment, directories, and where its output goes.

    ``stdout``/``stderr`` name files (created or truncated); ``None`` passes this
    process's own fd 1/2 through, which is how a worker writes into the container log.
    The module's stdin is empty unless ``inherit_stdin`` passes fd 0 through.
    """

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    preopens: tuple[Preopen, ...] = ()
    stdout: str | None = None
    stderr: str | None = None
    inherit_stdin: bool = False


@dataclass(frozen=True, slots=True)
class CompiledModule:
    """A validated, compiled module and whether it came from the cache."""

    digest: str
    module: wasmtime.Module
    cache_hit: bool


@dataclass(frozen=True, slots=True)
class WasmResult:
    """How a run ended: the exit code, the reason, and a message for the log."""

    exit_code: int
    stop: WasmStop
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedRun:
    """A store with WASI set up and the module linked against it, ready to run once."""

    store: wasmtime.Store
    pre: wasmtime.InstancePre


class _ProcExit(Exception):
    """Raised by our ``proc_exit`` to unwind the module with its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _proc_exit(code: int) -> None:
    raise _ProcExit(code & 0xFF)


@dataclass(slots=True)
class _Interrupt:
    signal: int | None = None


@contextlib.contextmanager
def _wasmtime_errors(
    message: str, *, hint: str, error: type[MagikrunError] = BackendFailed, **subject: object
) -> Iterator[None]:
    """The one place wasmtime's errors become magikrun errors: ``message: reason``."""
    try:
        yield
    except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
        raise error(f"{message}: {_reason(str(exc))}", hint=hint, **subject) from exc


@functools.cache
def _wasmtime_version() -> str:
    """The installed wasmtime-py version, read from its dist-info name (cheap, no metadata scan)."""
    site = Path(wasmtime.__file__).resolve().parent.parent
    found = sorted(p.name for p in site.glob("wasmtime-*.dist-info"))
    if not found:
        raise BackendFailed(
            "cannot tell which wasmtime version is installed",
            hint="reinstall wasmtime with pip so that its dist-info is present",
        )
    return found[-1].removeprefix("wasmtime-").removesuffix(".dist-info")


class WasmEngine:
    """One wasmtime engine with fuel, epoch interruption and a compiled-module cache."""

    def __init__(self, *, cache_dir: Path | None, limits: WasmLimits | None = None) -> None:
        self.limits = limits if limits is not None else WasmLimits()
        self.cache_dir = cache_dir
        self.compiles = 0
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        # Compile on the calling thread: a thread pool left behind would make forking
        # a process that compiled (how a wasm container's worker starts) unsafe.
        # Serialized modules do not depend on it.
        config.parallel_compilation = False
        self._engine = wasmtime.Engine(config)
        self._interrupt = _Interrupt()
        self._cache_key = hashlib.sha256(
            f"wasmtime-py {_wasmtime_version()}; fuel; epoch".encode()
        ).hexdigest()[:16]

    def interrupt(self, signum: int) -> None:
        """Stop running wasm code at its next epoch check; safe from any thread."""
        self._interrupt.signal = signum
        self._engine.increment_epoch()

    def load_fd(self, fd: int, *, name: str, expected_digest: str | None = None) -> CompiledModule:
        """Read a module from an open file, refusing one over the size limit before reading it."""
        size = os.fstat(fd).st_size
        self._check_size(size, name)
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, self.limits.module_size + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            self._check_size(total, name)
        return self.load_bytes(b"".join(chunks), name=name, expected_digest=expected_digest)

    def load_bytes(
        self, wasm: bytes, *, name: str, expected_digest: str | None = None
    ) -> CompiledModule:
        """Validate and compile a module, or take it from the cache; check it can run here.

        With ``expected_digest`` (``sha256:…``, as a bundle records it) the module
        must hash to it, so a module swapped after the bundle was built is refused.
        """
        self._check_size(len(wasm), name)
        if wasm.startswith(_COMPONENT_PREAMBLE):
            raise InvalidBundle(
                f"{name} is a WebAssembly component (WASI preview 2)",
                hint="magikrun's wasm runtime runs WASI preview-1 modules; build for wasm32-wasip1",
                path=name,
            )
        if not wasm.startswith(b"\0asm"):
            raise InvalidBundle(
                f"{name} is not a WebAssembly binary module",
                hint="the module must be a .wasm binary (magic \\0asm), not text",
                path=name,
            )
        digest = hashlib.sha256(wasm).hexdigest()
        if expected_digest is not None and expected_digest != f"sha256:{digest}":
            raise DigestMismatch(
                f"wasm module {name} hashes to sha256:{digest}, not {expected_digest}",
                hint="the module changed after the bundle was built; build the bundle again",
                path=name,
                digest=expected_digest,
            )
        cached = self._cache_path(digest)
        module = self._from_cache(cached) if cached is not None else None
        hit = module is not None
        if module is None:
            module = self._compile(wasm, name)
            if cached is not None:
                self._store(cached, module)
        self._check_module(module, name)
        return CompiledModule(digest=f"sha256:{digest}", module=module, cache_hit=hit)

    def cache_file(self, digest: str) -> Path | None:
        """Where the compiled form of the module with this ``sha256:`` digest is cached."""
        return self._cache_path(digest.removeprefix("sha256:"))

    def prepare(self, compiled: CompiledModule, spec: WasiSpec) -> PreparedRun:
        """Set up the store, WASI and the linked module, so that only running is left.

        Raises :class:`InvalidBundle` when the module imports something WASI does not
        provide, and :class:`BackendFailed` when a preopened directory cannot be opened.
        """
        store = wasmtime.Store(self._engine)
        store.set_fuel(self.limits.fuel)
        store.set_epoch_deadline(1)
        store.set_limits(memory_size=self.limits.memory_pages * WASM_PAGE_SIZE)
        name = spec.argv[0] if spec.argv else ""
        with _wasmtime_errors(
            "wasmtime failed to set up WASI",
            hint="check that every preopened directory exists and is readable",
            path=name,
        ):
            store.set_wasi(_wasi_config(spec))
            linker = wasmtime.Linker(self._engine)
            linker.define_wasi()
            linker.allow_shadowing = True
            exit_type = wasmtime.FuncType([wasmtime.ValType.i32()], [])
            linker.define_func(_WASI_MODULE, "proc_exit", exit_type, _proc_exit)
        with _wasmtime_errors(
            f"wasm module {name} cannot be linked",
            hint="the module must import only WASI preview 1 functions",
            error=InvalidBundle,
            path=name,
        ):
            pre = linker.instantiate_pre(compiled.module)
        return PreparedRun(store=store, pre=pre)

    def run(self, prepared: PreparedRun) -> WasmResult:
        """Instantiate and call ``_start``; the guest's faults become a result, never an error."""
        store = prepared.store
        instance: wasmtime.Instance | None = None
        try:
            instance = prepared.pre.instantiate(store)
            start = instance.exports(store)["_start"]
            if not isinstance(start, wasmtime.Func):
                return WasmResult(EXIT_TRAP, WasmStop.TRAPPED, "_start is not a function")
            start(store)
        except _ProcExit as exc:
            return WasmResult(exc.code, WasmStop.EXITED)
        except wasmtime.Trap as exc:
            return self._trapped(exc, store, instance)
        except wasmtime.WasmtimeError as exc:
            # e.g. proc_exit with a status WASI does not allow (126 and above)
            return WasmResult(EXIT_TRAP, WasmStop.TRAPPED, f"wasm error: {_reason(str(exc))}")
        return WasmResult(0, WasmStop.EXITED)

    def _trapped(
        self, trap: wasmtime.Trap, store: wasmtime.Store, instance: wasmtime.Instance | None
    ) -> WasmResult:
        code = trap.trap_code
        text = _reason(trap.message)
        if code == wasmtime.TrapCode.INTERRUPT and self._interrupt.signal is not None:
            signum = self._interrupt.signal
            return WasmResult(
                128 + signum,
                WasmStop.INTERRUPTED,
                f"wasm module stopped by {signal.Signals(signum).name}",
            )
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return WasmResult(
                EXIT_OUT_OF_FUEL,
                WasmStop.OUT_OF_FUEL,
                f"wasm module ran out of fuel ({self.limits.fuel} units); "
                "raise the fuel limit if it needs more",
            )
        if instance is not None and self._memory_full(store, instance):
            return WasmResult(
                EXIT_MEMORY_LIMIT,
                WasmStop.MEMORY_LIMIT,
                f"wasm module trapped ({text}) with its memory at the limit of "
                f"{self.limits.memory_pages} pages; raise the memory limit if it needs more",
            )
        return WasmResult(EXIT_TRAP, WasmStop.TRAPPED, f"wasm trap: {text}")

    def _memory_full(self, store: wasmtime.Store, instance: wasmtime.Instance) -> bool:
        """True when a memory of the instance cannot grow by one more page under the limit."""
        limit = self.limits.memory_pages
        for item in instance.exports(store).values():
            if isinstance(item, wasmtime.Memory) and item.size(store) + 1 > limit:
                return True
        return False

    def _check_size(self, size: int, name: str) -> None:
        if size > self.limits.module_size:
            raise LimitExceeded(
                f"wasm module {name} is {size} bytes, over the limit of {self.limits.module_size}",
                hint="use a smaller module or raise the module size limit",
                path=name,
                size=size,
            )

    def _check_module(self, module: wasmtime.Module, name: str) -> None:
        """Refuse at load time what could never run: wrong imports, no _start, too much memory."""
        exports = {item.name: item.type for item in module.exports}
        if not isinstance(exports.get("_start"), wasmtime.FuncType):
            raise InvalidBundle(
                f"wasm module {name} exports no _start function",
                hint="build it as a WASI command (e.g. --target wasm32-wasip1), not a library",
                path=name,
            )
        for imported in module.imports:
            if imported.module != _WASI_MODULE:
                raise InvalidBundle(
                    f"wasm module {name} imports {imported.module}.{imported.name}, "
                    "which only WASI preview 1 can provide here",
                    hint=f"magikrun provides only {_WASI_MODULE} imports",
                    path=name,
                )
        memories = [t for t in exports.values() if isinstance(t, wasmtime.MemoryType)]
        for memory in memories:
            if memory.limits.min > self.limits.memory_pages:
                raise LimitExceeded(
                    f"wasm module {name} needs {memory.limits.min} memory pages at start, "
                    f"over the limit of {self.limits.memory_pages}",
                    hint="raise the memory limit or build the module with a smaller initial memory",
                    path=name,
                )

    def _compile(self, wasm: bytes, name: str) -> wasmtime.Module:
        self.compiles += 1
        with _wasmtime_errors(
            f"wasm module {name} is invalid",
            hint="rebuild the module; it failed WebAssembly validation",
            error=InvalidBundle,
            path=name,
        ):
            return wasmtime.Module(self._engine, wasm)

    def _cache_path(self, hexdigest: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{hexdigest}-{self._cache_key}{CACHE_SUFFIX}"

    def _from_cache(self, path: Path) -> wasmtime.Module | None:
        """The cached module, read into memory: ``deserialize_file`` would keep the file
        open for the module's lifetime, and a worker forked from this process closes
        every fd it did not make."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            module = wasmtime.Module.deserialize(self._engine, data)
        except wasmtime.WasmtimeError:
            # Corrupt or from another wasmtime build: compiling again replaces it.
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # used now: keeps it from sweep_module_cache
        return module

    def _store(self, path: Path, module: wasmtime.Module) -> None:
        """Write the compiled module next to its final name, then rename it into place."""
        with _wasmtime_errors(
            "wasmtime failed to serialize a compiled module",
            hint="report this as a bug; the module ran uncached",
            path=str(path),
        ):
            data = bytes(module.serialize())
        import tempfile  # only on a cache miss: keeps the worker's start-up lean

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=CACHE_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _wasi_config(spec: WasiSpec) -> wasmtime.WasiConfig:
    wasi = wasmtime.WasiConfig()
    wasi.argv = list(spec.argv)
    wasi.env = [list(pair) for pair in spec.env]
    if spec.inherit_stdin:
        wasi.inherit_stdin()
    if spec.stdout is None:
        wasi.inherit_stdout()
    else:
        wasi.stdout_file = spec.stdout
    if spec.stderr is None:
        wasi.inherit_stderr()
    else:
        wasi.stderr_file = spec.stderr
    for preopen in spec.preopens:
        wasi.preopen_dir(preopen.host, preopen.guest, fs_mutable=not preopen.readonly)
    return wasi


def _reason(message: str) -> str:
    """The reason in a wasmtime error, without its backtrace (e.g. "wasm `unreachable` ...")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if "Caused by:" in lines[:-1]:
        return lines[lines.index("Caused by:") + 1].removeprefix("wasm trap:").strip()
    return lines[0] if lines else "unknown error"
