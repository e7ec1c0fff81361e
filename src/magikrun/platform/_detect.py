"""What this machine can run: kernel features, cgroups, a hypervisor, WebAssembly.

Kernel facts come from ``/proc`` and ``/sys`` and cost microseconds. The hypervisor
verdict does not: ``/dev/kvm`` opening proves little (``kvm_pvm``, a para-virtualised
KVM, opens, creates VMs and gets a guest through every mode switch, but by emulating
each instruction, so a stock kernel seems to hang). The verdict takes a raw KVM probe
(:mod:`._kvm`, about a second where KVM emulates) and then, where that passes, a probe
boot of the guest kernel microVMs use under ``-accel kvm`` until its banner. It is
cached on disk, keyed by the host kernel, the boot and the tools probed.

Example::

    platform = Platform.detect()
    if platform.has_hypervisor():
        ...  # microVMs under KVM
    print(platform.oci_platform, sorted(platform.capabilities))
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import platform as _stdlib_platform
import re
import selectors
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import StorageError
from ._kvm import STAGES, run_raw_probe
from ._limits import KVM_PROBE_TIMEOUT, KVM_RAW_PROBE_BUDGET, TOOL_VERSION_TIMEOUT
from ._paths import Paths

__all__ = [
    "NAMESPACES",
    "Capability",
    "CgroupHierarchy",
    "CgroupMembership",
    "CgroupMode",
    "Cgroups",
    "Hypervisor",
    "HypervisorKind",
    "Mount",
    "Platform",
    "Tool",
    "find_tools",
    "hypervisor_status",
    "parse_cgroups",
    "parse_filesystems",
    "parse_mounts",
    "parse_proc_cgroup",
]

NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")
"""The namespace kinds magikrun's backends use, as named under /proc/self/ns."""

_CONTAINER_NAMESPACES = frozenset({"ipc", "mnt", "net", "pid", "uts"})

_V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "debug",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)

_OCI_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

_KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
_BANNER = b"Linux version "
_KVM_FAILURE = re.compile(rb"KVM internal error[^\r\n]*|failed to [^\r\n]*|error: [^\r\n]*")
_CACHE_NAME = "hypervisor.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE_MAX_BYTES = 64 * 1024
_OUTPUT_KEEP = 64 * 1024
_VERSION = re.compile(r"version\s+v?(\d[\w.+~:-]*)", re.IGNORECASE)


class Capability(StrEnum):
    """A tag for one thing this machine can do, as ``magikrun system info`` lists it."""

    NATIVE_CONTAINERS = "native-containers"
    CGROUPS_V1 = "cgroups-v1"
    CGROUPS_V2 = "cgroups-v2"
    SECCOMP = "seccomp"
    OVERLAYFS = "overlayfs"
    USER_NAMESPACES = "user-namespaces"
    HYPERVISOR = "hypervisor"
    EMULATOR = "emulator"
    WASM_RUNTIME = "wasm"


class HypervisorKind(StrEnum):
    """How microVMs can run: hardware-assisted, emulated only, or not at all."""

    KVM = "kvm"
    TCG_ONLY = "tcg-only"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Hypervisor:
    """The hypervisor verdict and the evidence for it, in words a person can act on."""

    kind: HypervisorKind
    reason: str


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/mounts."""

    source: str
    target: str
    fstype: str
    options: tuple[str, ...]


class CgroupMode(StrEnum):
    """Which cgroup hierarchies the host mounts."""

    V1 = "v1"
    V2 = "v2"
    HYBRID = "hybrid"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class CgroupHierarchy:
    """One mounted cgroup hierarchy and the controllers attached to it."""

    version: int
    mountpoint: str
    controllers: tuple[str, ...]
    name: str | None = None
    """A v1 named hierarchy (``name=systemd``), which has no controllers."""


@dataclass(frozen=True, slots=True)
class CgroupMembership:
    """One line of /proc/self/cgroup: where this process sits in one hierarchy."""

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


@dataclass(frozen=True, slots=True)
class Cgroups:
    """The host's cgroup layout, as crun and runc will meet it."""

    mode: CgroupMode
    hierarchies: tuple[CgroupHierarchy, ...]
    membership: tuple[CgroupMembership, ...] = ()

    @property
    def unified(self) -> CgroupHierarchy | None:
        """The cgroup2 hierarchy, if one is mounted."""
        return next((h for h in self.hierarchies if h.version == 2), None)

    @property
    def controllers(self) -> frozenset[str]:
        """Every controller available on any hierarchy."""
        return frozenset(c for h in self.hierarchies for c in h.controllers)

    @property
    def unified_holds_controllers(self) -> bool:
        """A hybrid host whose cgroup2 hierarchy holds controllers (crun 1.8 refuses these)."""
        unified = self.unified
        return self.mode is CgroupMode.HYBRID and unified is not None and bool(unified.controllers)


