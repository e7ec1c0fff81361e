"""The raw KVM probe: its guest is correct x86 (TCG runs it through), and its verdict agrees
with what QEMU does with the stock guest kernel under KVM."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time

import pytest

from magikrun.platform import KVM_PROBE_TIMEOUT, KVM_RAW_PROBE_BUDGET
from magikrun.platform._detect import _boot_banner, _find_guest_kernel
from magikrun.platform._kvm import _GUEST, STAGES, run_raw_probe

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")

# A boot sector that copies the probe guest from 0x7c20 to 0x1000 (where it is linked)
# and jumps there: cli; ds=es=0; si=0x7c20; di=0x1000; cx=0x1e0; cld; rep movsb; ljmp 0:0x1000
_LOADER = bytes.fromhex("fa31c08ed88ec0be207cbf0010b9e001fcf3a4ea00100000")


def _serial_until(argv: list[str], marker: bytes, deadline: float) -> bytes:
    """QEMU's serial output up to ``marker`` (or the deadline); QEMU is stopped after."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    output = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            end = time.monotonic() + deadline
            while marker not in output and (left := end - time.monotonic()) > 0:
                if selector.select(left):
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    output += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return output


@needs_qemu
def test_probe_guest_is_correct_x86_under_tcg(short_tmp: object) -> None:
    """If TCG (QEMU's x86 model) walks the guest through every stage, a KVM that does
    not has failed on valid code, not on a bug of the probe."""
    image = _LOADER + bytes(0x20 - len(_LOADER)) + _GUEST
    image += bytes(510 - len(image)) + b"\x55\xaa"
    disk = f"{short_tmp}/probe.img"
    with open(disk, "wb") as f:
        f.write(image)
    assert QEMU is not None
    argv = [QEMU, "-accel", "tcg", "-display", "none", "-monitor", "none", "-serial", "stdio"]
    argv += ["-drive", f"format=raw,file={disk}", "-no-reboot"]
    assert _serial_until(argv, b"RPLKD", 60).endswith("".join(STAGES).encode())


@needs_kvm
def test_raw_probe_reports_stages_in_order() -> None:
    probe = run_raw_probe(KVM_RAW_PROBE_BUDGET)
    assert "".join(STAGES).startswith(probe.stages)
    if probe.passed:
        assert probe.failure is None and probe.loop_seconds is not None
    else:
        assert probe.failure


@needs_kvm
@needs_qemu
@pytest.mark.slow
def test_raw_probe_agrees_with_a_stock_kernel_boot() -> None:
    """The claim the verdict rests on: where the raw probe fails, QEMU under KVM cannot
    boot the stock kernel either (and where it passes, it can)."""
    kernel = _find_guest_kernel()
    if kernel is None or not os.access(kernel, os.R_OK):
        pytest.skip("no readable guest kernel under /boot")
    assert QEMU is not None
    probe = run_raw_probe(KVM_RAW_PROBE_BUDGET)
    booted, detail = _boot_banner(QEMU, kernel, KVM_PROBE_TIMEOUT)
    assert booted == probe.passed, (probe, detail)
    assert detail
