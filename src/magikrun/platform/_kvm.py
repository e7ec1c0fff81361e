"""A raw KVM probe: can ``/dev/kvm`` run a stock kernel's early boot at hardware speed?

``/dev/kvm`` opening and ``KVM_CREATE_VM`` succeeding prove little. A para-virtualised
KVM (``kvm_pvm``) gets a hand-written guest through every mode switch a stock kernel
makes, but by emulating each instruction (about a microsecond each, measured): the
Debian kernel's decompressor then takes minutes, which looks like a hang. So the probe
guest walks real mode -> protected mode -> long mode -> the kernel's virtual address
(0xffffffff80000000) and then runs two million instructions; hardware KVM does that in
about a millisecond.

KVM_RUN blocks for as long as the guest runs, so the probe runs in a child process
(``python -m magikrun.platform._kvm BUDGET``) that an interval timer stops, and that
the parent can kill. The child prints one JSON line, :class:`RawProbe`'s fields.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from types import FrameType

_KVM_CREATE_VM = 0xAE01
_KVM_GET_VCPU_MMAP_SIZE = 0xAE04
_KVM_GET_SUPPORTED_CPUID = 0xC008AE05
_KVM_CREATE_VCPU = 0xAE41
_KVM_SET_USER_MEMORY_REGION = 0x4020AE46
_KVM_SET_TSS_ADDR = 0xAE47
_KVM_RUN = 0xAE80
_KVM_SET_REGS = 0x4090AE82
_KVM_GET_SREGS = 0x8138AE83
_KVM_SET_SREGS = 0x4138AE84
_KVM_SET_CPUID2 = 0x4008AE90

_EXIT_IO = 2
_EXIT_HLT = 5
_EXIT_NAMES = {0: "unknown", 1: "exception", 8: "shutdown (triple fault)", 9: "entry failure"}
_EXIT_NAMES |= {17: "internal error (emulation failure)"}

_MEMORY = 0x10000
_CODE_AT = 0x1000
_TSS_AT = 0x7FFFD000
_CPUID_ENTRIES = 512
_SERIAL = 0x3F8

# GNU as source, linked at 0x1000 (the bytes below), one byte out to port 0x3f8 per stage:
#   .code16: cli; 'R'; lgdtl gdtr; cr0.PE=1; ljmpl $0x08,$pm32
#   .code32 pm32: ds=es=ss=0x10; 'P'; identity-map 2 MiB at 0 and at 0xffffffff80000000
#     (PML4 0x2000, PDPTs 0x3000/0x5000, PD 0x4000); cr3=0x2000; cr4.PAE=1;
#     EFER.LME=1 (rdmsr/wrmsr 0xc0000080); cr0.PG=1; ljmpl $0x18,$lm64
#   .code64 lm64: 'L'; movabs $(0xffffffff80000000+high),%rax; jmp *%rax
#   high: 'K'; mov $1000000,%ecx; 1: dec %rcx; jnz 1b; 'D'; hlt
#   gdt: null, code32 0x00cf9a000000ffff, data 0x00cf92000000ffff, code64 0x00af9a000000ffff
_GUEST = bytes.fromhex(
    "fabaf803b052ee660f0116d8100f20c06683c8010f22c066ea1f100000080066b810008ed88ec08ed0"
    "b050eec7050020000003300000c705f82f000003500000c7050030000003400000c705f05f00000340"
    "0000c7050040000083000000b8002000000f22d80f20e083c8200f22e0b9800000c00f320d00010000"
    "0f300f20c00d000000800f22c0ea8f100000180066baf803b04cee48b8a2100080ffffffffffe0b04b"
    "eeb940420f0048ffc975fbb044eef40f1f4400000000000000000000ffff0000009acf00ffff000000"
    "92cf00ffff0000009aaf001f00b8100000"
)

STAGES = {
    "R": "real mode",
    "P": "protected mode",
    "L": "long mode",
    "K": "the kernel's virtual address",
    "D": "two million instructions",
}
"""What the probe guest reports after each step, in order."""


@dataclass(frozen=True, slots=True)
class RawProbe:
    """What the probe guest got through, and how long its instruction loop took."""

    stages: str
    loop_seconds: float | None = None
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None and self.stages == "".join(STAGES)


class _Deadline(Exception):
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _Deadline


def _probe(budget: float) -> RawProbe:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
    fcntl.ioctl(vm, _KVM_SET_TSS_ADDR, _TSS_AT)
    memory = mmap.mmap(-1, _MEMORY, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory[_CODE_AT : _CODE_AT + len(_GUEST)] = _GUEST
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    region = struct.pack("=IIQQQ", 0, 0, 0, _MEMORY, address)
    fcntl.ioctl(vm, _KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0)
    # Without the guest CPUID, KVM refuses EFER.LME as a CPU without long mode would.
    cpuid = bytearray(8 + 40 * _CPUID_ENTRIES)
    struct.pack_into("=I", cpuid, 0, _CPUID_ENTRIES)
    fcntl.ioctl(kvm, _KVM_GET_SUPPORTED_CPUID, cpuid, True)
    fcntl.ioctl(vcpu, _KVM_SET_CPUID2, cpuid, True)
    run = mmap.mmap(vcpu, fcntl.ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE, 0))
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, _KVM_GET_SREGS, sregs, True)
    struct.pack_into("=QIH", sregs, 0, 0, 0xFFFF, 0)  # cs: base 0, selector 0
    fcntl.ioctl(vcpu, _KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    struct.pack_into("=Q", regs, 16 * 8, _CODE_AT)  # rip
    struct.pack_into("=Q", regs, 17 * 8, 0x2)  # rflags: the always-one bit
    fcntl.ioctl(vcpu, _KVM_SET_REGS, bytes(regs))

    stages = ""
    loop_started = 0.0
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        while True:
            fcntl.ioctl(vcpu, _KVM_RUN, 0)
            reason = struct.unpack_from("=I", run, 8)[0]
            if reason == _EXIT_HLT and stages == "".join(STAGES):
                return RawProbe(stages, time.monotonic() - loop_started)
            if reason != _EXIT_IO:
                name = _EXIT_NAMES.get(reason, f"exit reason {reason}")
                return RawProbe(stages, failure=f"KVM stopped the guest: {name}")
            direction, size, port, _count, offset = struct.unpack_from("=BBHIQ", run, 32)
            if direction != 1 or size != 1 or port != _SERIAL:
                return RawProbe(stages, failure=f"made unexpected port I/O on {port:#x}")
            stages += run[offset : offset + 1].decode("latin-1")
            if stages.endswith("K"):
                loop_started = time.monotonic()
    except _Deadline:
        return RawProbe(stages, failure=f"did not finish within {budget} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_raw_probe(budget: float) -> RawProbe:
    """Run the probe guest in a child process; it gets ``budget`` seconds of guest time."""
    argv = [sys.executable, "-m", "magikrun.platform._kvm", repr(budget)]
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=budget + 10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return RawProbe("", failure="the probe process did not finish and was killed")
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        return RawProbe(**json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        last = detail[-1] if detail else f"exit status {done.returncode}"
        return RawProbe("", failure=f"the probe process failed: {last}")


def _main() -> None:
    try:
        result = _probe(float(sys.argv[1]))
    except OSError as exc:
        result = RawProbe("", failure=f"KVM refused the probe VM: {exc.strerror}")
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main()