@dataclass(frozen=True, slots=True)
class Tool:
    """A backend program magikrun drives, where it is and which version it reports."""

    name: str
    path: str | None
    version: str | None


def parse_mounts(text: str) -> tuple[Mount, ...]:
    """Parse /proc/mounts (fields octal-escape spaces, tabs, newlines and backslashes)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        source, target, fstype, options = (_unescape(f) for f in fields[:4])
        mounts.append(Mount(source, target, fstype, tuple(options.split(","))))
    return tuple(mounts)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_cgroups(
    mounts: Iterable[Mount],
    unified_controllers: Mapping[str, str],
    proc_self_cgroup: str = "",
) -> Cgroups:
    """The cgroup layout from the mounts, each cgroup2 mount's ``cgroup.controllers`` text
    (keyed by mountpoint) and /proc/self/cgroup."""
    hierarchies: list[CgroupHierarchy] = []
    for mount in mounts:
        if mount.fstype == "cgroup2":
            text = unified_controllers.get(mount.target, "")
            hierarchies.append(CgroupHierarchy(2, mount.target, tuple(text.split())))
        elif mount.fstype == "cgroup":
            controllers = tuple(o for o in mount.options if o in _V1_CONTROLLERS)
            name = next((o[5:] for o in mount.options if o.startswith("name=")), None)
            hierarchies.append(CgroupHierarchy(1, mount.target, controllers, name))
    has_v1 = any(h.version == 1 for h in hierarchies)
    has_v2 = any(h.version == 2 for h in hierarchies)
    if has_v1 and has_v2:
        mode = CgroupMode.HYBRID
    elif has_v2:
        mode = CgroupMode.V2
    elif has_v1:
        mode = CgroupMode.V1
    else:
        mode = CgroupMode.NONE
    return Cgroups(mode, tuple(hierarchies), parse_proc_cgroup(proc_self_cgroup))


def parse_proc_cgroup(text: str) -> tuple[CgroupMembership, ...]:
    """Parse /proc/self/cgroup: ``ID:CONTROLLERS:PATH`` lines (``0::PATH`` is cgroup2)."""
    entries = []
    for line in text.splitlines():
        hierarchy_id, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2 and hierarchy_id.isdigit()):
            continue
        names = tuple(c for c in controllers.split(",") if c)
        entries.append(CgroupMembership(int(hierarchy_id), names, path))
    return tuple(entries)


def parse_filesystems(text: str) -> frozenset[str]:
    """The filesystem types of /proc/filesystems (``[nodev]<TAB>name`` lines)."""
    return frozenset(line.split()[-1] for line in text.splitlines() if line.strip())


@dataclass(frozen=True, slots=True)
class Platform:
    """What this machine is and can run. Get it with :meth:`Platform.detect`."""

    os: str
    arch: str
    variant: str | None
    kernel: str
    namespaces: frozenset[str]
    cgroups: Cgroups
    seccomp: bool
    overlayfs: bool
    user_namespaces: bool
    hypervisor: Hypervisor
    wasm: bool
    qemu: str | None
    """The qemu-system binary for this architecture, if installed."""
    guest_kernel: str | None
    """The newest /boot/vmlinuz-* (the stock kernel microVMs boot), if installed."""

    @classmethod
    def detect(cls, paths: Paths | None = None) -> Platform:
        """Detect once per process; the hypervisor verdict is cached under ``paths.cache``.

        Parameters:
            paths: the magikrun root whose cache holds the hypervisor verdict
                (default: ``Paths.resolve()``). Only the first call in a process reads it.
        """
        global _detected
        with _detect_lock:
            if _detected is None:
                _detected = _detect((paths or Paths.resolve()).cache)
            return _detected

    @property
    def oci_platform(self) -> str:
        """The OCI platform string images are selected by, e.g. ``linux/amd64``."""
        base = f"{self.os}/{self.arch}"
        return f"{base}/{self.variant}" if self.variant else base

    def supports_native_containers(self) -> bool:
        """Linux with the namespaces crun/runc need and at least one cgroup hierarchy."""
        return (
            self.os == "linux"
            and _CONTAINER_NAMESPACES <= self.namespaces
            and self.cgroups.mode is not CgroupMode.NONE
        )

    def has_hypervisor(self) -> bool:
        """True only when KVM really booted a stock guest kernel (not for TCG emulation)."""
        return self.hypervisor.kind is HypervisorKind.KVM

    @property
    def capabilities(self) -> frozenset[Capability]:
        """The capability tags of this machine."""
        tags = {
            Capability.NATIVE_CONTAINERS: self.supports_native_containers(),
            Capability.CGROUPS_V1: self.cgroups.mode in (CgroupMode.V1, CgroupMode.HYBRID),
            Capability.CGROUPS_V2: self.cgroups.mode in (CgroupMode.V2, CgroupMode.HYBRID),
            Capability.SECCOMP: self.seccomp,
            Capability.OVERLAYFS: self.overlayfs,
            Capability.USER_NAMESPACES: self.user_namespaces,
            Capability.HYPERVISOR: self.has_hypervisor(),
            Capability.EMULATOR: self.hypervisor.kind is not HypervisorKind.NONE,
            Capability.WASM_RUNTIME: self.wasm,
        }
        return frozenset(tag for tag, present in tags.items() if present)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form, as ``magikrun system info --json`` prints it."""
        return {
            "os": self.os,
            "arch": self.arch,
            "variant": self.variant,
            "oci_platform": self.oci_platform,
            "kernel": self.kernel,
            "capabilities": sorted(str(c) for c in self.capabilities),
            "namespaces": sorted(self.namespaces),
            "cgroups": {
                "mode": str(self.cgroups.mode),
                "unified_holds_controllers": self.cgroups.unified_holds_controllers,
                "hierarchies": [
                    {
                        "version": h.version,
                        "mountpoint": h.mountpoint,
                        "controllers": list(h.controllers),
                        "name": h.name,
                    }
                    for h in self.cgroups.hierarchies
                ],
            },
            "seccomp": self.seccomp,
            "overlayfs": self.overlayfs,
            "user_namespaces": self.user_namespaces,
            "hypervisor": {"kind": str(self.hypervisor.kind), "reason": self.hypervisor.reason},
            "wasm": self.wasm,
            "qemu": self.qemu,
            "guest_kernel": self.guest_kernel,
        }


