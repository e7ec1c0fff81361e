"""Benchmark: native container lifecycles through magikrun vs crun/runc, and monitor choices.

Run as root: ``.venv/bin/python bench/runtime_native.py [--runs N]``. Every figure
is a median over N runs; the peers are measured in the same run, interleaved, so
their ratios are comparable on a noisy machine.

1. create+start+wait+delete of /bin/true through the Python API vs ``crun run``
   of the same bundle (target: at most 1.5x), and vs crun's own create, start,
   state-poll and delete (the floor for any API with separate verbs).
2. ``magikrun run`` (the CLI, a fresh interpreter each time) with and without a
   bare ``python -I -S -c pass``, vs ``runc run`` (target: CLI minus interpreter
   at most 2x runc run).
3. The per-container monitor: Debian's conmon vs magikrun's Python monitor
   (forked from the warm process, or a fresh ``python -I -S``), full lifecycle
   and the monitor's resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import magikrun
from magikrun import _process
from magikrun.image import BundleBuilder, ContainerConfig
from magikrun.platform import Paths
from magikrun.runtime import NativeRuntime

_ids = itertools.count()


def _bundle(paths: Paths, directory: Path, argv: list[str], name: str) -> Path:
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("true", "sh", "sleep"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    for sub in ("proc", "dev", "sys"):
        (rootfs / sub).mkdir()
    BundleBuilder(paths).build_oci_bundle(
        None, ContainerConfig(name=name, command=argv), rootfs, directory
    )
    return directory


def _memory_kib(pid: int) -> tuple[int, int]:
    """Resident and proportional set size: a forked monitor shares most pages with its parent."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return fields["Rss"], fields["Pss"]


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.paths = Paths.resolve(work / "root").ensure()
        self.true = _bundle(self.paths, work / "true", ["/bin/true"], "bench-true")
        self.crun_root = work / "crun"
        self.runc_root = work / "runc"
        self.times: dict[str, list[float]] = {}
        self.memory: dict[str, list[tuple[int, int]]] = {}
        self.cli = Path(sys.executable).parent / "magikrun"

    def record(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds * 1000)

    async def timed(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        start = time.perf_counter()
        await step()
        self.record(name, time.perf_counter() - start)

    def timed_cmd(self, name: str, argv: list[str]) -> None:
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        self.record(name, time.perf_counter() - start)

    # -- the lifecycles measured

    async def api_cycle(self, runtime: NativeRuntime, memory_key: str | None = None) -> None:
        cid = f"api{next(_ids)}"
        await runtime.create(cid, self.true)
        if memory_key is not None:
            pid = runtime.store.load(cid).monitor_pid
            assert pid is not None
            self.memory.setdefault(memory_key, []).append(_memory_kib(pid))
        await runtime.start(cid)
        await runtime.wait(cid)
        await runtime.delete(cid)

    async def conmon_cycle(self) -> None:
        cid = f"cm{next(_ids)}"
        state = self.work / "conmon" / cid
        (state / "sock").mkdir(parents=True)
        (state / "exits").mkdir()
        sync_r, sync_w = os.pipe()
        crun = shutil.which("crun")
        assert crun is not None
        runtime_args = [f"--root={self.crun_root}", "--cgroup-manager=cgroupfs"]
        argv = [
            "conmon", "--api-version", "1", "-c", cid, "-u", cid, "-n", cid, "-r", crun,
            "-b", str(self.true), "-p", str(state / "pid"), "-P", str(state / "conmon.pid"),
            "--exit-dir", str(state / "exits"), "-l", f"k8s-file:{state / 'log'}",
            "--socket-dir-path", str(state / "sock"), "--log-level", "error",
        ]  # fmt: skip
        for arg in runtime_args:
            argv += ["--runtime-arg", arg]
        env = dict(os.environ, _OCI_SYNCPIPE=str(sync_w))
        subprocess.run(argv, pass_fds=(sync_w,), env=env, check=True, stdin=subprocess.DEVNULL)
        os.close(sync_w)
        with os.fdopen(sync_r, "rb") as sync:
            reply = json.loads(sync.readline())
        assert reply["data"] > 0, reply
        conmon_pid = int((state / "conmon.pid").read_text())
        self.memory.setdefault("conmon", []).append(_memory_kib(conmon_pid))
        subprocess.run([crun, *runtime_args, "start", cid], check=True)
        await _process.wait_exit(conmon_pid)
        assert (state / "exits" / cid).exists()
        subprocess.run([crun, *runtime_args, "delete", cid], check=True)

    async def run(self, runs: int) -> None:
        runtime = NativeRuntime(self.paths, oci_binary="crun")
        await runtime.binary()
        for _ in range(3):  # warm caches (page cache, crun's first use)
            await self.api_cycle(runtime)
        for _ in range(runs):
            await self.timed("api: create+start+wait+delete", lambda: self.api_cycle(runtime))
            n = next(_ids)
            self.timed_cmd(
                "crun run",
                ["crun", f"--root={self.crun_root}", "--cgroup-manager=cgroupfs", "run",
                 "--bundle", str(self.true), f"cr{n}"],
            )  # fmt: skip
            self._crun_steps(f"cs{n}")
            self.timed_cmd(
                "runc run", ["runc", "--root", str(self.runc_root), "run", "--bundle",
                             str(self.true), f"rr{n}"]
            )  # fmt: skip
            self.timed_cmd(
                "magikrun run (CLI)",
                [str(self.cli), "--root", str(self.paths.data), "run", "--bundle",
                 str(self.true), f"cli{n}"],
            )  # fmt: skip
            self.timed_cmd("python -I -S -c pass", [sys.executable, "-I", "-S", "-c", "pass"])
            await self.timed("monitor: conmon", self.conmon_cycle)
            await self.timed(
                "monitor: python (fork)", lambda: self.api_cycle(runtime, "python (fork)")
            )
            await self.timed("monitor: python -I -S (exec)", lambda: self._exec_cycle(runtime))

    def _crun_steps(self, cid: str) -> None:
        """crun's own create, start and delete: the floor under any create/start/delete API."""
        base = ["crun", f"--root={self.crun_root}", "--cgroup-manager=cgroupfs"]
        start = time.perf_counter()
        subprocess.run([*base, "create", "--bundle", str(self.true), cid], check=True)
        subprocess.run([*base, "start", cid], check=True)
        while (
            json.loads(
                subprocess.run([*base, "state", cid], capture_output=True, check=True).stdout
            )["status"]
            != "stopped"
        ):
            time.sleep(0.0005)
        subprocess.run([*base, "delete", cid], check=True)
        self.record("crun create+start+delete (no monitor)", time.perf_counter() - start)

    async def _exec_cycle(self, runtime: NativeRuntime) -> None:
        """A live second thread makes start_monitor exec a fresh interpreter instead of forking."""
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        try:
            await self.api_cycle(runtime, "python -I -S (exec)")
        finally:
            stop.set()
            thread.join()

    def report(self, runs: int) -> None:
        med = {name: statistics.median(values) for name, values in self.times.items()}
        print(f"median of {runs} runs (ms)")
        for name, value in med.items():
            print(f"  {name:<40} {value:8.2f}")
        api, crun_run = med["api: create+start+wait+delete"], med["crun run"]
        cli, bare, runc_run = (
            med["magikrun run (CLI)"],
            med["python -I -S -c pass"],
            med["runc run"],
        )
        floor = med["crun create+start+delete (no monitor)"]
        print(f"API / crun run                    {api / crun_run:6.2f}x  (target <= 1.5x)")
        print(f"crun create+start+delete / crun run {floor / crun_run:4.2f}x  (the floor)")
        print(f"API / crun create+start+delete    {api / floor:6.2f}x")
        print(f"CLI / runc run                    {cli / runc_run:6.2f}x")
        print(f"(CLI - bare python) / runc run    {(cli - bare) / runc_run:6.2f}x  (target <= 2x)")
        conmon = med["monitor: conmon"]
        for name in ("monitor: python (fork)", "monitor: python -I -S (exec)"):
            print(f"{name + ' / conmon':<34}{med[name] / conmon:6.2f}x")
        print("monitor memory while its container waits in 'created', median KiB (RSS / PSS)")
        for name, values in self.memory.items():
            rss = statistics.median(v[0] for v in values)
            pss = statistics.median(v[1] for v in values)
            print(f"  {name:<40} {rss:8.0f} / {pss:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: containers need it")
    # An installed package has its bytecode; this checkout may not (PYTHONDONTWRITEBYTECODE).
    compileall.compile_dir(Path(magikrun.__file__).parent, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="mkb-", dir="/tmp"))
    try:
        bench = Bench(work)
        asyncio.run(bench.run(args.runs))
        bench.report(args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
