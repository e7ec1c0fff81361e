"""QEMU microVMs whose PID 1 is :mod:`magikrun.vminit`, driven over a control channel.

A VM gets its own directory under ``paths.run/vms`` (mode 0700) holding its private
initramfs (the shared one plus its token and configuration) and its console log.
The control channel is a virtio-serial port whose host end is one half of a
``socketpair`` handed to QEMU as an fd: there is no socket file anyone else could
connect to, and the connection exists before the guest runs. QMP goes the same way.
Every boot has a deadline; a VM that dies or misses it is killed and reported with
the tail of its console, and everything it had on the host is removed on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .. import _process
from ..errors import (
    BackendFailed,
    InvalidArgument,
    LimitExceeded,
    RuntimeUnavailable,
    VmBootFailed,
    VmControlError,
)
from ..platform import Paths, Platform
from ..platform._limits import MAX_VCPUS, MAX_VM_MEMORY_MIB, VM_BOOT_TIMEOUT
from ..vminit import (
    PORT_NAME,
    ControlClient,
    GuestConfig,
    GuestInfra,
    GuestProcess,
    early_init_script,
)
from ._guestkernel import GuestKernel, find_guest_kernel
from ._guestpython import PythonPack, pack_python
from ._initramfs import build_initramfs, write_vm_initramfs
from ._tap import open_tap
from ._trace import trace

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

__all__ = [
    "DEFAULT_CMDLINE",
    "EXTRA_BOOT_FLAGS",
    "GuestPython",
    "Machine",
    "MicroVm",
    "TapNetwork",
    "UserNetwork",
    "VmConfig",
    "boot_files",
]

QEMU = "qemu-system-x86_64"
_PACKAGE = str(Path(__file__).resolve().parent.parent)
DEFAULT_CMDLINE = ("console=ttyS0", "rdinit=/init", "panic=-1", "quiet", "cryptomgr.notests")
"""Kernel arguments: serial console, our /init, reboot (so QEMU exits) on panic, quiet,
no self-tests of the kernel's crypto algorithms (``initcall_debug`` showed them taking
0.7 s of a 5.3 s boot to /init under TCG; /init ran at 3.4 s without them).
``bench/vm_boot.py`` found the usual boot savers (``mitigations=off tsc=reliable
no_timer_check i8042.* random.trust_cpu=on``) no faster under TCG here (paired medians
6.29 vs 6.26 s in one run, 6.14 vs 7.92 s in another), so they are left out."""
EXTRA_BOOT_FLAGS = (
    "mitigations=off",
    "tsc=reliable",
    "no_timer_check",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "random.trust_cpu=on",
)
"""Flags that speed up boots elsewhere; kept for ``bench/vm_boot.py`` to compare."""
QBOOT = "qboot.rom"
"""QEMU's minimal firmware (in its data directory): it only loads the kernel, where
SeaBIOS (q35's default) also runs the NIC's iPXE option ROM. Bare boots to init with a
NIC under TCG, interleaved: median 3.72 s against 4.12 s (5 pairs, load 0.8); without
a NIC no clear difference (3.22/3.78 against 3.06/3.08 s). ``bench/vm_boot.py`` times
SeaBIOS as a variant."""
_CONSOLE_TAIL = 2048
_EXIT_WAIT = 5.0


class Machine(enum.StrEnum):
    """QEMU machine type. q35 is the default: ``microvm`` hangs early in ~8% of TCG boots."""

    Q35 = "q35"
    MICROVM = "microvm"


class GuestPython(enum.StrEnum):
    """Where vminit's interpreter comes from.

    ``packed``: the interpreter, its shared objects and the modules vminit imports in
    the initramfs (see :mod:`._guestpython`). ``shared``: the host's, read over 9p.
    """

    PACKED = "packed"
    SHARED = "shared"


@dataclass(frozen=True, slots=True, kw_only=True)
class UserNetwork:
    """QEMU user-mode networking; ``host_forwards`` are (host port, guest port) TCP pairs.

    With an ``address`` (``IP/PREFIX``), vminit sets it on the guest's eth0 and routes
    through ``gateway``; without, the guest's processes configure eth0 themselves.
    """

    host_forwards: tuple[tuple[int, int], ...] = ()
    address: str | None = None
    gateway: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TapNetwork:
    """The NIC is a tap in the pod's network namespace, joined to its CNI ``eth0``.

    See :mod:`magikrun.runtime._tap`; the guest sets ``address`` (``IP/PREFIX``) on its
    eth0 and routes through ``gateway`` (the bridge's address).
    """

    netns: str
    mac: str
    address: str
    gateway: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VmConfig:
    """How to build and boot one VM."""

    vcpus: int = 1
    memory_mib: int = 512
    machine: Machine = Machine.Q35
    accel: str | None = None
    """``kvm`` or ``tcg``; None picks kvm where ``Platform.detect()`` says a stock guest runs."""
    processes: tuple[GuestProcess, ...] = ()
    network: UserNetwork | TapNetwork | None = None
    boot_timeout: float = VM_BOOT_TIMEOUT
    cmdline: tuple[str, ...] = DEFAULT_CMDLINE
    never_ready: bool = False
    """Test-only: the guest's init never reports ready."""
    shares: tuple[tuple[str, str], ...] = ()
    """Writable host directories shared at the same path in the guest ((tag, path) pairs)."""
    read_only_shares: tuple[tuple[str, str], ...] = ()
    """Host directories shared read-only at the same path ((tag, path) pairs)."""
    init: tuple[GuestProcess, ...] = ()
    """Run one by one, each to a zero exit, before ``processes`` (init containers)."""
    infra: GuestInfra | None = None
    """The pod's infra program, started before anything else."""
    setup: tuple[tuple[str, ...], ...] = ()
    """Commands the guest runs before its processes (after the network's configuration)."""
    extra_args: tuple[str, ...] = field(default=())
    python: GuestPython = GuestPython.PACKED
    """Where vminit's interpreter comes from: packed into the initramfs, or the host's."""
    firmware: str | None = QBOOT
    """The q35 firmware (``-bios``); None for QEMU's default. microvm brings its own."""

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise LimitExceeded(f"{self.vcpus} vCPUs is outside 1..{MAX_VCPUS}", vcpus=self.vcpus)
        if not 64 <= self.memory_mib <= MAX_VM_MEMORY_MIB:
            raise LimitExceeded(
                f"{self.memory_mib} MiB of VM memory is outside 64..{MAX_VM_MEMORY_MIB}",
                memory_mib=self.memory_mib,
            )
        if self.accel not in (None, "kvm", "tcg"):
            raise InvalidArgument(f"unknown accelerator {self.accel!r}", hint="use kvm or tcg")


def _devices(machine: Machine) -> tuple[str, str]:
    """The virtio-serial and virtio-9p device models for ``machine`` (PCI or MMIO)."""
    if machine is Machine.MICROVM:
        return "virtio-serial-device", "virtio-9p-device"
    return "virtio-serial-pci", "virtio-9p-pci"


_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr")


def host_shares(
    python: GuestPython = GuestPython.PACKED,
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """What the guest sees of the host: (9p tag, directory) shares and top-level links.

    ``/usr`` (and ``/bin``, ``/lib``... where they are directories rather than links
    into it), read-only, for crun and what it loads; with the host's interpreter
    (``SHARED``), the Python installation and the magikrun package as well. Nothing of
    ``/etc``, ``/root``, ``/home`` or magikrun's state. A packed guest does without the
    two (each share is a device to probe and a mount for /init: the guest reached
    vminit 0.2-0.7 s sooner without them, three interleaved pairs); a pod's infra
    program gets them from :func:`python_shares`.
    """
    directories: list[str] = []
    links: list[tuple[str, str]] = []
    for name in _TOP_LEVEL:
        path = Path("/") / name
        if path.is_symlink():
            links.append((name, os.readlink(path)))
        elif path.is_dir():
            directories.append(str(path))
    if python is GuestPython.SHARED:
        for extra in _interpreter_dirs():
            if not _covered(extra, directories):
                directories.append(extra)
    shares = tuple((f"magikrun.{index}", path) for index, path in enumerate(directories))
    return shares, tuple(links)


def _interpreter_dirs() -> tuple[str, str]:
    """This process's Python installation and the magikrun package it imports."""
    return os.path.realpath(sys.base_prefix), _PACKAGE


def _covered(path: str, directories: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in directories)


def python_shares(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Directories beyond a packed guest's :func:`host_shares` it needs to run this Python
    as it runs here: its installation, the magikrun package, its environment (a venv's
    ``site-packages``, with the ``dist-info`` files ``importlib.metadata`` reads entry
    points from) and ``extra`` directories."""
    wanted: list[str] = [d for _, d in host_shares()[0]]
    found: list[str] = []
    for path in (*_interpreter_dirs(), sys.prefix, *extra):
        if not _covered(path, wanted):
            wanted.append(path)
            found.append(path)
    return tuple(found)


def guest_init(python: PythonPack | None = None) -> bytes:
    """The guest's ``/init`` for this host's shares and ``python`` (packed), or the
    host's interpreter over 9p."""
    shares, links = host_shares(GuestPython.SHARED if python is None else GuestPython.PACKED)
    if python is None:
        return early_init_script(os.path.realpath(sys.executable), _PACKAGE, shares, links)
    return early_init_script(python.argv, python.package, shares, links)


def boot_files(paths: Paths, config: VmConfig) -> tuple[GuestKernel, tuple[Path, ...]]:
    """The kernel and the shared initramfs archives (in order) ``config``'s VM boots,
    built or taken from the cache."""
    kernel = find_guest_kernel(paths)
    pack = None
    if config.python is GuestPython.PACKED:
        pack = pack_python(paths, Path(_PACKAGE))
    init = guest_init(pack)
    base = build_initramfs(paths, kernel, init, modules=guest_modules(config))
    return kernel, (base,) if pack is None else (base, pack.archive)


def qemu_argv(
    config: VmConfig,
    accel: str,
    vmlinux: Path,
    initramfs: Path,
    console: Path,
    ctl_fd: int,
    qmp_fd: int,
    tap_fd: int | None = None,
) -> list[str]:
    """The QEMU command line (the VM's secrets are in the initramfs, never here).

    ``tap_fd`` is the open tap of a :class:`TapNetwork` (see :func:`open_tap`).
    """
    serial_dev, ninep_dev = _devices(config.machine)
    machine = "microvm,acpi=on" if config.machine is Machine.MICROVM else "q35"
    argv = [
        QEMU,
        "-machine", f"{machine},accel={accel}",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(config.vcpus),
        "-m", str(config.memory_mib),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(vmlinux),
        "-initrd", str(initramfs),
        "-append", " ".join(config.cmdline),
        "-chardev", f"file,id=console,path={console}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=ctl,fd={ctl_fd}",
        "-device", serial_dev,
        "-device", f"virtserialport,chardev=ctl,name={PORT_NAME}",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if config.firmware is not None and config.machine is Machine.Q35:
        argv += ["-bios", config.firmware]
    read_only = "security_model=none,readonly=on,multidevs=remap"
    for prefix, shares, model in (
        ("fs", host_shares(config.python)[0], read_only),
        ("pod", config.shares, "security_model=passthrough"),
        ("ro", config.read_only_shares, read_only),
    ):
        for index, (tag, path) in enumerate(shares):
            escaped = path.replace(",", ",,")
            argv += [
                "-fsdev",
                f"local,id={prefix}{index},path={escaped},{model}",
                "-device",
                f"{ninep_dev},fsdev={prefix}{index},mount_tag={tag}",
            ]
    nic = "virtio-net-device" if config.machine is Machine.MICROVM else "virtio-net-pci"
    if isinstance(config.network, TapNetwork):
        if tap_fd is None:
            raise InvalidArgument("a tap network needs the tap's fd", hint="open it with open_tap")
        argv += [
            "-netdev", f"tap,id=net0,fd={tap_fd}",
            "-device", f"{nic},netdev=net0,mac={config.network.mac}",
        ]  # fmt: skip
    elif config.network is not None:
        forwards = "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
            for host, guest in config.network.host_forwards
        )
        argv += ["-netdev", f"user,id=net0{forwards}", "-device", f"{nic},netdev=net0"]
    return argv + list(config.extra_args)


def guest_modules(config: VmConfig) -> tuple[str, ...]:
    """The kernel modules ``config``'s guest loads: no more, since each costs boot time."""
    transport = "virtio_mmio" if config.machine is Machine.MICROVM else "virtio_pci"
    network = ("virtio_net",) if config.network is not None else ()
    return (transport, "virtio_console", "9pnet_virtio", "9p", *network)


def choose_accel(paths: Paths) -> str:
    """``kvm`` where a stock guest runs under it, ``tcg`` where only emulation works."""
    verdict = Platform.detect(paths).hypervisor
    if verdict.kind == "kvm":
        return "kvm"
    if verdict.kind == "tcg-only":
        return "tcg"
    raise RuntimeUnavailable(f"no way to run a microVM here: {verdict.reason}")


class MicroVm:
    """One booted VM and its control client.

    Example::

        async with MicroVm(paths, VmConfig()) as vm:
            out = await vm.client.exec(["uname", "-r"])
    """

    def __init__(self, paths: Paths, config: VmConfig, *, directory: Path | None = None) -> None:
        self.paths = paths
        self.config = config
        self.id = secrets.token_hex(8)
        # An owner that records its own directory (a pod's keeper) puts the VM's files
        # inside it, so removing the owner's directory removes them even after a crash.
        self.directory = directory if directory is not None else paths.run / "vms" / self.id
        self.accel = ""
        self.ready: dict[str, Any] = {}
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: ControlClient | None = None
        self._qmp: QMPClient | None = None
        self._watch: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            raise InvalidArgument("the VM is not booted", hint="call boot() first", vm=self.id)
        return self._client

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    def console_tail(self) -> str:
        try:
            data = self.console_log.read_bytes()[-_CONSOLE_TAIL:]
        except OSError:
            return ""
        return data.decode(errors="replace")

    async def __aenter__(self) -> MicroVm:
        await self.boot()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def boot(self) -> None:
        """Launch QEMU and return once vminit has answered ``hello`` with our token.

        Raises :class:`~magikrun.errors.VmBootFailed` (after removing everything)
        when QEMU exits or the guest misses ``config.boot_timeout``.
        """
        if self._proc is not None:
            raise InvalidArgument("the VM was already booted", vm=self.id)
        if shutil.which(QEMU) is None:
            raise RuntimeUnavailable(
                f"{QEMU} is not installed", hint="apt-get install qemu-system-x86"
            )
        if self.config.accel is not None:
            self.accel = self.config.accel
        else:
            self.accel = await asyncio.to_thread(choose_accel, self.paths)
        try:
            await self._launch()
            await self._wait_ready()
        except BaseException as exc:
            await self._teardown(grace=0)
            if isinstance(exc, TimeoutError):
                raise VmBootFailed(
                    f"microVM {self.id} did not report ready within {self.config.boot_timeout} s "
                    f"and was killed; console:\n{self.console_tail()}",
                    vm=self.id,
                ) from exc
            raise

    async def _launch(self) -> None:
        trace("vm.launch")
        kernel, archives = await asyncio.to_thread(boot_files, self.paths, self.config)
        trace("vm.boot_files")
        self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700)
        token = secrets.token_urlsafe(32)
        guest = GuestConfig(
            token=token,
            processes=self.config.processes,
            never_ready=self.config.never_ready,
            mounts=self.config.shares,
            read_only_mounts=self.config.read_only_shares,
            setup=self.config.setup,
            address=None if self.config.network is None else self.config.network.address,
            gateway=None if self.config.network is None else self.config.network.gateway,
            init=self.config.init,
            infra=self.config.infra,
        )
        initramfs = self.directory / "initramfs.cpio"
        await asyncio.to_thread(
            write_vm_initramfs, archives, initramfs, {"config.json": guest.to_json()}
        )
        trace("vm.initramfs")
        ctl_host, ctl_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_host, qmp_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [ctl_qemu.fileno(), qmp_qemu.fileno()]
        tap_fd = None
        try:
            if isinstance(self.config.network, TapNetwork):
                tap_fd = await open_tap(Path(self.config.network.netns))
                fds.append(tap_fd)
            trace("vm.tap")
            argv = qemu_argv(
                self.config, self.accel, kernel.vmlinux, initramfs, self.console_log,
                ctl_qemu.fileno(), qmp_qemu.fileno(), tap_fd,
            )  # fmt: skip
            with (self.directory / "qemu.log").open("wb") as log:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    close_fds=True,
                    pass_fds=fds,
                    start_new_session=True,
                )
        except BaseException:
            ctl_host.close()
            qmp_host.close()
            raise
        finally:
            ctl_qemu.close()
            qmp_qemu.close()
            if tap_fd is not None:
                os.close(tap_fd)  # QEMU's copy keeps the tap; it goes when QEMU does
        trace("vm.qemu_started")
        self._watch = asyncio.ensure_future(self._watch_exit(self._proc))
        self._client = await ControlClient.open(ctl_host, token)
        await self._open_qmp(qmp_host)
        trace("vm.qmp")

    async def _open_qmp(self, sock: socket.socket) -> None:
        from qemu.qmp import QMPClient, QMPError

        self._qmp = QMPClient(f"magikrun-{self.id}")
        try:
            await self._qmp.connect(sock)
        except QMPError as exc:
            raise await self._died("its QMP handshake failed") from exc

    async def _died(self, what: str) -> VmBootFailed:
        """The error for a VM that ended before it was ready, once QEMU has exited."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_WAIT):
                await self._exited.wait()
        return VmBootFailed(
            f"microVM {self.id} failed before it was ready ({what}; QEMU status "
            f"{self.returncode}); console:\n{self.console_tail()}\nqemu: {self._qemu_log()}",
            vm=self.id,
        )

    async def _watch_exit(self, proc: subprocess.Popen[bytes]) -> None:
        await _process.wait_exit(proc.pid)
        self.returncode = proc.wait()
        self._exited.set()

    async def _wait_ready(self) -> None:
        client = self.client
        exited = asyncio.ensure_future(self._exited.wait())
        ready = asyncio.ensure_future(client.wait_ready())
        try:
            async with asyncio.timeout(self.config.boot_timeout):
                await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not ready.done():
                ready.cancel()
        if ready.done() and ready.exception() is None:
            self.ready = ready.result()
            now = time.monotonic()
            uptime = float(self.ready.get("uptime", 0.0))
            for step, at in self.ready.get("marks", {}).items():
                trace(f"guest.{step}", now - uptime + float(at))
            trace("vm.ready_received", now)
            await client.hello()
            return
        raise await self._died("the control channel closed")

    def _qemu_log(self) -> str:
        try:
            return (self.directory / "qemu.log").read_text(errors="replace")[-_CONSOLE_TAIL:]
        except OSError:
            return ""

    async def add_host_forward(self, protocol: str, host_port: int, guest_port: int) -> None:
        """Forward ``127.0.0.1:host_port`` (tcp or udp) to the guest, on user-mode networking.

        The forward lives in QEMU and goes with it.
        """
        if not isinstance(self.config.network, UserNetwork):
            raise InvalidArgument(
                "host forwards through QEMU need user-mode networking", vm=self.id
            )
        if protocol not in ("tcp", "udp"):
            raise InvalidArgument(f"unknown protocol {protocol!r}", hint="use tcp or udp")
        if self._qmp is None or not self.alive:
            raise VmControlError("the VM is not running", vm=self.id)
        rule = f"{protocol}:127.0.0.1:{host_port}-:{guest_port}"
        said = await self._qmp.execute(
            "human-monitor-command", {"command-line": f"hostfwd_add net0 {rule}"}
        )
        if said:
            raise BackendFailed(
                f"QEMU did not add host forward {rule}: {str(said).strip()}",
                hint="the host port may be taken; pick another",
                vm=self.id,
            )

    async def wait(self) -> int:
        """Wait until QEMU exits; its exit status."""
        await self._exited.wait()
        return self.returncode if self.returncode is not None else -1

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop the guest's processes within ``grace``, power it off, remove everything.

        Idempotent; falls back to ending QEMU from the host when the guest does not
        answer or does not power off.
        """
        await self._teardown(grace)

    async def kill(self) -> None:
        """End QEMU now (no guest shutdown) and remove everything."""
        await self._teardown(grace=0)

    async def _teardown(self, grace: float) -> None:
        async def run() -> None:
            if self._client is not None and grace > 0 and self.alive:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(grace + _EXIT_WAIT):
                        await self._client.stop(grace)
                        await self._exited.wait()
            if self._qmp is not None:
                if self.alive:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await self._qmp.execute("quit")
                with contextlib.suppress(Exception):
                    await self._qmp.disconnect()
                self._qmp = None
            if self._proc is not None:
                await _process.terminate(self._proc, _EXIT_WAIT)
            if self._watch is not None:
                await self._watch
            if self._client is not None:
                await self._client.close()
                self._client = None
            shutil.rmtree(self.directory, ignore_errors=True)

        task = asyncio.ensure_future(run())
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        task.result()