_detected: Platform | None = None
_detect_lock = threading.Lock()


def _detect(cache_dir: Path) -> Platform:
    uname = os.uname()
    machine = _stdlib_platform.machine()
    arch = _OCI_ARCH.get(machine, machine)
    namespaces = frozenset(n for n in NAMESPACES if os.path.exists(f"/proc/self/ns/{n}"))
    mounts = parse_mounts(_read("/proc/mounts") or "")
    unified = {
        m.target: _read(os.path.join(m.target, "cgroup.controllers")) or ""
        for m in mounts
        if m.fstype == "cgroup2"
    }
    status = _read("/proc/self/status") or ""
    max_userns = (_read("/proc/sys/user/max_user_namespaces") or "0").strip()
    return Platform(
        os=uname.sysname.lower(),
        arch=arch,
        variant="v8" if arch == "arm64" else None,
        kernel=uname.release,
        namespaces=namespaces,
        cgroups=parse_cgroups(mounts, unified, _read("/proc/self/cgroup") or ""),
        seccomp=any(line.startswith("Seccomp:") for line in status.splitlines()),
        overlayfs="overlay" in parse_filesystems(_read("/proc/filesystems") or ""),
        user_namespaces="user" in namespaces and max_userns.isdigit() and int(max_userns) > 0,
        hypervisor=hypervisor_status(cache_dir),
        wasm=importlib.util.find_spec("wasmtime") is not None,
        qemu=_find_qemu(),
        guest_kernel=_find_guest_kernel(),
    )


