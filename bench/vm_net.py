"""MicroVM pod networking: what the bridge (netns, CNI, tap) costs against user-mode.

Pods: ``MicroVmPodRuntime.run_pod`` of one busybox container (image cached) to
all-running, with ``network="bridge"`` and ``network="user"`` alternately. Attach: the
host-side bridge steps alone, without a VM (netns, CNI ADD, tap and tc redirects, then
CNI DEL and the netns removed). Prints medians. Uses its own bridge and /24, removed
at the end.

    .venv/bin/python bench/vm_net.py [--runs 3] [--attaches 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from vm_pod import POD  # one busybox pod for both microVM benches

from magikrun.image import build_demo_images
from magikrun.platform import Paths
from magikrun.pod import PodNetwork, PodSpec, create_netns, delete_netns
from magikrun.pod._microvm import MicroVmPodRuntime
from magikrun.runtime._tap import open_tap


async def pod_run(runtime: MicroVmPodRuntime) -> float:
    spec = PodSpec.from_yaml(POD.format(name=f"bench{secrets.token_hex(3)}").encode())
    start = time.perf_counter()
    handle = await runtime.run_pod(spec)
    running = time.perf_counter() - start
    await runtime.delete_pod(handle.id, force=True)
    return running


async def attach(network: PodNetwork) -> float:
    pod = f"bench{secrets.token_hex(3)}"
    netns = network.netns_path(pod)
    start = time.perf_counter()
    create_netns(netns)
    await network.add(pod, netns)
    os.close(await open_tap(netns))
    elapsed = time.perf_counter() - start
    await network.delete(pod, netns)
    delete_netns(netns)
    return elapsed


async def bench(paths: Paths, runs: int, attaches: int) -> None:
    await build_demo_images(paths)
    network = PodNetwork(paths, bridge=f"mkb{secrets.token_hex(3)}", subnet="10.251.77.0/24")
    try:
        attach_times = [await attach(network) for _ in range(attaches)]
        times: dict[str, list[float]] = {"bridge": [], "user": []}
        runtimes = {
            kind: MicroVmPodRuntime(paths, network=kind, pod_network=network) for kind in times
        }
        await pod_run(runtimes["bridge"])  # warm the caches
        for index in range(runs):
            order = ("bridge", "user") if index % 2 == 0 else ("user", "bridge")
            for kind in order:
                times[kind].append(await pod_run(runtimes[kind]))
    finally:
        await network.remove_bridge()
    median = statistics.median(attach_times)
    print(f"bridge attach (netns + CNI ADD + tap + tc)  median {median:6.3f} s  over {attaches}")
    for kind, measured in times.items():
        median = statistics.median(measured)
        print(f"microVM pod to all-running, {kind:<6}      median {median:6.2f} s  over {runs}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--attaches", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vm-net-bench-") as tmp:
        paths = Paths.resolve(Path(tmp) / "root").ensure()
        asyncio.run(bench(paths, args.runs, args.attaches))


if __name__ == "__main__":
    main()
