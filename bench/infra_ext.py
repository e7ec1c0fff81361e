"""Infra extensions: what they add to a pod's start, and how fast they hear of an exit.

Medians over ``--runs`` runs (default 5), each run doing, in turn, with a 1-container
busybox pod (image cached) whose container exits with code 7 on SIGUSR1:

* start without extensions: ``run_pod`` until it returns;
* start with the shipped ``health`` extension (its endpoint on the pod IP only);
* start with ``health`` asking for a ``hostPort`` (its port request in ``on_start``);
* event latency, on that last pod: from the exec of ``kill -USR1 1`` returning (the
  container is exiting by then) until ``GET 127.0.0.1:HOSTPORT/containers`` shows exit code
  7; once for an exit as soon as the endpoint shows the container running (the pod's
  supervisor, which reports exits, may still be starting), once ``SETTLE`` seconds later;
* late port request: a pod with the tests' ``porter`` extension, which asks for a host port
  when it sees the container's ``ContainerExited`` (an exit ``SETTLE`` seconds after the
  start): from the exec returning until that port answers on 127.0.0.1 (the settled event
  latency plus the port request's round trip).

Every pod is deleted before the next starts. ``--placement native`` (default) uses
crun and a private CNI bridge; ``--placement microvm`` runs the same pods in QEMU VMs.

    .venv/bin/python bench/infra_ext.py [--runs 5] [--placement native|microvm]   (as root)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is a package

from magikrun.image import build_demo_images
from magikrun.infra import INFRA_PATH_ENV
from magikrun.platform import Paths
from magikrun.pod import NativePodRuntime, PodNetwork, PodRuntime, PodSpec
from tests.infra._kit import free_port, get_json, infra_pod
from tests.infra.extpkg.dist import install
from tests.pod._podkit import free_subnet, unique

TRAPPED = "trap 'exit 7' USR1; touch /tmp/armed; sleep 600 & wait"
EXIT = "until [ -e /tmp/armed ]; do sleep 0.01; done; kill -USR1 1"
"""Run in the container: waits until the trap is set, then makes the container exit 7."""
_KILLED = 137
"""The exec'd shell may be killed with the container it just ended (its pid namespace)."""
SETTLE = 2.0
"""Seconds a pod runs before its container exits, so its supervisor is up (it starts
detached as ``run_pod`` returns and takes a while to import)."""
_POLL = 0.02
_TIMEOUT = 60.0


async def poll(check: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``check`` holds (connection errors count as not yet)."""
    start = time.perf_counter()
    while time.perf_counter() - start < _TIMEOUT:
        try:
            if await check():
                return time.perf_counter() - start
        except OSError:
            pass
        await asyncio.sleep(_POLL)
    raise TimeoutError(f"not reached in {_TIMEOUT} s")


class Bench:
    def __init__(self, runtime: PodRuntime) -> None:
        self.runtime = runtime

    async def start(self, spec: PodSpec) -> tuple[str, float]:
        start = time.perf_counter()
        handle = await self.runtime.run_pod(spec)
        return handle.id, time.perf_counter() - start

    async def timed_start(self, extensions: str, config: dict[str, str] | None = None) -> float:
        pod, seconds = await self.start(self.pod(extensions, config))
        await self.runtime.delete_pod(pod, force=True)
        return seconds

    def pod(self, extensions: str, config: dict[str, str] | None = None) -> PodSpec:
        return PodSpec.from_yaml(
            infra_pod(unique("bench"), extensions, {"app": TRAPPED}, config=config)
        )

    async def exit_app(self, pod: str) -> None:
        result = await self.runtime.exec(pod, "app", ["sh", "-c", EXIT])
        if result.exit_code not in (0, _KILLED):
            raise RuntimeError(f"kill in the container failed ({result.exit_code}): {result!r}")

    async def health_port(self, settle: float) -> tuple[float, float]:
        """Start of a health pod with a hostPort, then its event latency for an exit
        ``settle`` seconds after it showed the container running."""
        port = free_port()
        config = {"health": json.dumps({"port": 8080, "hostPort": port})}
        pod, seconds = await self.start(self.pod("health", config))
        try:

            async def state(wanted: dict[str, object]) -> bool:
                containers = await get_json("127.0.0.1", port, "/containers")
                return bool(containers) and all(
                    containers[0].get(k) == v for k, v in wanted.items()
                )

            await poll(lambda: state({"state": "running"}))
            await asyncio.sleep(settle)
            await self.exit_app(pod)
            latency = await poll(lambda: state({"state": "exited", "exitCode": 7}))
        finally:
            await self.runtime.delete_pod(pod, force=True)
        return seconds, latency

    async def late_port(self) -> float:
        port = free_port()
        config = {"porter": json.dumps({"port": 8081, "hostPort": port, "on": "ContainerExited"})}
        pod, _ = await self.start(self.pod("porter", config))
        try:

            async def answers() -> bool:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    return await reader.read() == b"late\n"
                finally:
                    writer.close()

            await asyncio.sleep(SETTLE)
            await self.exit_app(pod)
            return await poll(answers)
        finally:
            await self.runtime.delete_pod(pod, force=True)


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:8.1f} ms"


async def measure(runtime: PodRuntime, runs: int) -> None:
    bench = Bench(runtime)
    await bench.timed_start("")  # warm the image and bundle caches
    await bench.timed_start("health")
    plain: list[float] = []
    health: list[float] = []
    with_port: list[float] = []
    early: list[float] = []
    settled: list[float] = []
    late: list[float] = []
    for _ in range(runs):
        plain.append(await bench.timed_start(""))
        health.append(await bench.timed_start("health"))
        seconds, event = await bench.health_port(0.0)
        with_port.append(seconds)
        early.append(event)
        settled.append((await bench.health_port(SETTLE))[1])
        late.append(await bench.late_port())
    ratio = statistics.median(health) / statistics.median(plain)
    for label, value in (
        (f"run_pod, no extensions (median over {runs})", ms(plain)),
        ("run_pod, health", ms(health)),
        ("run_pod, health + hostPort", ms(with_port)),
        ("ratio health / no extensions", f"{ratio:8.2f}x"),
        ("exit at once -> health shows exit code", ms(early)),
        (f"exit after {SETTLE:g} s -> health shows exit code", ms(settled)),
        (f"exit after {SETTLE:g} s -> port asked for then is open", ms(late)),
    ):
        print(f"{label:<52} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--placement", choices=["native", "microvm"], default="native")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="infra-bench-") as tmp:
        work = Path(tmp)
        os.environ[INFRA_PATH_ENV] = str(install(work / "ext"))
        paths = Paths.resolve(work / "root").ensure()
        asyncio.run(build_demo_images(paths))
        print(f"placement {args.placement}")
        if args.placement == "microvm":
            from magikrun.pod._microvm import MicroVmPodRuntime

            asyncio.run(measure(MicroVmPodRuntime(paths), args.runs))
            return
        network = PodNetwork(paths, bridge=unique("mkb"), subnet=free_subnet())
        try:
            asyncio.run(measure(NativePodRuntime(paths, network=network), args.runs))
        finally:
            asyncio.run(network.remove_bridge())


if __name__ == "__main__":
    main()
