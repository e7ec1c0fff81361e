"""WasmtimeRuntime end to end: real worker processes, monitors, logs and the module cache."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from magikrun.errors import (
    ContainerNotFound,
    CreateFailed,
    InvalidBundle,
    InvalidState,
    LimitExceeded,
    NotSupported,
)
from magikrun.image import BundleBuilder, ContainerConfig
from magikrun.platform import Paths
from magikrun.runtime import ContainerStatus, RuntimeRegistry
from magikrun.runtime._wasmtime import FUEL_ANNOTATION, MEMORY_PAGES_ANNOTATION, WasmtimeRuntime

WAT_DIR = Path(__file__).parent / "wasm"

MakeBundle = Callable[..., Path]


def wasm(name: str) -> bytes:
    return bytes(wasmtime.wat2wasm((WAT_DIR / f"{name}.wat").read_text()))


def conformance_bundle(paths: Paths, bundle_dir: Path, workload: tuple[Any, ...]) -> Path:
    """A Wasm bundle built by BundleBuilder for a conformance workload (see conftest)."""
    module, args, annotations = {
        "exit": lambda: ("exit_code", [str(workload[1])], {}),
        "hello": lambda: ("echo", ["hello"], {}),
        "sleep": lambda: ("loop", [], {FUEL_ANNOTATION: str(10**15)}),
    }[workload[0]]()
    bundle_dir.mkdir(parents=True)
    source = bundle_dir.parent / f"{bundle_dir.name}.wasm"
    source.write_bytes(wasm(module))
    config = ContainerConfig(name=f"w-{uuid.uuid4().hex[:12]}", args=args, annotations=annotations)
    return BundleBuilder(paths).build_wasm_bundle(None, config, source, bundle_dir).path


@pytest.fixture
def runtime(paths: Paths) -> WasmtimeRuntime:
    return WasmtimeRuntime(paths)


@pytest.fixture
def make_bundle(short_tmp: Path) -> MakeBundle:
    """A bundle whose rootfs holds one module at /<name>.wasm."""
    count = 0

    def make(
        module: str | bytes,
        args: list[str] | None = None,
        *,
        env: list[str] | None = None,
        annotations: dict[str, str] | None = None,
        mounts: list[dict[str, Any]] | None = None,
        readonly: bool = False,
    ) -> Path:
        nonlocal count
        count += 1
        bundle = short_tmp / f"bundle{count}"
        (bundle / "rootfs").mkdir(parents=True)
        name = module if isinstance(module, str) else "module"
        (bundle / "rootfs" / f"{name}.wasm").write_bytes(
            wasm(module) if isinstance(module, str) else module
        )
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "args": [f"/{name}.wasm", *(args or [])],
                "cwd": "/",
                "env": env or ["PATH=/"],
            },
            "root": {"path": "rootfs", "readonly": readonly},
            "mounts": mounts or [],
            "annotations": annotations or {},
        }
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    return make


def log_lines(runtime: WasmtimeRuntime, id: str) -> list[tuple[str, str]]:
    """(stream, text) of each CRI log record."""
    lines = runtime.store.log_path(id).read_text().splitlines()
    return [(s, text) for _ts, s, _tag, text in (line.split(" ", 3) for line in lines)]


def processes_using(directory: Path) -> list[int]:
    """Pids whose command line or open files name something under ``directory``."""
    needle = str(directory)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                names = [f.read().decode(errors="replace")]
            fds = f"/proc/{entry}/fd"
            names += [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
        except OSError:
            continue
        if any(needle in name for name in names):
            found.append(int(entry))
    return found


def assert_nothing_left(runtime: WasmtimeRuntime, id: str) -> None:
    directory = runtime.store.root / id
    assert not directory.exists()
    assert processes_using(directory) == []
    with pytest.raises(ContainerNotFound):
        runtime.store.load(id)


async def run_to_exit(runtime: WasmtimeRuntime, id: str, bundle: Path) -> int:
    await runtime.create(id, bundle)
    await runtime.start(id)
    return await runtime.wait(id)


async def test_lifecycle_of_hello(runtime: WasmtimeRuntime, make_bundle: MakeBundle) -> None:
    bundle = make_bundle("hello")
    created = await runtime.create("hello", bundle)
    assert created.status is ContainerStatus.CREATED
    assert created.pid is not None and os.path.exists(f"/proc/{created.pid}")
    assert created.to_oci()["bundle"] == str(bundle)
    # Created means compiled and waiting: nothing ran yet.
    assert runtime.store.log_path("hello").read_text() == ""

    running = await runtime.start("hello")
    assert running.status is ContainerStatus.RUNNING
    assert await runtime.wait("hello") == 0
    stopped = await runtime.state("hello")
    assert (stopped.status, stopped.exit_code) == (ContainerStatus.STOPPED, 0)
    assert log_lines(runtime, "hello") == [("stdout", "hello from wasm")]

    await runtime.delete("hello")
    assert_nothing_left(runtime, "hello")


@pytest.mark.parametrize("code", [0, 3, 42, 255])
async def test_exit_code_is_the_modules(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, code: int
) -> None:
    assert await run_to_exit(runtime, f"exit{code}", make_bundle("exit_code", [str(code)])) == code


async def test_argv_and_env_come_from_process(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle
) -> None:
    bundle = make_bundle("echo", ["one", "two words"], env=["GREETING=hi there", "A=b=c"])
    assert await run_to_exit(runtime, "echo", bundle) == 0
    assert [text for _s, text in log_lines(runtime, "echo")] == [
        "one",
        "two words",
        "GREETING=hi there",
        "A=b=c",
    ]


async def test_rootfs_and_bind_mount_are_preopened(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, short_tmp: Path
) -> None:
    volume = short_tmp / "volume"
    volume.mkdir()
    (volume / "in.txt").write_text("from the volume\n")
    mount = {"type": "bind", "source": str(volume), "destination": "/data", "options": ["rbind"]}
    bundle = make_bundle("files", ["use-the-volume"], mounts=[mount])
    assert await run_to_exit(runtime, "vol", bundle) == 0
    assert (volume / "out.txt").read_text() == "written by wasm\n"
    assert log_lines(runtime, "vol") == [("stdout", "from the volume")]

    rootfs_bundle = make_bundle("files")
    (rootfs_bundle / "rootfs" / "in.txt").write_text("from the rootfs\n")
    assert await run_to_exit(runtime, "rootfs", rootfs_bundle) == 0
    assert (rootfs_bundle / "rootfs" / "out.txt").read_text() == "written by wasm\n"


async def test_readonly_rootfs_refuses_writes(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle
) -> None:
    bundle = make_bundle("files", readonly=True)
    assert await run_to_exit(runtime, "ro", bundle) == 11
    assert not (bundle / "rootfs" / "out.txt").exists()


async def test_fuel_limit_from_annotation(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle
) -> None:
    bundle = make_bundle("loop", annotations={FUEL_ANNOTATION: "200000"})
    assert await run_to_exit(runtime, "fuel", bundle) == 152
    assert (
        "stderr",
        "magikrun: wasm module ran out of fuel (200000 units); raise the fuel "
        "limit if it needs more",
    ) in log_lines(runtime, "fuel")


async def test_memory_limit_from_annotation(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle
) -> None:
    bundle = make_bundle("memory_hog", annotations={MEMORY_PAGES_ANNOTATION: "32"})
    assert await run_to_exit(runtime, "mem", bundle) == 137
    [(stream, text)] = log_lines(runtime, "mem")
    assert stream == "stderr" and "memory at the limit of 32 pages" in text


async def test_trap_is_134_and_logged(runtime: WasmtimeRuntime, make_bundle: MakeBundle) -> None:
    assert await run_to_exit(runtime, "trap", make_bundle("trap")) == 134
    [(stream, text)] = log_lines(runtime, "trap")
    assert stream == "stderr" and "wasm trap: wasm `unreachable` instruction executed" in text


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGKILL, 137)],
)
async def test_kill_stops_a_running_loop(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, sig: signal.Signals, code: int
) -> None:
    id = f"kill-{sig.name}"
    bundle = make_bundle("loop", annotations={FUEL_ANNOTATION: str(10**15)})
    await runtime.create(id, bundle)
    await runtime.start(id)
    assert (await runtime.state(id)).status is ContainerStatus.RUNNING
    await runtime.kill(id, sig.name)
    assert await runtime.wait(id) == code
    assert (await runtime.state(id)).status is ContainerStatus.STOPPED
    if sig is not signal.SIGKILL:
        assert ("stderr", f"magikrun: wasm module stopped by {sig.name}") in log_lines(runtime, id)
    with pytest.raises(InvalidState):
        await runtime.kill(id, "TERM")
    await runtime.delete(id)
    assert_nothing_left(runtime, id)


async def test_kill_of_created_container(runtime: WasmtimeRuntime, make_bundle: MakeBundle) -> None:
    await runtime.create("created", make_bundle("hello"))
    await runtime.kill("created", 15)
    assert await runtime.wait("created") == 143
    assert log_lines(runtime, "created") == []
    with pytest.raises(InvalidState):
        await runtime.start("created")


async def test_second_create_uses_the_compiled_module_cache(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle
) -> None:
    await runtime.create("first", make_bundle("hello"))
    [cached] = runtime.cache_dir.iterdir()
    before = cached.stat()
    await runtime.create("second", make_bundle("hello"))
    after = cached.stat()
    # Not compiled again: the one cache file was not replaced (a compile writes a
    # new file and renames it into place); the hit only refreshed its mtime.
    assert [p.name for p in runtime.cache_dir.iterdir()] == [cached.name]
    assert after.st_ino == before.st_ino
    assert after.st_mtime_ns >= before.st_mtime_ns
    await runtime.start("second")
    assert await runtime.wait("second") == 0
    await runtime.delete("first", force=True)
    await runtime.delete("second")


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (b"\0asm\x01\0\0\0\x99garbage", "is invalid"),
        (b"#!/bin/sh\necho not wasm\n", "not a WebAssembly binary"),
        (bytes(wasmtime.wat2wasm('(module (func (export "main")))')), "exports no _start"),
    ],
)
async def test_bad_module_fails_at_create_leaving_nothing(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, module: bytes, message: str
) -> None:
    with pytest.raises(CreateFailed, match=message) as info:
        await runtime.create("bad", make_bundle(module))
    assert info.value.hint
    assert_nothing_left(runtime, "bad")
    assert runtime.store.list() == []


async def test_module_path_cannot_escape_the_rootfs(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, short_tmp: Path
) -> None:
    outside = short_tmp / "outside.wasm"
    outside.write_bytes(wasm("hello"))
    bundle = make_bundle("hello")
    (bundle / "rootfs" / "link.wasm").symlink_to(outside)
    config = json.loads((bundle / "config.json").read_text())
    for target in ("/link.wasm", "../outside.wasm", "/../../outside.wasm", str(outside)):
        config["process"]["args"] = [target]
        (bundle / "config.json").write_text(json.dumps(config))
        with pytest.raises(InvalidBundle, match="cannot open the wasm module"):
            await runtime.create("escape", bundle)
        assert_nothing_left(runtime, "escape")


async def test_module_size_limit_is_checked_at_create(
    paths: Paths, make_bundle: MakeBundle
) -> None:
    runtime = WasmtimeRuntime(paths, module_size=64)
    with pytest.raises(LimitExceeded, match="over the limit of 64"):
        await runtime.create("big", make_bundle("echo"))
    assert_nothing_left(runtime, "big")


async def test_exec_and_console_socket_are_not_supported(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, short_tmp: Path
) -> None:
    bundle = make_bundle("hello")
    with pytest.raises(NotSupported, match="console-socket"):
        await runtime.create("tty", bundle, console_socket=short_tmp / "sock")
    assert_nothing_left(runtime, "tty")
    await runtime.create("noexec", bundle)
    await runtime.start("noexec")
    with pytest.raises(NotSupported, match="cannot exec into wasm container") as info:
        await runtime.exec("noexec", ["/bin/sh"])
    assert info.value.hint
    assert await runtime.wait("noexec") == 0
    await runtime.delete("noexec")


async def test_pid_file_and_forced_delete_of_running(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, short_tmp: Path
) -> None:
    pid_file = short_tmp / "pid"
    bundle = make_bundle("loop", annotations={FUEL_ANNOTATION: str(10**15)})
    state = await runtime.create("forced", bundle, pid_file=pid_file)
    assert int(pid_file.read_text()) == state.pid
    await runtime.start("forced")
    with pytest.raises(InvalidState):
        await runtime.delete("forced")
    await runtime.delete("forced", force=True)
    assert_nothing_left(runtime, "forced")
    assert state.pid is not None and not os.path.exists(f"/proc/{state.pid}")


async def test_registry_picks_wasm_for_a_wasm_bundle(paths: Paths, make_bundle: MakeBundle) -> None:
    registry = RuntimeRegistry(paths)
    config = json.loads((make_bundle("hello") / "config.json").read_text())
    assert registry.select_backend(config) == "wasm"
    backend = registry.backend("wasmtime")
    assert isinstance(backend, WasmtimeRuntime)
    assert backend.store is registry.store
    assert registry.available()["wasm"] is None


async def test_state_survives_a_new_runtime_object(paths: Paths, make_bundle: MakeBundle) -> None:
    first = WasmtimeRuntime(paths)
    await first.create("durable", make_bundle("hello"))
    second = WasmtimeRuntime(paths)
    assert (await second.state("durable")).status is ContainerStatus.CREATED
    await second.start("durable")
    assert await asyncio.wait_for(second.wait("durable"), 60) == 0
    await second.delete("durable")


async def test_bundle_built_from_a_module_runs_and_is_digest_checked(
    paths: Paths, runtime: WasmtimeRuntime, short_tmp: Path
) -> None:
    module = short_tmp / "echo.wasm"
    module.write_bytes(wasm("echo"))
    bundle = BundleBuilder(paths).build_wasm_bundle(
        None, ContainerConfig(name="built", args=["arg"], env={"KEY": "value"}), module
    )
    assert await run_to_exit(runtime, "built", bundle.path) == 0
    texts = [text for _s, text in log_lines(runtime, "built")]
    assert texts[0] == "arg"
    assert "KEY=value" in texts
    await runtime.delete("built")

    # The bundle records the module's digest: a module swapped afterwards is refused.
    (bundle.rootfs / "module.wasm").write_bytes(wasm("hello"))
    with pytest.raises(CreateFailed, match="hashes to sha256:"):
        await runtime.create("swapped", bundle.path)
    assert_nothing_left(runtime, "swapped")


FOREGROUND = """
import asyncio, sys
from magikrun.platform import Paths
from magikrun.runtime._wasmtime import WasmtimeRuntime

