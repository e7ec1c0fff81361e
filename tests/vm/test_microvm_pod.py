"""MicroVM pods under the real QEMU: crun in the guest, the keeper, rollback, leftovers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from magikrun.errors import BackendFailed, PodError, PodStartFailed
from magikrun.image import build_demo_images
from magikrun.platform import Paths
from magikrun.pod import PodPhase, PodSpec, PodStatus, open_pod_runtime, recover_pods
from magikrun.pod._microvm import MicroVmPodRuntime, vm_size

from ..pod._podkit import BUSYBOX, PodEnv, busybox, pod_yaml, unique
from .conftest import _free_port, needs_vm

pytestmark = [pytest.mark.slow, needs_vm]


def _processes(paths: Paths) -> list[str]:
    """QEMU and keeper processes of this root (their command lines name it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(paths.data) in cmdline and ("qemu" in cmdline or "keeper" in cmdline):
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def _leftovers(paths: Paths) -> dict[str, list[str]]:
    found = PodEnv(paths).leftovers()
    processes = _processes(paths)
    if processes:
        found["processes"] = processes
    vms = paths.run / "vms"
    if vms.is_dir() and any(vms.iterdir()):
        found["vms"] = [p.name for p in vms.iterdir()]
    return found


TWO = """\
  volumes: [{name: shared, emptyDir: {}}]
"""


def _two_containers(name: str, port: int) -> PodSpec:
    web = busybox(
        "web",
        'echo hello > /data/greeting; trap "echo bye; exit 3" TERM; '
        "httpd -p 8080 -h /data; echo web up; while true; do sleep 1; done",
        f"    ports: [{{containerPort: 8080, hostPort: {port}}}]\n"
        "    volumeMounts: [{name: shared, mountPath: /data}]\n",
    )
    side = busybox(
        "side",
        "echo side up; echo from-side >&2; sleep 1000",
        "    volumeMounts: [{name: shared, mountPath: /data}]\n",
    )
    return PodSpec.from_yaml(pod_yaml(name, web + side, TWO))


async def test_two_container_pod_exec_logs_hostport_stop_delete(paths: Paths) -> None:
    await build_demo_images(paths)
    port = _free_port()
    spec = _two_containers(unique("vm"), port)
    runtime = open_pod_runtime(paths, "microvm")
    assert isinstance(runtime, MicroVmPodRuntime)
    handle = await runtime.run_pod(spec)
    try:
        status = await runtime.pod_status(handle.id)
        assert status.runtime == "microvm"
        assert status.phase is PodPhase.RUNNING
        assert [c.state for c in status.containers] == ["running", "running"]
        assert status.message is not None and "accelerator tcg" in status.message
        assert "network bridge" in status.message
        assert status.ip is not None and status.ip == handle.ip
        assert ipaddress.ip_address(status.ip) in ipaddress.ip_network("10.89.0.0/16")

        shared = await runtime.exec(handle.id, "side", ["cat", "/data/greeting"])
        assert (shared.exit_code, shared.stdout) == (0, b"hello\n")
        own = await runtime.exec(handle.id, "web", ["sh", "-c", "echo $HOSTNAME; exit 4"])
        assert own.exit_code == 4 and own.stdout.strip() == spec.effective_hostname.encode()
        missing = await runtime.exec(handle.id, None, ["no-such-command"])
        assert missing.exit_code != 0

        async with httpx.AsyncClient() as client:
            for _ in range(200):  # httpd starts a moment after the container runs
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/greeting")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        assert response.text == "hello\n"

        lines = [(x.container, x.stream, x.text) async for x in runtime.logs(handle.id)]
        assert ("side", "stdout", "side up") in lines
        assert ("side", "stderr", "from-side") in lines
        tail = [x.text async for x in runtime.logs(handle.id, "side", tail=1)]
        assert tail == ["from-side"]
        with pytest.raises(PodError, match="running"):
            await runtime.delete_pod(handle.id)

        await runtime.stop_pod(handle.id, grace=5)
        stopped = await runtime.pod_status(handle.id)
        codes = {c.name: c.exit_code for c in stopped.containers}
        assert codes == {"web": 3, "side": 137}  # web traps TERM; side's sh ignores it
        assert stopped.phase is PodPhase.FAILED and "stopped" in (stopped.message or "")
        kept = [x.text async for x in runtime.logs(handle.id, "web")]
        assert kept[-1] == "bye"
        assert not _processes(paths)
    finally:
        await runtime.delete_pod(handle.id, force=True)
    assert _leftovers(paths) == {}


async def kill_qemu(runtime: MicroVmPodRuntime, pod_id: str) -> PodStatus:
    """SIGKILL the pod's QEMU from outside; the pod's status once it turned ``Failed``
    (or after 10 s)."""
    pid_file = runtime.paths.run / "pods" / pod_id / "vm" / "qemu.pid"
    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    for _ in range(100):
        if (await runtime.pod_status(pod_id)).phase is PodPhase.FAILED:
            break
        await asyncio.sleep(0.1)
    return await runtime.pod_status(pod_id)


async def test_qemu_killed_from_outside_fails_the_pod_and_delete_cleans(paths: Paths) -> None:
    await build_demo_images(paths)
    spec = PodSpec.from_yaml(pod_yaml(unique("vm"), busybox("app", "sleep 1000")))
    runtime = MicroVmPodRuntime(paths)
    handle = await runtime.run_pod(spec)
    status = await kill_qemu(runtime, handle.id)
    assert status.phase is PodPhase.FAILED
    assert "the VM is gone" in (status.message or "")
    with pytest.raises(BackendFailed, match="not running"):
        await runtime.exec(handle.id, None, ["true"])
    await runtime.delete_pod(handle.id)
    assert _leftovers(paths) == {}


async def test_guest_never_ready_is_killed_at_the_deadline(paths: Paths) -> None:
    await build_demo_images(paths)
    spec = PodSpec.from_yaml(pod_yaml(unique("vm"), busybox("app", "sleep 1000")))
    runtime = MicroVmPodRuntime(paths, boot_timeout=15.0, never_ready=True)
    with pytest.raises(PodStartFailed, match=r"step boot.*did not report ready within 15\.0 s"):
        await runtime.run_pod(spec)
    assert _leftovers(paths) == {}


async def test_failing_container_fails_the_pod_and_names_it(paths: Paths) -> None:
    """A container crun cannot start fails the pod (one that starts and then exits is
    a running pod that fails later, as natively)."""
    await build_demo_images(paths)
    bad = f"  - name: bad\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n"
    bad += "    command: [/no/such/program]\n"
    spec = PodSpec.from_yaml(pod_yaml(unique("vm"), busybox("good", "sleep 1000") + bad))
    with pytest.raises(PodStartFailed, match=r"bad exited 1: .*/no/such/program") as caught:
        await MicroVmPodRuntime(paths).run_pod(spec)
    assert caught.value.step == "boot"
    assert _leftovers(paths) == {}


async def test_bad_image_fails_before_boot(paths: Paths) -> None:
    await build_demo_images(paths)
    containers = busybox("ok", "true") + (
        "  - name: gone\n    image: magikrun.local/nothing:here\n    imagePullPolicy: Never\n"
    )
    spec = PodSpec.from_yaml(pod_yaml(unique("vm"), containers))
    with pytest.raises(PodStartFailed) as caught:
        await MicroVmPodRuntime(paths).run_pod(spec)
    assert (caught.value.step, caught.value.container) == ("pull", "gone")
    assert not (paths.run / "vms").exists() or not any((paths.run / "vms").iterdir())
    assert _leftovers(paths) == {}


def test_vm_size_sums_limits_within_bounds() -> None:
    limits = "    resources: {limits: {cpu: '1500m', memory: 300Mi}}\n"
    spec = PodSpec.from_yaml(
        pod_yaml("size", busybox("a", "true", limits) + busybox("b", "true", limits))
    )
    assert vm_size(spec) == (3, 600 + 256)
    plain = PodSpec.from_yaml(pod_yaml("plain", busybox("a", "true")))
    assert vm_size(plain) == (1, 128 + 256)
    assert BUSYBOX.startswith("magikrun.local/")


@pytest.mark.parametrize("step", ["pull", "bundle", "boot"])
async def test_fault_at_each_step_before_the_vm_leaves_nothing(paths: Paths, step: str) -> None:
    await build_demo_images(paths)

    def hook(label: str) -> None:
        if label == step:
            raise OSError(f"injected at {label}")

    spec = PodSpec.from_yaml(pod_yaml(unique("vm"), busybox("app", "sleep 1000")))
    with pytest.raises(PodStartFailed, match=f"step {step} failed: .*injected") as caught:
        await MicroVmPodRuntime(paths, fault_hook=hook).run_pod(spec)
    assert caught.value.step == step
    assert _leftovers(paths) == {}


async def test_restart_policy_is_applied_in_the_guest(paths: Paths) -> None:
    await build_demo_images(paths)
    command = (
        "if [ -f /data/once ]; then echo second; exec sleep 1000; fi; "
        "touch /data/once; echo first; exit 1"
    )
    container = busybox("app", command, "    volumeMounts: [{name: shared, mountPath: /data}]\n")
    spec = PodSpec.from_yaml(pod_yaml(unique("vm"), container, TWO, restart="OnFailure"))
    runtime = MicroVmPodRuntime(paths, restart_backoff=0.2)
    handle = await runtime.run_pod(spec)
    try:
        for _ in range(300):
            status = await runtime.pod_status(handle.id)
            if status.containers[0].state == "running" and status.containers[0].restart_count:
                break
            await asyncio.sleep(0.1)
        assert status.phase is PodPhase.RUNNING
        assert status.containers[0].restart_count == 1
        for _ in range(300):  # the restarted container writes a moment after it runs
            lines = [x.text async for x in runtime.logs(handle.id)]
            if len(lines) == 2:
                break
            await asyncio.sleep(0.1)
        assert lines == ["first", "second"]
        await runtime.stop_pod(handle.id, grace=0)
        stopped = (await runtime.pod_status(handle.id)).containers[0]
        assert (stopped.state, stopped.exit_code) == ("terminated", 137)
    finally:
        await runtime.delete_pod(handle.id, force=True)
    assert _leftovers(paths) == {}


async def _cli_pod(paths: Paths, tmp_path: Path) -> tuple[str, Path, dict[str, str], str]:
    """A one-container pod's name and manifest, and the env and console script that run
    ``magikrun`` on the test's root."""
    await build_demo_images(paths)
    name = unique("vm")
    manifest = tmp_path / "pod.yaml"
    manifest.write_bytes(pod_yaml(name, busybox("app", "sleep 1000")))
    env = {**os.environ, "MAGIKRUN_ROOT": str(paths.data)}
    return name, manifest, env, str(Path(sys.executable).parent / "magikrun")


async def test_creator_killed_during_boot_gc_ends_the_orphaned_qemu(
    paths: Paths, tmp_path: Path
) -> None:
    name, manifest, env, magikrun = await _cli_pod(paths, tmp_path)
    creator = subprocess.Popen(
        [magikrun, "pod", "run", "--runtime", "microvm", str(manifest)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        qemu_pid = paths.run / "pods" / f"default_{name}" / "vm" / "qemu.pid"
        for _ in range(600):
            if qemu_pid.exists() or creator.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert qemu_pid.exists(), "QEMU was not started"
    finally:
        creator.kill()
        creator.wait()
    assert _processes(paths)  # the keeper and QEMU outlive their creator
    assert await recover_pods(paths) == [f"default_{name}"]
    assert _leftovers(paths) == {}


async def test_cli_runs_a_microvm_pod_on_the_network_asked_for(
    paths: Paths, tmp_path: Path
) -> None:
    name, manifest, env, magikrun = await _cli_pod(paths, tmp_path)
    run = [magikrun, "--json", "pod", "run", "--runtime", "microvm", "--vm-network", "user"]
    ran = subprocess.run([*run, str(manifest)], env=env, capture_output=True, text=True)
    try:
        assert ran.returncode == 0, ran.stderr
        status = json.loads(ran.stdout)
        assert status["phase"] == "Running"
        assert status["message"].startswith("network user (requested),")
    finally:
        subprocess.run([magikrun, "pod", "rm", "--force", name], env=env, capture_output=True)
    assert _leftovers(paths) == {}
