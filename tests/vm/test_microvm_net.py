"""MicroVM pods on the CNI bridge: a tap in the pod's netns, pod IP, hostPort, fallback.

Each test has its own bridge and /24 (``PodEnv``), so the tests here never share
addresses with another root's pods; the default ``magikrun0`` is covered by
``test_microvm_pod.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from magikrun.errors import BackendFailed, InvalidArgument, PodNetworkError, PodStartFailed
from magikrun.image import build_demo_images
from magikrun.platform import Paths
from magikrun.pod import PodNetwork, PodPhase, PodSpec
from magikrun.pod._microvm import MicroVmPodRuntime
from magikrun.runtime._microvm import ask_one
from magikrun.runtime._qemu import TapNetwork, VmConfig, qemu_argv
from magikrun.runtime._tap import tap_unavailable_reason

from ..pod._podkit import PodEnv, busybox, pod_yaml, unique
from .conftest import _free_port, needs_vm
from .test_microvm_pod import _processes, kill_qemu

pytestmark = [pytest.mark.slow, needs_vm]

WEB = "echo hello > /tmp/greeting; httpd -p 8080 -h /tmp; echo web up; while true; do sleep 1; done"


@pytest.fixture
async def net(paths: Paths) -> AsyncIterator[PodEnv]:
    await build_demo_images(paths)
    env = PodEnv(paths)
    try:
        yield env
    finally:
        await env.cleanup()


def _iptables(pod_id: str) -> list[str]:
    saved = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return [line for line in saved.splitlines() if pod_id in line]


def _leftovers(env: PodEnv, pod_id: str) -> dict[str, list[str]]:
    found = env.leftovers()
    if _processes(env.paths):
        found["qemu"] = _processes(env.paths)
    if _iptables(pod_id):
        found["iptables"] = _iptables(pod_id)
    return found


def _web_pod(host_port: int) -> PodSpec:
    ports = (
        f"    ports: [{{containerPort: 8080, hostPort: {host_port}}}]\n"
        "    env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]\n"
    )
    return PodSpec.from_yaml(pod_yaml(unique("vn"), busybox("web", WEB, ports)))


async def _get(url: str) -> str:
    """The body at ``url``, retried while the guest's httpd comes up."""
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            try:
                return (await client.get(url, timeout=5.0)).text
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=2.0)
    except httpx.TransportError:
        return True
    return False