def _read(path: str) -> str | None:
    """The text of a kernel file, or None where this kernel does not have it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _find_qemu() -> str | None:
    return shutil.which(f"qemu-system-{os.uname().machine}")


def _version_key(path: Path) -> tuple[tuple[int, int | str], ...]:
    parts = re.split(r"(\d+)", path.name.removeprefix("vmlinuz-"))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


def _find_guest_kernel() -> str | None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    return str(kernels[-1]) if kernels else None


def _kvm_module() -> str | None:
    return next((m for m in _KVM_MODULES if os.path.isdir(f"/sys/module/{m}")), None)


def _probe_key() -> dict[str, str | None]:
    """What the cached verdict depends on: the host kernel and boot, and the tools probed."""
    return {
        "kernel": os.uname().release,
        "boot_id": (_read("/proc/sys/kernel/random/boot_id") or "").strip(),
        "qemu": _find_qemu(),
        "guest_kernel": _find_guest_kernel(),
    }


def hypervisor_status(cache_dir: Path) -> Hypervisor:
    """The hypervisor verdict: from ``cache_dir`` if this boot was probed, else probed now."""
    key = _probe_key()
    cached = _read_cache(cache_dir, key)
    if cached is not None:
        return cached
    verdict = _probe(key["qemu"], key["guest_kernel"])
    _write_cache(cache_dir, key, verdict)
    return verdict


def _read_cache(cache_dir: Path, key: Mapping[str, str | None]) -> Hypervisor | None:
    """The cached verdict for ``key``; None when absent, stale or unreadable (re-probe)."""
    try:
        dir_fd = os.open(cache_dir, _DIR_FLAGS)
    except OSError:
        return None
    try:
        fd = os.open(_CACHE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            record = json.loads(f.read(_CACHE_MAX_BYTES))
        if record["key"] != dict(key):
            return None
        return Hypervisor(HypervisorKind(record["kind"]), str(record["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(dir_fd)


def _write_cache(cache_dir: Path, key: Mapping[str, str | None], verdict: Hypervisor) -> None:
    """Write temp-then-rename so that a concurrent reader sees the old or the new record."""
    data = json.dumps({"key": dict(key), "kind": verdict.kind, "reason": verdict.reason})
    tmp = f".{_CACHE_NAME}.{os.getpid()}.{threading.get_ident()}"
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = os.open(cache_dir, _DIR_FLAGS)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, _CACHE_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as exc:
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)
            except OSError as cleanup:
                exc.add_note(f"could not remove the temporary {cache_dir / tmp}: {cleanup}")
            raise
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageError(
            f"cannot cache the hypervisor probe in {cache_dir}: {exc.strerror}",
            hint="make the magikrun root writable or pass another --root",
            path=cache_dir,
        ) from exc


def _probe(qemu: str | None, guest_kernel: str | None) -> Hypervisor:
    if qemu is None:
        return Hypervisor(
            HypervisorKind.NONE,
            f"qemu-system-{os.uname().machine} is not installed (Debian: qemu-system-x86)",
        )
    module = _kvm_module()
    backed = f" (module {module})" if module else ""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Hypervisor(
            HypervisorKind.TCG_ONLY,
            "/dev/kvm does not exist (no KVM in this kernel, or not passed into this "
            "container); microVMs run under QEMU's TCG emulation",
        )
    except OSError as exc:
        return Hypervisor(
            HypervisorKind.TCG_ONLY,
            f"/dev/kvm cannot be opened ({exc.strerror}); microVMs run under TCG emulation. "
            "Give this user access to /dev/kvm (group kvm) to use KVM",
        )
    try:
        api = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    finally:
        os.close(fd)
    if api != _KVM_API_VERSION:
        return Hypervisor(
            HypervisorKind.TCG_ONLY,
            f"/dev/kvm{backed} reports KVM API {api}, not {_KVM_API_VERSION}; "
            "microVMs run under TCG emulation",
        )
    raw_note = ""
    if os.uname().machine == "x86_64":
        raw = run_raw_probe(KVM_RAW_PROBE_BUDGET)
        if not raw.passed:
            reached = STAGES[raw.stages[-1]] if raw.stages else "nothing"
            return Hypervisor(
                HypervisorKind.TCG_ONLY,
                f"/dev/kvm opens{backed} but cannot run a stock kernel's early boot at "
                "hardware speed: a probe guest going through real, protected and long mode "
                "to the kernel's address, then 2 million instructions (about a millisecond "
                f"on hardware KVM), reached {reached}, then {raw.failure}; "
                "microVMs run under TCG emulation",
            )
        raw_note = f"; 2 million probe instructions took {(raw.loop_seconds or 0) * 1e3:.1f} ms"
    if guest_kernel is None:
        return Hypervisor(
            HypervisorKind.KVM,
            f"/dev/kvm{backed} passed the raw probe{raw_note}; no guest kernel "
            "/boot/vmlinuz-* to boot-test (Debian: linux-image-amd64)",
        )
    booted, detail = _boot_banner(qemu, guest_kernel, KVM_PROBE_TIMEOUT)
    if booted:
        return Hypervisor(
            HypervisorKind.KVM,
            f"QEMU under KVM{backed} booted the stock kernel {guest_kernel} ({detail}){raw_note}",
        )
    return Hypervisor(
        HypervisorKind.TCG_ONLY,
        f"/dev/kvm opens{backed} but QEMU under KVM cannot boot the stock kernel "
        f"{guest_kernel}: {detail}; microVMs run under TCG emulation",
    )


def _boot_banner(qemu: str, kernel: str, timeout: float) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM until it prints its banner; (booted, what happened).

    q35 rather than microvm: its firmware path never hung in the boots we measured, so a
    failure here is KVM's, not the machine model's.
    """
    argv = [
        qemu,
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-m",
        "128",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        kernel,
        "-append",
        "console=ttyS0 panic=-1",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        close_fds=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    output = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while (left := started + timeout - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return False, f"QEMU exited with status {proc.wait()}: {_last_line(output)}"
                output = (output + chunk)[-_OUTPUT_KEEP:]
                if _BANNER in output:
                    return True, f"banner after {time.monotonic() - started:.1f} s"
                failure = _KVM_FAILURE.search(output)
                if failure:
                    return False, f"QEMU reported {failure.group().decode(errors='replace')!r}"
        return False, f"no kernel banner within {timeout:.0f} s (the guest hung)"
    finally:
        _stop(proc)


def _last_line(output: bytes) -> str:
    lines = output.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


_TOOLS = ("crun", "runc", "conmon")
_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def find_tools() -> tuple[Tool, ...]:
    """The backend programs magikrun can drive, with the versions they report.

    Runs each found program's ``--version`` (no shell, bounded time); a program that
    does not answer is listed with no version.
    """
    found: list[tuple[str, str | None]] = [(name, shutil.which(name)) for name in _TOOLS]
    found.append((f"qemu-system-{os.uname().machine}", _find_qemu()))
    virtiofsd = _VIRTIOFSD if os.access(_VIRTIOFSD, os.X_OK) else None
    found.append(("virtiofsd", virtiofsd))
    tools = [Tool(name, path, _tool_version(path) if path else None) for name, path in found]
    kernel = _find_guest_kernel()
    version = Path(kernel).name.removeprefix("vmlinuz-") if kernel else None
    tools.append(Tool("guest-kernel", kernel, version))
    return tuple(tools)


def _tool_version(path: str) -> str | None:
    try:
        done = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TOOL_VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(done.stdout.decode(errors="replace"))
    return match.group(1) if match else None
