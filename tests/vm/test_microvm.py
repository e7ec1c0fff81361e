"""Booted microVMs under the real QEMU (TCG here, KVM where a stock guest runs)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import pytest

from magikrun.errors import VmBootFailed, VmControlError
from magikrun.platform import Paths
from magikrun.platform._limits import VM_CONTROL_MAX_FRAME
from magikrun.runtime._guestkernel import find_guest_kernel
from magikrun.runtime._guestpython import GUEST_PREFIX
from magikrun.runtime._qemu import GuestPython, MicroVm, VmConfig
from magikrun.vminit import GuestProcess

from .conftest import SLEEPER, WEB_PORT, needs_vm

pytestmark = [pytest.mark.slow, needs_vm]
shared = pytest.mark.asyncio(loop_scope="module")


def _qemu_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _assert_gone(vm: MicroVm, pid: int | None) -> None:
    assert not _qemu_alive(pid)
    assert not vm.directory.exists()


@shared
async def test_ready_and_ping(shared_vm: MicroVm, vm_root: Paths) -> None:
    kernel = find_guest_kernel(vm_root)
    assert shared_vm.ready["kernel"] == kernel.version
    answer = await shared_vm.client.ping()
    assert answer["kernel"] == kernel.version
    assert answer["uptime"] > 0


@shared
async def test_exec_output_and_exit_codes(shared_vm: MicroVm, vm_root: Paths) -> None:
    out = await shared_vm.client.exec(["uname", "-r"])
    assert out.exit_code == 0
    assert out.stdout.decode().strip() == find_guest_kernel(vm_root).version
    failed = await shared_vm.client.exec(["sh", "-c", "echo bad >&2; exit 42"])
    assert (failed.exit_code, failed.stderr, failed.stdout) == (42, b"bad\n", b"")
    env = await shared_vm.client.exec(["sh", "-c", 'echo "$X:$(pwd)"'], env={"X": "y"}, cwd="/tmp")
    assert env.stdout == b"y:/tmp\n"
    # PID 1 of the guest is vminit (the host's Python), not the host's init
    comm = await shared_vm.client.exec(["cat", "/proc/1/cmdline"])
    assert b"magikrun.vminit" in comm.stdout


@shared
async def test_started_answers_once_the_pid_file_exists(shared_vm: MicroVm) -> None:
    client = shared_vm.client
    waiting = asyncio.ensure_future(client.started({"sleeper": "/tmp/sleeper.pid"}))
    await client.ping()  # answered in order: the guest has read the request by now
    assert not waiting.done()
    await client.exec(["touch", "/tmp/sleeper.pid"])
    await asyncio.wait_for(waiting, 30)
    await client.started({"ticker": "/tmp/never"})  # it ended: that counts as started
    with pytest.raises(VmControlError, match="no process 'nobody'"):
        await client.started({"nobody": "/tmp/x"})


@shared
async def test_vminit_runs_on_the_packed_interpreter(shared_vm: MicroVm) -> None:
    comm = await shared_vm.client.exec(["cat", "/proc/1/cmdline"])
    loader, _, _, python = comm.stdout.decode().split("\0")[:4]
    assert loader.startswith(f"{GUEST_PREFIX}/lib/ld-")
    assert python.startswith(f"{GUEST_PREFIX}/bin/python")
    maps = await shared_vm.client.exec(["cat", "/proc/1/maps"])
    files = {line.split()[-1] for line in maps.stdout.decode().splitlines() if "/" in line}
    assert files and all(f.startswith(GUEST_PREFIX) for f in files), files


async def test_vm_boots_with_the_hosts_python_over_9p(paths: Paths) -> None:
    vm = MicroVm(paths, VmConfig(python=GuestPython.SHARED))
    await vm.boot()
    try:
        comm = await vm.client.exec(["cat", "/proc/1/cmdline"])
        assert comm.stdout.split(b"\0")[0] == os.path.realpath(sys.executable).encode()
    finally:
        await vm.shutdown(grace=0)
    _assert_gone(vm, vm.pid)


@shared
async def test_exec_timeout_and_missing_command(shared_vm: MicroVm) -> None:
    slow = await shared_vm.client.exec(["sleep", "100"], timeout=0.5)
    assert slow.timed_out
    assert slow.exit_code == 128 + signal.SIGKILL
    with pytest.raises(VmControlError, match="no-such-command"):
        await shared_vm.client.exec(["no-such-command"])


@shared
async def test_logs_and_status(shared_vm: MicroVm) -> None:
    followed = [record async for record in shared_vm.client.logs("ticker", follow=True)]
    assert [(r.stream, r.line) for r in followed if r.stream == "stdout"] == [
        ("stdout", "tick 1"),
        ("stdout", "tick 2"),
        ("stdout", "tick 3"),
    ]
    assert ("stderr", "oops") in [(r.stream, r.line) for r in followed]
    tail = [record.line async for record in shared_vm.client.logs("ticker", tail=1)]
    assert len(tail) == 1
    status = await shared_vm.client.status()
    assert status["ticker"]["state"] == "exited"
    assert status["ticker"]["exit_code"] == 7
    assert status["sleeper"]["state"] == "running"
    assert status["sleeper"]["exit_code"] is None
    env = await shared_vm.client.exec(["cat", f"/proc/{status['sleeper']['pid']}/environ"])
    assert b"GREETING=hi" in env.stdout
    with pytest.raises(VmControlError, match="no process"):
        [record async for record in shared_vm.client.logs("nobody")]


@shared
async def test_host_forward_reaches_the_guest(shared_vm: MicroVm, host_port: int) -> None:
    fetch = ["/bin/busybox", "wget", "-q", "-O", "-", f"http://127.0.0.1:{WEB_PORT}/hostname"]
    for _ in range(100):  # the server starts with the guest: wait until it listens
        inside = await shared_vm.client.exec(fetch)
        if inside.exit_code == 0:
            break
        await asyncio.sleep(0.2)
    expected = b"magikrun-vm\n"  # the guest's own /etc: the host's is not shared
    assert inside.stdout == expected
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{host_port}/hostname", timeout=30)
    assert response.content == expected


@shared
async def test_oversized_frame_is_refused(shared_vm: MicroVm) -> None:
    client = shared_vm.client
    await client.send_raw(b"x" * (VM_CONTROL_MAX_FRAME + 10) + b"\n")
    assert (await client.ping())["kernel"]
    assert client.rejections[-1] == f"frame over {VM_CONTROL_MAX_FRAME} bytes"


@shared
async def test_bad_token_is_refused(shared_vm: MicroVm) -> None:
    client = shared_vm.client
    with pytest.raises(VmControlError, match="bad token"):
        await client.request("hello", token="not-the-token")  # noqa: S106
    with pytest.raises(VmControlError, match="hello with the VM's token first"):
        await client.ping()
    await client.hello()
    assert (await client.ping())["kernel"]


async def test_stop_with_grace_ends_the_vm(paths: Paths) -> None:
    stubborn = GuestProcess(name="stubborn", argv=("sh", "-c", "trap '' TERM; sleep 1000"))
    vm = MicroVm(paths, VmConfig(processes=(stubborn, SLEEPER)))
    await vm.boot()
    pid = vm.pid
    assert _qemu_alive(pid)
    await vm.shutdown(grace=1)
    assert vm.returncode == 0  # the guest powered itself off (-no-reboot)
    _assert_gone(vm, pid)
    await vm.shutdown(grace=1)  # idempotent


async def test_qemu_killed_from_outside_is_detected(paths: Paths) -> None:
    vm = MicroVm(paths, VmConfig())
    await vm.boot()
    pid = vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert await asyncio.wait_for(vm.wait(), 30) == -signal.SIGKILL
    assert not vm.alive
    with pytest.raises(VmControlError, match="closed"):
        await vm.client.ping()
    await vm.shutdown()
    _assert_gone(vm, pid)


async def test_guest_that_never_gets_ready_is_killed_at_the_deadline(paths: Paths) -> None:
    vm = MicroVm(paths, VmConfig(never_ready=True, boot_timeout=6))
    with pytest.raises(VmBootFailed, match="did not report ready within 6") as caught:
        await vm.boot()
    assert "console" in str(caught.value)
    _assert_gone(vm, vm.pid)
    assert list((paths.run / "vms").iterdir()) == []


async def test_qemu_that_cannot_start_is_reported(paths: Paths) -> None:
    vm = MicroVm(paths, VmConfig(extra_args=("-device", "no-such-device")))
    with pytest.raises(
        VmBootFailed, match=r"failed before it was ready .* QEMU status 1"
    ) as caught:
        await vm.boot()
    assert "no-such-device" in str(caught.value)
    _assert_gone(vm, vm.pid)


async def test_missing_firmware_is_reported(paths: Paths) -> None:
    vm = MicroVm(paths, VmConfig(firmware="no-such-firmware.rom"))
    with pytest.raises(VmBootFailed, match="QEMU status 1") as caught:
        await vm.boot()
    assert "no-such-firmware.rom" in str(caught.value)
    _assert_gone(vm, vm.pid)