async def _serve_once_on(address: str) -> tuple[asyncio.Server, int]:
    """A host HTTP service on ``address`` that answers ``from-host``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nfrom-host")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, address, 0)
    return server, server.sockets[0].getsockname()[1]


async def test_bridge_pod_ip_hostport_gateway_peer_and_open_port(net: PodEnv) -> None:
    host_port, extra_port = _free_port(), _free_port()
    native = net.native()
    peer = await native.run_pod(
        PodSpec.from_yaml(pod_yaml(unique("nat"), busybox("web", WEB.replace("hello", "peer"))))
    )
    runtime = MicroVmPodRuntime(net.paths, pod_network=net.net)
    spec = _web_pod(host_port)
    handle = await runtime.run_pod(spec)
    vm_dir = net.paths.run / "pods" / handle.id / "vm"
    try:
        assert handle.ip is not None
        assert ipaddress.ip_address(handle.ip) in ipaddress.ip_network(net.subnet)
        status = await runtime.pod_status(handle.id)
        assert status.ip == handle.ip and status.phase is PodPhase.RUNNING
        assert status.message is not None and status.message.startswith("network bridge,")

        assert await _get(f"http://{handle.ip}:8080/greeting") == "hello\n"
        assert await _get(f"http://127.0.0.1:{host_port}/greeting") == "hello\n"

        environ = await runtime.exec(handle.id, None, ["cat", "/proc/1/environ"])
        assert f"POD_IP={handle.ip}".encode() in environ.stdout.split(b"\0")
        hosts = await runtime.exec(handle.id, None, ["cat", "/etc/hosts", "/etc/hostname"])
        assert f"{handle.ip}\t{spec.effective_hostname}" in hosts.stdout.decode()
        assert hosts.stdout.decode().endswith(f"{spec.effective_hostname}\n")

        gateway = str(ipaddress.ip_network(net.subnet)[1])
        server, port = await _serve_once_on(gateway)
        async with server:
            out = await runtime.exec(
                handle.id, None, ["wget", "-q", "-O-", f"http://{gateway}:{port}/"]
            )
        assert (out.exit_code, out.stdout) == (0, b"from-host")
        out = await runtime.exec(
            handle.id, None, ["wget", "-q", "-O-", f"http://{peer.ip}:8080/greeting"]
        )
        assert (out.exit_code, out.stdout) == (0, b"peer\n")

        request = {"op": "port", "protocol": "tcp", "host_port": extra_port, "container_port": 8080}
        assert await ask_one(vm_dir, request) == {"result": None}
        assert await _get(f"http://127.0.0.1:{extra_port}/greeting") == "hello\n"
        assert any(str(extra_port) in rule for rule in _iptables(handle.id))
        with pytest.raises(BackendFailed, match="already forwards"):
            await ask_one(vm_dir, request)
        with pytest.raises(BackendFailed, match="unknown protocol 'sctp'"):
            await ask_one(vm_dir, {**request, "protocol": "sctp"})
        with pytest.raises(BackendFailed, match=r"port 70000 is outside 1\.\.65535"):
            await ask_one(vm_dir, {**request, "host_port": 70000})
    finally:
        await runtime.delete_pod(handle.id, force=True)
        await native.delete_pod(peer.id, force=True)
    assert _refused(f"http://127.0.0.1:{extra_port}/greeting")
    assert _leftovers(net, handle.id) == {}


@pytest.mark.parametrize("step", ["netns", "network", "boot"])
async def test_fault_after_each_network_step_leaves_nothing(net: PodEnv, step: str) -> None:
    def hook(label: str) -> None:
        if label == step:
            raise OSError(f"injected at {label}")

    spec = _web_pod(_free_port())
    runtime = MicroVmPodRuntime(net.paths, pod_network=net.net, fault_hook=hook)
    with pytest.raises(PodStartFailed, match=f"step {step} failed: .*injected"):
        await runtime.run_pod(spec)
    assert _leftovers(net, spec.id) == {}
    assert not (net.paths.run / "netns" / spec.id).exists()


async def test_guest_never_ready_on_the_bridge_leaves_nothing(net: PodEnv) -> None:
    spec = _web_pod(_free_port())
    runtime = MicroVmPodRuntime(net.paths, pod_network=net.net, boot_timeout=15.0, never_ready=True)
    with pytest.raises(PodStartFailed, match=r"step boot.*did not report ready"):
        await runtime.run_pod(spec)
    assert _leftovers(net, spec.id) == {}


async def test_qemu_killed_pod_fails_and_delete_frees_netns_and_ip(net: PodEnv) -> None:
    spec = _web_pod(_free_port())
    runtime = MicroVmPodRuntime(net.paths, pod_network=net.net, network="bridge")
    handle = await runtime.run_pod(spec)
    status = await kill_qemu(runtime, handle.id)
    assert status.phase is PodPhase.FAILED and status.ip == handle.ip
    assert net.ipam() == [handle.ip]
    assert (net.paths.run / "netns" / handle.id).exists()
    await runtime.delete_pod(handle.id)
    assert _leftovers(net, handle.id) == {}


async def test_explicit_user_network_and_its_open_port(net: PodEnv) -> None:
    port = _free_port()
    runtime = MicroVmPodRuntime(net.paths, pod_network=net.net, network="user")
    handle = await runtime.run_pod(_web_pod(_free_port()))
    try:
        assert handle.ip is None
        status = await runtime.pod_status(handle.id)
        assert status.message is not None
        assert status.message.startswith("network user (requested),")
        vm_dir = net.paths.run / "pods" / handle.id / "vm"
        request = {"op": "port", "protocol": "tcp", "host_port": port, "container_port": 8080}
        assert await ask_one(vm_dir, request) == {"result": None}
        assert await _get(f"http://127.0.0.1:{port}/greeting") == "hello\n"
        with pytest.raises(BackendFailed, match="did not add host forward"):
            await ask_one(vm_dir, request)
    finally:
        await runtime.delete_pod(handle.id, force=True)
    assert _refused(f"http://127.0.0.1:{port}/greeting")
    assert _leftovers(net, handle.id) == {}


async def test_bridge_unavailable_falls_back_or_fails_before_boot(
    net: PodEnv, tmp_path: Path
) -> None:
    assert await tap_unavailable_reason() is None  # this machine has the bridge
    empty = tmp_path / "cni"
    empty.mkdir()
    crippled = PodNetwork(net.paths, bridge=net.bridge, subnet=net.subnet, plugin_dir=empty)
    fallback = MicroVmPodRuntime(net.paths, pod_network=crippled)
    assert await fallback._choose_network() == (
        f"user (CNI plugins missing from {empty}: loopback, host-local, bridge, portmap)"
    )
    spec = _web_pod(_free_port())
    strict = MicroVmPodRuntime(net.paths, pod_network=crippled, network="bridge")
    with pytest.raises(PodNetworkError, match="cannot be put on the bridge here: CNI plugins"):
        await strict.run_pod(spec)
    assert _leftovers(net, spec.id) == {}
    assert await MicroVmPodRuntime(net.paths, pod_network=net.net)._choose_network() == "bridge"


def test_tap_network_argv_hands_qemu_the_fd_and_the_mac() -> None:
    tap = TapNetwork(netns="/n", mac="02:00:0a:59:00:05", address="10.89.0.5/16", gateway="g")
    argv = qemu_argv(VmConfig(network=tap), "tcg", Path("k"), Path("i"), Path("c"), 3, 4, 9)
    assert argv[argv.index("-netdev") + 1] == "tap,id=net0,fd=9"
    assert "virtio-net-pci,netdev=net0,mac=02:00:0a:59:00:05" in argv
    with pytest.raises(InvalidArgument, match="needs the tap's fd"):
        qemu_argv(VmConfig(network=tap), "tcg", Path("k"), Path("i"), Path("c"), 3, 4)
