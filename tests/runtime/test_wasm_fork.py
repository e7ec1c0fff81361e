"""The fast path of wasm containers: the worker is a fork of a fork of the creating process.

Each test drives the runtime from a fresh single-threaded caller (a subprocess), the
only kind that forks; pytest-xdist's workers have a second thread and take the
exec path, which :mod:`tests.runtime.test_wasm_runtime` covers. The properties
checked are the ones a separate process exists for: the container is not the
caller, outlives it, can be killed, and its crash does not reach the caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from magikrun.platform import Paths
from magikrun.runtime import ContainerStatus
from magikrun.runtime._store import process_start_time
from magikrun.runtime._wasmtime import FUEL_ANNOTATION, WasmtimeRuntime

from .test_wasm_runtime import MakeBundle, assert_nothing_left, log_lines, make_bundle

__all__ = ["make_bundle"]

CALLER = """
import asyncio, json, os, signal, sys, threading
from magikrun.platform import Paths
from magikrun.runtime._wasmtime import WasmtimeRuntime

root, command, *bundles = sys.argv[1:]

def fds(pid):
    path = f"/proc/{pid}/fd"
    return sorted(os.readlink(f"{path}/{fd}") for fd in os.listdir(path))

async def main():
    runtime = WasmtimeRuntime(Paths.resolve(root))
    out = {"caller": os.getpid()}
    if command == "leave-running":
        marker = os.open(bundles[1], os.O_RDONLY)  # inheritable: a fork gets it
        state = await runtime.create("spin", bundles[0])
        out["fds_created"] = fds(state.pid)
        await runtime.start("spin")
        record = runtime.store.load("spin")
        out.update(pid=record.pid, monitor=record.monitor_pid, fds=fds(record.pid),
                   monitor_fds=fds(record.monitor_pid))
        os.close(marker)
    elif command == "crash":
        codes = []
        for id, bundle in zip(("abrt", "oom", "trap", "hello"), bundles):
            state = await runtime.create(id, bundle)
            await runtime.start(id)
            if id in ("abrt", "oom"):
                os.kill(state.pid, signal.SIGABRT if id == "abrt" else signal.SIGKILL)
            codes.append(await runtime.wait(id))
            await runtime.delete(id)
        out["codes"] = codes
    elif command == "threaded":
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        try:
            await runtime.create("threaded", bundles[0])
            await runtime.start("threaded")
            out["codes"] = [await runtime.wait("threaded")]
            await runtime.delete("threaded")
        finally:
            stop.set()
            thread.join()
    out.update(forked=runtime.forked, spawned=runtime.spawned)
    print(json.dumps(out))

asyncio.run(main())
"""


def caller(paths: Paths, command: str, *args: Path) -> dict[str, Any]:
    """Run CALLER in a fresh interpreter; it has exited when this returns."""
    done = subprocess.run(
        [sys.executable, "-c", CALLER, str(paths.data), command, *map(str, args)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def test_container_is_its_own_process_and_outlives_its_caller(
    paths: Paths, make_bundle: MakeBundle, short_tmp: Path
) -> None:
    bundle = make_bundle("loop", annotations={FUEL_ANNOTATION: str(10**15)})
    marker = short_tmp / "caller-secret"
    marker.write_text("only the caller opened this")
    out = caller(paths, "leave-running", bundle, marker)
    assert (out["forked"], out["spawned"]) == (1, 0)
    pid, monitor = out["pid"], out["monitor"]
    assert len({pid, monitor, out["caller"]}) == 3
    # The caller has exited; the worker still runs, owned by its monitor, which
    # was re-parented away from the caller.
    assert process_start_time(pid) is not None
    assert parent_of(pid) == monitor
    assert parent_of(monitor) != out["caller"]
    # Forked from the caller, yet no fd of the caller's reached worker or monitor.
    for links in (out["fds_created"], out["fds"], out["monitor_fds"]):
        assert str(marker) not in links
    assert all(not link.startswith("socket:") for link in out["fds"])

    runtime = WasmtimeRuntime(paths)
    assert (await runtime.state("spin")).status is ContainerStatus.RUNNING
    await runtime.kill("spin", "SIGTERM")
    assert await runtime.wait("spin") == 128 + signal.SIGTERM
    assert log_lines(runtime, "spin") == [("stderr", "magikrun: wasm module stopped by SIGTERM")]
    await runtime.delete("spin")
    assert_nothing_left(runtime, "spin")


async def test_kill_9_stops_a_running_loop(
    paths: Paths, make_bundle: MakeBundle, short_tmp: Path
) -> None:
    bundle = make_bundle("loop", annotations={FUEL_ANNOTATION: str(10**15)})
    (short_tmp / "marker").touch()
    out = caller(paths, "leave-running", bundle, short_tmp / "marker")
    runtime = WasmtimeRuntime(paths)
    await runtime.kill("spin", signal.SIGKILL)
    assert await runtime.wait("spin") == 128 + signal.SIGKILL
    assert process_start_time(out["pid"]) is None
    await runtime.delete("spin")
    assert_nothing_left(runtime, "spin")


async def test_crash_in_the_worker_does_not_reach_the_caller(
    paths: Paths, make_bundle: MakeBundle
) -> None:
    spin = {FUEL_ANNOTATION: str(10**15)}
    bundles = [
        make_bundle("loop", annotations=spin),
        make_bundle("loop", annotations=spin),
        make_bundle("trap"),
        make_bundle("hello"),
    ]
    out = caller(paths, "crash", *bundles)
    # The caller lived through an abort, a kill as the OOM killer does, and a trap
    # of its workers, and went on to run the next container.
    assert out["codes"] == [128 + signal.SIGABRT, 128 + signal.SIGKILL, 134, 0]
    assert (out["forked"], out["spawned"]) == (4, 0)
    runtime = WasmtimeRuntime(paths)
    for id in ("abrt", "oom", "trap", "hello"):
        assert_nothing_left(runtime, id)


async def test_caller_with_threads_starts_fresh_interpreters(
    paths: Paths, make_bundle: MakeBundle
) -> None:
    out = caller(paths, "threaded", make_bundle("hello"))
    assert out["codes"] == [0]
    assert (out["forked"], out["spawned"]) == (0, 1)
    assert_nothing_left(WasmtimeRuntime(paths), "threaded")


async def test_fork_or_exec_follows_the_threads_of_this_process(
    paths: Paths, make_bundle: MakeBundle
) -> None:
    """Whatever this process is (pytest-xdist worker or not), the choice follows its threads."""
    runtime = WasmtimeRuntime(paths)
    single = len(os.listdir("/proc/self/task")) == 1
    await runtime.create("here", make_bundle("hello"))
    await runtime.start("here")
    assert await asyncio.wait_for(runtime.wait("here"), 120) == 0
    assert (runtime.forked, runtime.spawned) == ((1, 0) if single else (0, 1))
    await runtime.delete("here")
    assert_nothing_left(runtime, "here")
