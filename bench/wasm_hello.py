"""Wasm hello-world, create to exit, with a warm compiled-module cache.

Prints medians over RUNS runs (default 30) of:

* magikrun's Python API: create (module from the cache, monitor and worker forked
  from the caller), start to exit, and create to exit, through ``WasmtimeRuntime``;
  the same from a caller with a second thread alive, which cannot fork and starts
  fresh interpreters instead; and ``magikrun run``;
* the peer measured in the same run: a fresh ``python -I`` that imports wasmtime,
  deserializes the same compiled module and runs it (the least a separate wasmtime-py
  process can cost), and the parts a worker pays before it runs anything.

Usage: ``.venv/bin/python bench/wasm_hello.py [RUNS]``
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import wasmtime

from magikrun.platform import Paths
from magikrun.runtime._wasm_engine import WasiSpec, WasmEngine
from magikrun.runtime._wasmtime import WasmtimeRuntime

T = TypeVar("T")
HELLO_WAT = Path(__file__).resolve().parent.parent / "tests" / "runtime" / "wasm" / "hello.wat"

BARE = """
import sys, wasmtime
config = wasmtime.Config()
config.consume_fuel = True
config.epoch_interruption = True
engine = wasmtime.Engine(config)
module = wasmtime.Module.deserialize_file(engine, sys.argv[1])
store = wasmtime.Store(engine)
store.set_fuel(10**9)
store.set_epoch_deadline(1)
wasi = wasmtime.WasiConfig()
wasi.inherit_stdout()
store.set_wasi(wasi)
linker = wasmtime.Linker(engine)
linker.define_wasi()
linker.instantiate(store, module).exports(store)["_start"](store)
"""


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:8.2f} ms"


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def python(*args: str) -> Callable[[], object]:
    argv = [sys.executable, "-I", *args]
    return lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


async def magikrun_runs(
    root: Path, bundle: Path, runs: int, prefix: str
) -> tuple[dict[str, list[float]], WasmtimeRuntime]:
    runtime = WasmtimeRuntime(Paths.resolve(root).ensure())
    await runtime.create(f"{prefix}-warmup", bundle)  # fills the module cache
    await runtime.delete(f"{prefix}-warmup", force=True)
    phases: dict[str, list[float]] = {"create": [], "start to exit": [], "create to exit": []}
    for i in range(runs):
        id = f"{prefix}-{i}"
        t0 = time.perf_counter()
        await runtime.create(id, bundle)
        t1 = time.perf_counter()
        await runtime.start(id)
        code = await runtime.wait(id)
        t2 = time.perf_counter()
        assert code == 0, code
        await runtime.delete(id)
        phases["create"].append(t1 - t0)
        phases["start to exit"].append(t2 - t1)
        phases["create to exit"].append(t2 - t0)
    return phases, runtime


def with_a_thread(work: Callable[[], T]) -> T:
    """Run ``work`` while another thread is alive, as in a caller using a thread pool."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        return work()
    finally:
        stop.set()
        thread.join()


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory(prefix="mk-bench-") as tmp:
        base = Path(tmp)
        bundle = base / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        wasm = bytes(wasmtime.wat2wasm(HELLO_WAT.read_text()))
        (bundle / "rootfs" / "hello.wasm").write_bytes(wasm)
        (bundle / "config.json").write_text(
            '{"ociVersion": "1.0.2", "root": {"path": "rootfs"},'
            ' "process": {"args": ["/hello.wasm"], "cwd": "/", "env": []}}'
        )
        phases, forked = asyncio.run(magikrun_runs(base / "root", bundle, runs, "fork"))
        threaded, spawned = with_a_thread(
            lambda: asyncio.run(magikrun_runs(base / "root", bundle, runs, "exec"))
        )
        assert forked.spawned == 0 and spawned.forked == 0, "fork/exec choice not as expected"

        engine = WasmEngine(cache_dir=base / "root" / "cache" / "wasm")
        compiled = engine.load_bytes(wasm, name="hello.wasm")
        cached = engine.cache_file(compiled.digest)
        assert compiled.cache_hit and cached is not None
        devnull = str(Path("/dev/null"))
        in_process = timed(
            lambda: engine.run(
                engine.prepare(
                    engine.load_bytes(wasm, name="hello.wasm"),
                    WasiSpec(argv=("hello.wasm",), stdout=devnull),
                )
            ),
            runs,
        )
        magikrun_cli = shutil.which("magikrun", path=str(Path(sys.executable).parent))
        assert magikrun_cli is not None, "install magikrun into this venv first"
        cli_argv = [magikrun_cli, "--root", str(base / "root"), "run", "--bundle", str(bundle)]
        cli_ids = (f"cli-{i}" for i in range(runs))
        cli = timed(
            lambda: subprocess.run(
                [*cli_argv, next(cli_ids)], check=True, stdout=subprocess.DEVNULL
            ),
            runs,
        )
        bare = timed(python("-c", BARE, str(cached)), runs)
        interpreter = timed(python("-c", "pass"), runs)
        import_wasmtime = timed(python("-c", "import wasmtime"), runs)
        import_worker = timed(
            python("-c", "import magikrun.runtime._wasm_worker, magikrun.runtime._wasm_engine"),
            runs,
        )

    total = statistics.median(phases["create to exit"])
    print(f"wasm hello-world, warm module cache, medians of {runs} runs")
    print("magikrun (Python API, WasmtimeRuntime), single-threaded caller (fork path):")
    for name, samples in phases.items():
        print(f"  {name:<52}{ms(samples)}")
    print("magikrun (Python API), caller with another thread (exec path):")
    print(f"  {'create to exit':<52}{ms(threaded['create to exit'])}")
    print(f"  {'magikrun run (CLI, foreground, incl. interpreter)':<52}{ms(cli)}")
    print("peer: fresh python -I + wasmtime-py running the cached module:")
    print(f"  {'create to exit':<52}{ms(bare)}")
    print(f"  ratio magikrun / peer: {total / statistics.median(bare):.2f}x")
    print("what a worker pays before it runs anything:")
    print(f"  {'python -I -c pass':<52}{ms(interpreter)}")
    print(f"  {'python -I -c import wasmtime':<52}{ms(import_wasmtime)}")
    print(f"  {'python -I -c import worker + engine':<52}{ms(import_worker)}")
    print(f"  {'in-process cache load+link+run':<52}{ms(in_process)}")
    print(f"target: create to exit under 20 ms -> {'met' if total < 0.020 else 'NOT met'}")


if __name__ == "__main__":
    main()
