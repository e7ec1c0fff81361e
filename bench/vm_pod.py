"""MicroVM pod start: magikrun's 1-container microVM pod to all-running vs a bare QEMU boot.

magikrun: ``MicroVmPodRuntime.run_pod`` of one busybox container (image cached) until it
returns (the VM booted, vminit ready, crun running the container), and the whole
run-stop-delete. Bare: ``qemu-system-x86_64`` with the same kernel, the same initramfs
(with an ``/init`` that reboots at once), machine, accelerator, size and devices (its
three pod shares too) as the pod's VM, from launch until QEMU exits
(``bench/vm_boot.py``'s bare boot). Runs alternate; prints medians, the ratio (target:
pod start <= 1.5x the bare boot) and the load average (the machine is shared: compare
ratios from one run).

    .venv/bin/python bench/vm_pod.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vm_boot import bare_boot, bare_initramfs, load

from magikrun.image import build_demo_images
from magikrun.platform import Paths
from magikrun.pod import PodSpec
from magikrun.pod._microvm import MicroVmPodRuntime, vm_size
from magikrun.runtime._guestkernel import find_guest_kernel
from magikrun.runtime._qemu import UserNetwork, VmConfig, choose_accel

POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  restartPolicy: Never
  containers:
  - name: app
    image: magikrun.local/busybox:demo
    imagePullPolicy: Never
    command: [sleep, "1000"]
"""


async def pod_run(runtime: MicroVmPodRuntime) -> tuple[float, float]:
    spec = PodSpec.from_yaml(POD.format(name=f"bench{secrets.token_hex(3)}").encode())
    start = time.perf_counter()
    handle = await runtime.run_pod(spec)
    running = time.perf_counter() - start
    await runtime.stop_pod(handle.id, grace=1)
    await runtime.delete_pod(handle.id)
    return running, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vm-pod-bench-") as tmp:
        work = Path(tmp)
        paths = Paths.resolve(work / "root").ensure()
        asyncio.run(build_demo_images(paths))
        accel = choose_accel(paths)
        kernel = find_guest_kernel(paths)
        vcpus, memory = vm_size(PodSpec.from_yaml(POD.format(name="size").encode()))
        shares: list[
            tuple[str, str]
        ] = []  # as many writable 9p devices as the pod's VM gets (pod dir, bundle, rootfs)
        for name in ("pod", "bundle", "rootfs"):
            (work / name).mkdir()
            shares.append((f"pod.{len(shares)}", str(work / name)))
        config = VmConfig(
            accel=accel,
            vcpus=vcpus,
            memory_mib=memory,
            network=UserNetwork(),
            shares=tuple(shares),
        )
        bare_rd = bare_initramfs(paths, config, work / "bare.cpio")
        print(
            f"accelerator {accel}, machine {config.machine}, {vcpus} vCPU, {memory} MiB,"
            f" vminit's Python {config.python}; load {load()} at start"
        )
        runtime = MicroVmPodRuntime(paths)
        asyncio.run(pod_run(runtime))  # warm the caches
        bare: list[float | None] = []
        running: list[float] = []
        whole: list[float] = []
        for index in range(args.runs):
            if index % 2:
                bare.append(bare_boot(config, accel, kernel.vmlinux, bare_rd, work))
            one_running, one_whole = asyncio.run(pod_run(runtime))
            running.append(one_running)
            whole.append(one_whole)
            if not index % 2:
                bare.append(bare_boot(config, accel, kernel.vmlinux, bare_rd, work))
        median_bare = statistics.median(t for t in bare if t is not None)
        median_running = statistics.median(running)
        print(f"-- medians, load {load()} at the end")
        print(
            f"bare qemu boot to init (and exit)     median {median_bare:6.2f} s  over {len(bare)}"
            f"  ({bare.count(None)} hung)"
        )
        print(
            f"microVM pod run to all-running       median {median_running:6.2f} s  over {args.runs}"
        )
        print(f"microVM pod run + stop + delete      median {statistics.median(whole):6.2f} s")
        print(f"ratio pod start / bare boot          {median_running / median_bare:6.2f}x")


if __name__ == "__main__":
    main()
