"""MicroVM pod start: magikrun's 1-container microVM pod to all-running vs a bare QEMU boot.

magikrun: ``MicroVmPodRuntime.run_pod`` of one busybox container (image cached) until it
returns (the VM booted, vminit ready, crun running the container), and the whole
run-stop-delete. Bare: ``qemu-system-x86_64`` with the same kernel, the same initramfs
(with an ``/init`` that reboots at once), machine, accelerator, size and devices (its
three pod shares too) as the pod's VM, from launch until QEMU exits
(``bench/vm_boot.py``'s bare boot). Runs alternate; prints medians, the ratio (target:
pod start <= 1.5x the bare boot) and the load average (the machine is shared: compare
ratios from one run).

With ``--trace``, each timed pod start also records its timeline (``$MAGIKRUN_TRACE``,
see :mod:`magikrun.runtime._trace`: the pod runtime's, the keeper's and QEMU's steps
on the host, and vminit's in the guest) and the bench prints each step's median time
since ``run_pod`` was called and since the step before.

    .venv/bin/python bench/vm_pod.py [--runs 3] [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
from magikrun.runtime._trace import TRACE_ENV

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


async def pod_run(runtime: MicroVmPodRuntime, trace: Path | None = None) -> tuple[float, float]:
    spec = PodSpec.from_yaml(POD.format(name=f"bench{secrets.token_hex(3)}").encode())
    if trace is not None:
        os.environ[TRACE_ENV] = str(trace)
    start = time.perf_counter()
    try:
        handle = await runtime.run_pod(spec)
    finally:
        os.environ.pop(TRACE_ENV, None)
    running = time.perf_counter() - start
    await runtime.stop_pod(handle.id, grace=1)
    await runtime.delete_pod(handle.id)
    return running, time.perf_counter() - start


def timeline(traces: list[Path]) -> None:
    """Each step's median time since the first (``run_pod``) and since the step before."""
    steps: dict[str, list[float]] = {}
    for path in traces:
        stamps = sorted(
            (float(at), step) for at, _, step in (line.split(None, 2) for line in path.open())
        )
        for at, step in stamps:
            steps.setdefault(step.strip(), []).append(at - stamps[0][0])
    print("-- timeline (median s since run_pod, and since the step before)")
    previous = 0.0
    for step, times in sorted(steps.items(), key=lambda item: statistics.median(item[1])):
        at = statistics.median(times)
        print(f"{at:7.3f}  +{at - previous:6.3f}  {step}")
        previous = at


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="print the start's timeline")
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
        traces: list[Path] = []
        for index in range(args.runs):
            if index % 2:
                bare.append(bare_boot(config, accel, kernel.vmlinux, bare_rd, work))
            trace = work / f"trace.{index}" if args.trace else None
            one_running, one_whole = asyncio.run(pod_run(runtime, trace))
            if trace is not None:
                traces.append(trace)
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
        if traces:
            timeline(traces)


if __name__ == "__main__":
    main()
