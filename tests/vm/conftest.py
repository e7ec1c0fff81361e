"""MicroVM fixtures: skip where QEMU or a guest kernel is missing; a shared booted VM."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from magikrun.errors import RuntimeUnavailable
from magikrun.platform import Paths
from magikrun.runtime._guestkernel import BOOT_DIR, MODULES_DIR, _newest_kernel
from magikrun.runtime._initramfs import BUSYBOX
from magikrun.runtime._qemu import QEMU, MicroVm, UserNetwork, VmConfig
from magikrun.vminit import GuestProcess


def _missing() -> str | None:
    """Why microVMs cannot boot here, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    if not BUSYBOX.is_file():
        return "busybox-static is not installed"
    try:
        _newest_kernel(BOOT_DIR, MODULES_DIR)
    except RuntimeUnavailable as exc:
        return str(exc)
    return None


MISSING = _missing()
needs_vm = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

TICKER = GuestProcess(
    name="ticker",
    argv=("sh", "-c", 'for i in 1 2 3; do echo "tick $i"; done; echo oops >&2; exit 7'),
)
SLEEPER = GuestProcess(name="sleeper", argv=("sleep", "1000"), env={"GREETING": "hi"})
WEB_PORT = 8080
WEB = GuestProcess(
    name="web",
    argv=(
        "/bin/busybox",
        "sh",
        "-c",
        "B=/bin/busybox; $B ip link set lo up; $B ip addr add 10.0.2.15/24 dev eth0;"
        f" $B ip link set eth0 up; exec $B httpd -f -p {WEB_PORT} -h /etc",
    ),
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def host_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def vm_root(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return Paths.resolve(tmp_path_factory.mktemp("vm")).ensure()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_vm(vm_root: Paths, host_port: int) -> AsyncIterator[MicroVm]:
    """One VM for the read-only tests (each boot costs seconds under TCG)."""
    network = UserNetwork(host_forwards=((host_port, WEB_PORT),))
    vm = MicroVm(vm_root, VmConfig(processes=(TICKER, SLEEPER, WEB), network=network))
    await vm.boot()
    try:
        yield vm
    finally:
        await vm.shutdown(grace=2)
