"""Pod networking with the real CNI plugins, as root.

Each test gets its own bridge and /24 subnet (random, checked against the host's routes) so
that tests run side by side under xdist; every test checks that nothing is left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from magikrun.errors import InvalidArgument, PodNetworkError
from magikrun.platform import Paths
from magikrun.pod import (
    NetworkStatus,
    PodNetwork,
    PodSpec,
    PortMapping,
    create_netns,
    delete_netns,
)
from magikrun.pod._netns import is_netns
from magikrun.pod._network import HOST_NETWORKS
from tests.conftest import requires_root

pytestmark = [requires_root, pytest.mark.root]

ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept()
    c.sendall(c.recv(100).upper())
    c.close()
"""

ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"hello")
print(c.recv(100).decode())
"""


def _free_subnet() -> str:
    used = subprocess.run(
        ["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    while True:
        candidate = f"10.{200 + secrets.randbelow(55)}.{secrets.randbelow(256)}.0/24"
        if candidate.split("/")[0].rsplit(".", 1)[0] + "." not in used:
            return candidate


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _iptables() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


def _veths_on(bridge: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


class Pods:
    """The test's network, and the pods it attached, cleaned up whatever happens."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.bridge = f"mk{secrets.token_hex(4)}"
        self.subnet = _free_subnet()
        self.net = PodNetwork(paths, bridge=self.bridge, subnet=self.subnet)
        self.ids: list[str] = []

    def new_id(self) -> str:
        pod = f"default_t{secrets.token_hex(5)}"
        self.ids.append(pod)
        return pod

    def netns(self, pod: str) -> Path:
        return create_netns(self.net.netns_path(pod))

    def ipam_files(self) -> list[str]:
        return self.net.allocated()

    def assert_nothing_left(self, pod: str) -> None:
        ns = self.net.netns_path(pod)
        assert not ns.exists()
        assert str(ns) not in Path("/proc/self/mountinfo").read_text()
        assert f'id: \\"{pod}.' not in _iptables()
        assert not (self.paths.run / "cni" / "pods" / f"{pod}.json").exists()
        assert not list((self.paths.run / "netns").glob(".del-*"))
        deadline = time.monotonic() + 10  # the kernel destroys a namespace asynchronously
        while _veths_on(self.bridge) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _veths_on(self.bridge) == []

    async def cleanup(self) -> None:
        for pod in self.ids:
            ns = self.net.netns_path(pod)
            await self.net.delete(pod, ns)
            delete_netns(ns)
        deadline = time.monotonic() + 10
        while _veths_on(self.bridge) and time.monotonic() < deadline:
            time.sleep(0.05)
        await self.net.remove_bridge()


@pytest.fixture
async def pods(paths: Paths) -> AsyncIterator[Pods]:
    state = Pods(paths)
    try:
        yield state
    finally:
        await state.cleanup()
        link = subprocess.run(["ip", "link", "show", state.bridge], capture_output=True)
        assert link.returncode != 0, "the test bridge was left behind"
        assert not (HOST_NETWORKS / state.bridge).exists()
        rules = _iptables()
        assert [pod for pod in state.ids if f'id: \\"{pod}.' in rules] == []
        assert state.net.name not in rules


