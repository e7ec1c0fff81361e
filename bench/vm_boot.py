"""MicroVM boot: a bare QEMU boot to init vs magikrun's boot to a ready vminit.

Bare: ``qemu-system-x86_64`` with the same kernel (the extracted ``vmlinux``), the same
initramfs (magikrun's, plus an archive whose ``/init`` reboots at once), the same
machine type, accelerator and devices, timed from launch until QEMU exits (it runs
with ``-no-reboot``). magikrun: ``MicroVm.boot()`` (initramfs cached) until vminit has
answered ``hello`` and ``ping``; and the whole boot-ping-shutdown. Runs alternate.

Also times bare-boot variants to show what the kernel image, the machine type and the
kernel command line cost: the bzImage instead of the vmlinux, ``microvm`` instead of
q35, and the command line without the boot-time flags. Prints medians and ratios.

    .venv/bin/python bench/vm_boot.py [--runs 5] [--variant-runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from magikrun.platform import Paths
from magikrun.runtime._guestkernel import find_guest_kernel
from magikrun.runtime._initramfs import CpioWriter, build_initramfs
from magikrun.runtime._qemu import (
    DEFAULT_CMDLINE,
    EXTRA_BOOT_FLAGS,
    Machine,
    MicroVm,
    VmConfig,
    choose_accel,
    guest_init,
    guest_modules,
    qemu_argv,
)

BARE_INIT = b"#!/bin/sh\n/bin/busybox reboot -f\n"
DEADLINE = 60.0
"""A bare boot still running after this is counted as a hang (QEMU is killed)."""


def bare_boot(
    config: VmConfig, accel: str, kernel: Path, initramfs: Path, work: Path
) -> float | None:
    """Seconds from launch to QEMU's exit, or None for a boot that hung past DEADLINE."""
    ctl_host, ctl_qemu = socket.socketpair()
    qmp_host, qmp_qemu = socket.socketpair()
    argv = qemu_argv(
        config, accel, kernel, initramfs, work / "console.log", ctl_qemu.fileno(), qmp_qemu.fileno()
    )
    start = time.perf_counter()
    try:
        subprocess.run(
            argv,
            pass_fds=(ctl_qemu.fileno(), qmp_qemu.fileno()),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired:
        return None
    finally:
        for sock in (ctl_host, ctl_qemu, qmp_host, qmp_qemu):
            sock.close()
    return time.perf_counter() - start


async def magikrun_boot(paths: Paths, config: VmConfig) -> tuple[float, float]:
    start = time.perf_counter()
    vm = MicroVm(paths, config)
    await vm.boot()
    try:
        await vm.client.ping()
        ready = time.perf_counter() - start
    finally:
        await vm.shutdown(grace=1)
    return ready, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variant-runs", type=int, default=3)
    parser.add_argument(
        "--microvm", action="store_true", help="also time -machine microvm (hangs here under TCG)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vm-bench-") as tmp:
        work = Path(tmp)
        paths = Paths.resolve(work / "root").ensure()
        accel = choose_accel(paths)
        kernel = find_guest_kernel(paths)
        bzimage = Path("/boot") / f"vmlinuz-{kernel.version}"

        def initramfs_for(config: VmConfig) -> Path:
            base = build_initramfs(
                paths,
                kernel,
                guest_init(),
                modules=guest_modules(config),
            )
            bare_init = CpioWriter()
            bare_init.file("init", BARE_INIT, 0o755)
            path = work / f"bare-{config.machine}.cpio"
            path.write_bytes(base.read_bytes() + bare_init.finish())
            return path

        config = VmConfig(accel=accel)
        bare_rd = initramfs_for(config)
        print(f"accelerator {accel}, machine {config.machine}, kernel {kernel.version}")
        print(
            f"initramfs {bare_rd.stat().st_size // 1024} KiB, cmdline: {' '.join(config.cmdline)}"
        )
        asyncio.run(magikrun_boot(paths, config))  # warm the caches
        bare: list[float | None] = []
        ready: list[float] = []
        whole: list[float] = []
        for index in range(args.runs):
            if index % 2:
                bare.append(bare_boot(config, accel, kernel.vmlinux, bare_rd, work))
            one_ready, one_whole = asyncio.run(magikrun_boot(paths, config))
            ready.append(one_ready)
            whole.append(one_whole)
            if not index % 2:
                bare.append(bare_boot(config, accel, kernel.vmlinux, bare_rd, work))
        median_bare = statistics.median(t for t in bare if t is not None)
        median_ready = statistics.median(ready)
        print(
            f"bare qemu boot to init (and exit)  median {median_bare:6.2f} s  over {len(bare)}"
            f"  ({bare.count(None)} hung)"
        )
        print(f"magikrun boot to ready (ping)      median {median_ready:6.2f} s  over {len(ready)}")
        print(f"magikrun boot + ping + shutdown    median {statistics.median(whole):6.2f} s")
        print(f"ratio magikrun ready / bare boot   {median_ready / median_bare:6.2f}x")
        micro = VmConfig(accel=accel, machine=Machine.MICROVM)
        variants = {
            "bare, bzImage instead of vmlinux": (config, bzimage, bare_rd),
            "bare, cmdline plus boot-saver flags": (
                VmConfig(accel=accel, cmdline=DEFAULT_CMDLINE + EXTRA_BOOT_FLAGS),
                kernel.vmlinux,
                bare_rd,
            ),
        }
        if args.microvm:
            variants["bare, microvm instead of q35"] = (micro, kernel.vmlinux, initramfs_for(micro))
        for name, (variant, image, rd) in variants.items() if args.variant_runs else ():
            times: list[float | None] = []
            paired: list[float | None] = []
            for _ in range(args.variant_runs):  # each paired with a default bare boot
                times.append(bare_boot(variant, accel, image, rd, work))
                paired.append(bare_boot(config, accel, kernel.vmlinux, bare_rd, work))
            done = [t for t in times if t is not None]
            base = statistics.median(t for t in paired if t is not None)
            median = f"{statistics.median(done):6.2f} s" if done else "   -    "
            print(
                f"{name:34s} median {median}  over {len(times)} ({times.count(None)} hung)"
                f"  vs default bare {base:.2f} s in the same runs"
            )
        print(f"boot-saver flags tried: {' '.join(EXTRA_BOOT_FLAGS)}")


if __name__ == "__main__":
    main()