async def main() -> int:
    runtime = WasmtimeRuntime(Paths.resolve(sys.argv[1]))
    await runtime.create("fg", sys.argv[2], foreground=True)
    await runtime.start("fg")
    code = await runtime.wait("fg")
    await runtime.delete("fg")
    return code

sys.exit(asyncio.run(main()))
"""


def test_foreground_run_uses_the_callers_stdio(paths: Paths, make_bundle: MakeBundle) -> None:
    bundle = make_bundle("cat")
    done = subprocess.run(
        [sys.executable, "-c", FOREGROUND, str(paths.data), str(bundle)],
        input=b"typed by the caller\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"typed by the caller\n", b"")
    assert_nothing_left(WasmtimeRuntime(paths), "fg")


async def test_kill_stops_a_module_blocked_in_a_wasi_call(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle
) -> None:
    await runtime.create("sleeper", make_bundle("sleep"))
    await runtime.start("sleeper")
    await runtime.kill("sleeper", "SIGTERM")
    assert await runtime.wait("sleeper") == 143
    assert log_lines(runtime, "sleeper") == [
        ("stderr", "magikrun: wasm module stopped by SIGTERM inside a WASI call")
    ]
    await runtime.delete("sleeper")
    assert_nothing_left(runtime, "sleeper")


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"env": ["NO_EQUALS_SIGN"]}, InvalidBundle, "KEY=value"),
        ({"terminal": True}, NotSupported, "cannot have a terminal"),
        ({"cwd": "relative"}, InvalidBundle, "must be an absolute path"),
        ({"args": []}, InvalidBundle, "non-empty list"),
    ],
)
async def test_hostile_process_is_refused_leaving_nothing(
    runtime: WasmtimeRuntime,
    make_bundle: MakeBundle,
    change: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    bundle = make_bundle("hello")
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(change)
    (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        await runtime.create("hostile", bundle)
    assert_nothing_left(runtime, "hostile")


@pytest.mark.parametrize(
    "annotations",
    [{FUEL_ANNOTATION: "lots"}, {FUEL_ANNOTATION: "0"}, {MEMORY_PAGES_ANNOTATION: "65537"}],
)
async def test_bad_limit_annotations_are_refused(
    runtime: WasmtimeRuntime, make_bundle: MakeBundle, annotations: dict[str, str]
) -> None:
    with pytest.raises(InvalidBundle, match=r"annotation io\.magikrun\.wasm"):
        await runtime.create("limits", make_bundle("hello", annotations=annotations))
    assert_nothing_left(runtime, "limits")