def _serve(ns: Path, port: int, connections: int = 1) -> subprocess.Popen[str]:
    argv = ["nsenter", f"--net={ns}", sys.executable, "-I", "-c", ECHO_SERVER]
    server = subprocess.Popen(
        [*argv, str(port), str(connections)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server


def _stop(server: subprocess.Popen[str]) -> None:
    try:
        server.wait(timeout=30)
    finally:
        server.kill()
        server.wait()
        assert server.stdout is not None
        server.stdout.close()


def _client(ns: Path, ip: str, port: int) -> str:
    done = subprocess.run(
        ["nsenter", f"--net={ns}", sys.executable, "-I", "-c", ECHO_CLIENT, ip, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_two_pods_get_distinct_ips_and_talk(pods: Pods) -> None:
    a, b = pods.new_id(), pods.new_id()
    ns_a, ns_b = pods.netns(a), pods.netns(b)
    st_a = await pods.net.add(a, ns_a)
    st_b = await pods.net.add(b, ns_b)
    network = ipaddress.ip_network(pods.subnet)
    assert st_a.ip != st_b.ip
    assert {ipaddress.ip_address(st_a.ip), ipaddress.ip_address(st_b.ip)} <= set(network)
    assert st_a.gateway == str(network.network_address + 1)
    assert st_a.interface == "eth0" and st_a.prefix_length == 24
    assert sorted(pods.ipam_files()) == sorted([st_a.ip, st_b.ip])
    assert f"-A POSTROUTING -s {pods.subnet} ! -d {pods.subnet}" in _iptables()
    lo = subprocess.run(
        ["nsenter", f"--net={ns_a}", "ip", "-o", "link", "show", "lo"],
        capture_output=True,
        text=True,
    ).stdout
    assert "UP" in lo.split(">")[0]
    ping = subprocess.run(
        ["nsenter", f"--net={ns_b}", "/bin/busybox", "ping", "-c1", "-W5", st_a.ip],
        capture_output=True,
        text=True,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    server = _serve(ns_a, 7000)
    try:
        assert _client(ns_b, st_a.ip, 7000) == "HELLO"
    finally:
        _stop(server)


async def test_concurrent_adds_get_distinct_ips(pods: Pods) -> None:
    ids = [pods.new_id() for _ in range(4)]
    namespaces = [pods.netns(pod) for pod in ids]
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(pods.net.add(p, n)) for p, n in zip(ids, namespaces, strict=True)
        ]
    ips = sorted(task.result().ip for task in tasks)
    assert len(set(ips)) == 4
    assert sorted(pods.ipam_files()) == ips
    assert pods.net.attached() == sorted(ids)
    async with asyncio.TaskGroup() as group:
        for pod, ns in zip(ids, namespaces, strict=True):
            group.create_task(pods.net.delete(pod, ns))
    for pod, ns in zip(ids, namespaces, strict=True):
        delete_netns(ns)
        pods.assert_nothing_left(pod)
    assert pods.ipam_files() == []
    assert pods.net.attached() == []


async def test_host_port_reaches_the_pod_from_loopback(pods: Pods) -> None:
    pod = pods.new_id()
    ns = pods.netns(pod)
    host_port = _free_port()
    status = await pods.net.add(pod, ns, [PortMapping(host_port=host_port, container_port=8080)])
    server = _serve(ns, 8080, connections=2)
    try:
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
            conn.sendall(b"via hostport")
            assert conn.recv(100) == b"VIA HOSTPORT"
        with socket.create_connection((status.ip, 8080), timeout=10) as conn:
            conn.sendall(b"direct")
            assert conn.recv(100) == b"DIRECT"
    finally:
        _stop(server)
    assert f"--dport {host_port}" in _iptables()
    await pods.net.delete(pod, ns)
    delete_netns(ns)
    assert f"--dport {host_port}" not in _iptables()
    pods.assert_nothing_left(pod)


async def test_port_mappings_from_spec(pods: Pods) -> None:
    spec = PodSpec.from_dict(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {
                "containers": [
                    {
                        "name": "a",
                        "image": "busybox",
                        "ports": [
                            {"containerPort": 80, "hostPort": 18080},
                            {"containerPort": 53, "hostPort": 1053, "protocol": "UDP"},
                            {"containerPort": 9000},
                        ],
                    }
                ]
            },
        }
    )
    assert PortMapping.from_spec(spec) == [
        PortMapping(host_port=18080, container_port=80, protocol="tcp"),
        PortMapping(host_port=1053, container_port=53, protocol="udp"),
    ]


async def test_delete_frees_everything_and_is_idempotent(pods: Pods) -> None:
    pod = pods.new_id()
    ns = pods.netns(pod)
    status = await pods.net.add(pod, ns, [PortMapping(host_port=_free_port(), container_port=80)])
    assert pods.ipam_files() == [status.ip]
    assert f'id: \\"{pod}.' in _iptables()
    assert len(_veths_on(pods.bridge)) == 1
    assert await pods.net.check(pod, ns) == status
    await pods.net.delete(pod, ns)
    assert pods.ipam_files() == []
    delete_netns(ns)
    pods.assert_nothing_left(pod)
    await pods.net.delete(pod, ns)
    delete_netns(ns)
    pods.assert_nothing_left(pod)


async def test_delete_after_the_netns_is_gone(pods: Pods) -> None:
    pod = pods.new_id()
    ns = pods.netns(pod)
    status = await pods.net.add(pod, ns, [PortMapping(host_port=_free_port(), container_port=80)])
    delete_netns(ns)
    assert pods.ipam_files() == [status.ip]
    await pods.net.delete(pod, ns)
    assert pods.ipam_files() == []
    pods.assert_nothing_left(pod)
    await pods.net.delete(pod, ns)


async def test_check_reports_a_broken_attachment(pods: Pods) -> None:
    pod = pods.new_id()
    ns = pods.netns(pod)
    await pods.net.add(pod, ns)
    subprocess.run(["nsenter", f"--net={ns}", "ip", "link", "del", "eth0"], check=True)
    with pytest.raises(PodNetworkError) as info:
        await pods.net.check(pod, ns)
    assert str(info.value).startswith(f"CNI bridge CHECK for pod {pod} failed: ")
    other = pods.new_id()
    with pytest.raises(PodNetworkError, match="is not attached"):
        await pods.net.check(other, ns)
    await pods.net.delete(pod, ns)
    delete_netns(ns)
    pods.assert_nothing_left(pod)


async def test_failed_add_is_rolled_back(pods: Pods, tmp_path: Path) -> None:
    plugins = tmp_path / "cni"
    plugins.mkdir()
    for name in ("bridge", "host-local", "loopback"):
        (plugins / name).symlink_to(Path("/usr/lib/cni") / name)
    failing = plugins / "portmap"
    failing.write_text(
        "#!/bin/sh\n"
        "cat >/dev/null\n"
        '[ "$CNI_COMMAND" = ADD ] || exit 0\n'
        'echo \'{"cniVersion": "1.0.0", "code": 7, "msg": "port taken", "details": "x"}\'\n'
        "exit 1\n"
    )
    failing.chmod(0o755)
    net = PodNetwork(pods.paths, bridge=pods.bridge, subnet=pods.subnet, plugin_dir=plugins)
    pod = pods.new_id()
    ns = pods.netns(pod)
    with pytest.raises(PodNetworkError) as info:
        await net.add(pod, ns, [PortMapping(host_port=_free_port(), container_port=80)])
    assert str(info.value) == (
        f"CNI portmap ADD for pod {pod} failed: port taken x (CNI error code 7)"
    )
    assert info.value.subject["code"] == 7
    assert pods.ipam_files() == []
    assert f'id: \\"{pod}.' not in _iptables()
    assert _veths_on(pods.bridge) == []
    assert not (pods.paths.run / "cni" / "pods" / f"{pod}.json").exists()
    delete_netns(ns)
    pods.assert_nothing_left(pod)


async def test_add_needs_a_namespace(pods: Pods, tmp_path: Path) -> None:
    pod = pods.new_id()
    plain = tmp_path / "plain"
    plain.touch()
    with pytest.raises(PodNetworkError, match="is not a network namespace"):
        await pods.net.add(pod, plain)
    assert not (pods.paths.run / "cni" / "pods" / f"{pod}.json").exists()


async def test_add_twice_is_refused(pods: Pods) -> None:
    pod = pods.new_id()
    ns = pods.netns(pod)
    first = await pods.net.add(pod, ns)
    with pytest.raises(PodNetworkError, match="already attached"):
        await pods.net.add(pod, ns)
    assert pods.ipam_files() == [first.ip]
    record = json.loads((pods.paths.run / "cni" / "pods" / f"{pod}.json").read_text())
    assert record["result"]["ips"][0]["address"].startswith(first.ip)


async def test_missing_plugin(pods: Pods, tmp_path: Path) -> None:
    net = PodNetwork(pods.paths, bridge=pods.bridge, subnet=pods.subnet, plugin_dir=tmp_path)
    pod = pods.new_id()
    ns = pods.netns(pod)
    with pytest.raises(PodNetworkError, match="is not installed"):
        await net.add(pod, ns)
    assert not (pods.paths.run / "cni" / "pods" / f"{pod}.json").exists()


def test_netns_lifecycle(short_tmp: Path) -> None:
    path = short_tmp / "ns"
    create_netns(path)
    assert is_netns(path)
    assert os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino
    with pytest.raises(PodNetworkError, match="already exists"):
        create_netns(path)
    delete_netns(path)
    assert not path.exists() and not is_netns(path)
    delete_netns(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bridge": "a-very-long-bridge-name"}, "is not a valid interface name"),
        ({"bridge": "br 0"}, "is not a valid interface name"),
        ({"subnet": "10.89.0.1/16"}, "is not an IP network"),
        ({"subnet": "fd00::/64"}, "must be IPv4"),
        ({"subnet": "10.0.0.0/31"}, "must be IPv4"),
    ],
)
def test_invalid_configuration(paths: Paths, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        PodNetwork(paths, **kwargs)


def test_invalid_pod_id(paths: Paths) -> None:
    with pytest.raises(InvalidArgument, match="not a valid CNI container id"):
        PodNetwork(paths).netns_path("../etc")


def test_status_shape() -> None:
    assert NetworkStatus(ip="10.0.0.2", prefix_length=24, gateway="10.0.0.1", interface="eth0")


async def test_roots_sharing_a_bridge_share_its_addresses(pods: Pods) -> None:
    """Two roots on one bridge never get one address, even for pods of one name; deleting
    one root's pod leaves the other's address and port forward alone."""
    other = Paths.resolve(pods.paths.data.parent / "second-root")
    second = PodNetwork(other, bridge=pods.bridge, subnet=pods.subnet)
    pod = pods.new_id()
    ns_a = pods.netns(pod)
    ns_b = create_netns(second.netns_path(pod))
    port_a, port_b = _free_port(), _free_port()
    try:
        st_a = await pods.net.add(pod, ns_a, [PortMapping(host_port=port_a, container_port=80)])
        st_b = await second.add(pod, ns_b, [PortMapping(host_port=port_b, container_port=80)])
        assert st_a.ip != st_b.ip
        assert pods.net.allocated() == [st_a.ip] and second.allocated() == [st_b.ip]
        await pods.net.delete(pod, ns_a)
        delete_netns(ns_a)
        with pytest.raises(PodNetworkError) as caught:
            await pods.net.remove_bridge()
        assert caught.value.message == (
            f"pods still hold 1 address(es) on {pods.bridge}: {st_b.ip}"
        )
        assert subprocess.run(["ip", "link", "show", pods.bridge]).returncode == 0
        assert second.allocated() == [st_b.ip] and pods.net.allocated() == []
        rules = _iptables()
        assert f"--dport {port_b}" in rules and f"--dport {port_a}" not in rules
        server = _serve(ns_b, 80)
        try:
            with socket.create_connection(("127.0.0.1", port_b), timeout=10) as conn:
                conn.sendall(b"second root")
                assert conn.recv(100) == b"SECOND ROOT"
        finally:
            _stop(server)
    finally:
        await second.delete(pod, ns_b)
        delete_netns(ns_b)
    assert second.allocated() == []
    assert f"--dport {port_b}" not in _iptables()


async def test_a_second_subnet_on_a_bridge_in_use_is_refused(pods: Pods) -> None:
    pod = pods.new_id()
    await pods.net.add(pod, pods.netns(pod))
    other = Paths.resolve(pods.paths.data.parent / "second-root")
    clash = PodNetwork(other, bridge=pods.bridge, subnet=_free_subnet())
    ns = create_netns(clash.netns_path("default_clash"))
    try:
        with pytest.raises(PodNetworkError) as caught:
            await clash.add("default_clash", ns)
        assert caught.value.message == (
            f"bridge {pods.bridge} carries subnet {pods.subnet}, not {clash.subnet}: "
            "another magikrun root attached pods to it first"
        )
        assert caught.value.hint == (
            "give each root its own bridge and subnet, or use the same subnet"
        )
        assert clash.allocated() == [] and clash.attached() == []
    finally:
        delete_netns(ns)
    await pods.net.delete(pod, pods.net.netns_path(pod))
    delete_netns(pods.net.netns_path(pod))
