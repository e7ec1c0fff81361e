"""MicroVM boot: a bare QEMU boot to init vs magikrun's boot to a ready vminit.

Bare: ``qemu-system-x86_64`` with the same kernel (the extracted ``vmlinux``), the same
initramfs (magikrun's archives, plus one whose ``/init`` reboots at once), the same
machine type, accelerator and devices, timed from launch until QEMU exits (it runs
with ``-no-reboot``). magikrun: ``MicroVm.boot()`` (initramfs cached) until vminit has
answered ``hello`` and ``ping``; and the whole boot-ping-shutdown. Both ways vminit's
Python can come (``packed`` into the initramfs, ``shared`` from the host over 9p) are
timed, each against the bare boot of its own initramfs; runs are interleaved.

Also times bare-boot variants to show what the kernel image, the firmware, the machine
type and the kernel command line cost: the bzImage instead of the vmlinux, SeaBIOS
instead of qboot, ``microvm`` instead of q35, and the command line with more flags.
Prints medians, ratios, the guest's uptime when vminit reported ready (the rest of the
host's time is QEMU and firmware before the kernel's clock starts) and the load.

    .venv/bin/python bench/vm_boot.py [--runs 5] [--variant-runs 3] [--python both]
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
from magikrun.runtime._initramfs import CpioWriter
from magikrun.runtime._qemu import (
    DEFAULT_CMDLINE,
    EXTRA_BOOT_FLAGS,
    GuestPython,
    Machine,
    MicroVm,
    VmConfig,
    boot_files,
    choose_accel,
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


def bare_initramfs(paths: Paths, config: VmConfig, path: Path) -> Path:
    """``path``: the archives ``config``'s VM boots, then an ``/init`` that reboots."""
    _, archives = boot_files(paths, config)
    bare_init = CpioWriter()
    bare_init.file("init", BARE_INIT, 0o755)
    path.write_bytes(b"".join(a.read_bytes() for a in archives) + bare_init.finish())
    return path


def load() -> str:
    """The 1-minute load average (the machine is shared: every figure comes with it)."""
    return Path("/proc/loadavg").read_text().split()[0]


async def magikrun_boot(paths: Paths, config: VmConfig) -> tuple[float, float, float]:
    """Seconds to ready (ping answered), the guest's uptime then, seconds to shut down."""
    start = time.perf_counter()
    vm = MicroVm(paths, config)
    await vm.boot()
    try:
        await vm.client.ping()
        ready = time.perf_counter() - start
    finally:
        await vm.shutdown(grace=1)
    return ready, float(vm.ready["uptime"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variant-runs", type=int, default=3)
    parser.add_argument(
        "--python",
        choices=["both", *GuestPython],
        default="both",
        help="where vminit's Python comes from (both: compare them, interleaved)",
    )
    parser.add_argument(
        "--microvm", action="store_true", help="also time -machine microvm (hangs here under TCG)"
    )
    args = parser.parse_args()
    kinds = list(GuestPython) if args.python == "both" else [GuestPython(args.python)]
    with tempfile.TemporaryDirectory(prefix="vm-bench-") as tmp:
        work = Path(tmp)
        paths = Paths.resolve(work / "root").ensure()
        accel = choose_accel(paths)
        kernel = find_guest_kernel(paths)
        bzimage = Path("/boot") / f"vmlinuz-{kernel.version}"
        configs = {kind: VmConfig(accel=accel, python=kind) for kind in kinds}
        bare_rd = {
            kind: bare_initramfs(paths, config, work / f"bare-{kind}.cpio")
            for kind, config in configs.items()
        }
        config = configs[kinds[0]]
        print(f"accelerator {accel}, machine {config.machine}, kernel {kernel.version}")
        print(f"cmdline: {' '.join(config.cmdline)}; load {load()} at start")
        for kind, rd in bare_rd.items():
            print(f"initramfs with vminit's Python {kind}: {rd.stat().st_size // 1024} KiB")
        for kind in kinds:
            asyncio.run(magikrun_boot(paths, configs[kind]))  # warm the caches
        bare: dict[GuestPython, list[float | None]] = {kind: [] for kind in kinds}
        ready: dict[GuestPython, list[float]] = {kind: [] for kind in kinds}
        uptime: dict[GuestPython, list[float]] = {kind: [] for kind in kinds}
        whole: dict[GuestPython, list[float]] = {kind: [] for kind in kinds}
        for index in range(args.runs):
            for kind in kinds if index % 2 == 0 else reversed(kinds):
                boot = (configs[kind], accel, kernel.vmlinux, bare_rd[kind], work)
                if index % 2:
                    bare[kind].append(bare_boot(*boot))
                one_ready, one_uptime, one_whole = asyncio.run(magikrun_boot(paths, configs[kind]))
                ready[kind].append(one_ready)
                uptime[kind].append(one_uptime)
                whole[kind].append(one_whole)
                if not index % 2:
                    bare[kind].append(bare_boot(*boot))
        for kind in kinds:
            median_bare = statistics.median(t for t in bare[kind] if t is not None)
            median_ready = statistics.median(ready[kind])
            print(f"-- vminit's Python {kind} (medians over {args.runs}, load {load()})")
            print(
                f"bare qemu boot to init (and exit)  {median_bare:6.2f} s"
                f"  ({bare[kind].count(None)} hung)"
            )
            print(f"magikrun boot to ready (ping)      {median_ready:6.2f} s")
            print(f"  guest uptime at ready            {statistics.median(uptime[kind]):6.2f} s")
            print(f"magikrun boot + ping + shutdown    {statistics.median(whole[kind]):6.2f} s")
            print(f"ratio magikrun ready / bare boot   {median_ready / median_bare:6.2f}x")
        if len(kinds) == 2:
            packed, shared = (statistics.median(ready[kind]) for kind in kinds)
            print(f"ratio ready packed / ready shared  {packed / shared:6.2f}x")
        micro = VmConfig(accel=accel, machine=Machine.MICROVM, python=config.python)
        base_rd = bare_rd[kinds[0]]
        variants = {
            "bare, bzImage instead of vmlinux": (config, bzimage, base_rd),
            "bare, SeaBIOS instead of qboot": (
                VmConfig(accel=accel, firmware=None, python=config.python),
                kernel.vmlinux,
                base_rd,
            ),
            "bare, cmdline plus boot-saver flags": (
                VmConfig(
                    accel=accel, cmdline=DEFAULT_CMDLINE + EXTRA_BOOT_FLAGS, python=config.python
                ),
                kernel.vmlinux,
                base_rd,
            ),
        }
        if args.microvm:
            variants["bare, microvm instead of q35"] = (
                micro,
                kernel.vmlinux,
                bare_initramfs(paths, micro, work / "bare-microvm.cpio"),
            )
        for name, (variant, image, rd) in variants.items() if args.variant_runs else ():
            times: list[float | None] = []
            paired: list[float | None] = []
            for _ in range(args.variant_runs):  # each paired with a default bare boot
                times.append(bare_boot(variant, accel, image, rd, work))
                paired.append(bare_boot(config, accel, kernel.vmlinux, base_rd, work))
            done = [t for t in times if t is not None]
            base = statistics.median(t for t in paired if t is not None)
            median = f"{statistics.median(done):6.2f} s" if done else "   -    "
            print(
                f"{name:34s} median {median}  over {len(times)} ({times.count(None)} hung)"
                f"  vs default bare {base:.2f} s in the same runs"
            )
        print(f"boot-saver flags tried: {' '.join(EXTRA_BOOT_FLAGS)}; load {load()} at the end")


if __name__ == "__main__":
    main()
