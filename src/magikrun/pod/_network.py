"""Native pod networking through the CNI plugins Kubernetes runtimes use.

Each pod gets a veth on a Linux bridge and an IP from ``host-local`` (``bridge`` plugin),
``lo`` up (``loopback``) and its ``hostPort``s forwarded (``portmap``, with SNAT so that
``127.0.0.1:HOSTPORT`` on the host reaches the pod); one MASQUERADE rule per subnet lets
pods reach beyond the host (the bridge plugin enables IPv4 forwarding). The plugins are
driven as the CNI 1.0 spec says: ``CNI_*`` variables, the network config on stdin, the
result on stdout, and an error document ``{"code", "msg"}`` mapped to
:class:`~magikrun.errors.PodNetworkError`.

A bridge is one per host, so what belongs to it is too: its IP allocations and its subnet
live in ``/run/magikrun-networks/<bridge>/`` (``HOST_NETWORKS``), shared by every magikrun
root that attaches pods to it, so two roots on ``magikrun0`` never hand out one address
twice; a root asking for another subnet on a bridge in use is refused. ``/run`` goes with a
reboot, as the bridge and the pods do. The CNI container id is the pod id qualified by its
root, so two roots' pods of one name never share an allocation or a portmap chain. The
defaults, ``magikrun0`` and ``10.89.0.0/16``, stay clear of podman's ``10.88.0.0/16``. The
bridge and the masquerade rule stay after the last pod is gone, as with every CNI runtime;
:meth:`PodNetwork.remove_bridge` removes them once no root has a pod on the bridge.

Every attachment is recorded in ``run/cni/pods/<pod_id>.json`` *before* the first plugin
runs and removed only after a successful DEL, so :meth:`PodNetwork.delete` can always undo
an ``add`` (even a half-done one, even after a crash, even when the namespace is gone) with
the exact config the ``add`` used.

Example::

    net = PodNetwork(paths, bridge="mkbr1", subnet="10.90.0.0/24")
    ns = net.netns_path(pod.id)
    create_netns(ns)
    status = await net.add(pod.id, ns, PortMapping.from_spec(pod))
    ...
    await net.delete(pod.id, ns)
    delete_netns(ns)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _process
from ..errors import InvalidArgument, MagikrunError, MagikrunTimeout, PodNetworkError
from ..platform import Paths
from ..platform._limits import CNI_PLUGIN_TIMEOUT
from ._netns import create_netns, delete_netns, is_netns
from ._spec import PodSpec

__all__ = [
    "CNI_PLUGIN_DIR",
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
    "HOST_NETWORKS",
    "NetworkStatus",
    "PodNetwork",
    "PortMapping",
    "create_netns",
    "delete_netns",
]

DEFAULT_BRIDGE = "magikrun0"
DEFAULT_SUBNET = "10.89.0.0/16"
CNI_PLUGIN_DIR = Path("/usr/lib/cni")
HOST_NETWORKS = Path("/run/magikrun-networks")
"""Per bridge: the IP allocations and the subnet every root on that bridge shares."""
CNI_VERSION = "1.0.0"
POD_INTERFACE = "eth0"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_UNCHECKABLE = frozenset({"loopback", "portmap"})
"""loopback has nothing to check; portmap 1.1.1 (Debian 12) fails CHECK on every host where
ip6tables works, looking for an IPv6 chain it never creates for an IPv4 pod."""
_PLUGIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
"""The plugins find iptables and ip6tables on PATH."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PortMapping:
    """One ``hostPort`` forward: ``host_ip:host_port`` on the host to the pod's port."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    @classmethod
    def from_spec(cls, spec: PodSpec) -> list[PortMapping]:
        """The forwards the pod's containers ask for with ``hostPort``."""
        return [
            cls(
                host_port=port.host_port,
                container_port=port.container_port,
                protocol=port.protocol.value.lower(),
                host_ip=port.host_ip or "",
            )
            for container in spec.containers
            for port in container.ports
            if port.host_port is not None
        ]

    def to_cni(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkStatus:
    """Where a pod is on the network."""

    ip: str
    prefix_length: int
    gateway: str
    interface: str
    """The pod-side interface name (``eth0``)."""
    mac: str = ""


class PodNetwork:
    """The CNI network of one magikrun root.

    Parameters:
        paths: the root; IP allocations and attachment records live under ``paths.run``.
        bridge: the Linux bridge pods attach to (at most 15 characters).
        subnet: the IPv4 subnet pods get addresses from; the bridge takes the first address.
        plugin_dir: where the CNI plugin binaries are.
    """

    def __init__(
        self,
        paths: Paths,
        *,
        bridge: str = DEFAULT_BRIDGE,
        subnet: str = DEFAULT_SUBNET,
        plugin_dir: Path = CNI_PLUGIN_DIR,
    ) -> None:
        if _IFNAME.fullmatch(bridge) is None:
            raise InvalidArgument(
                f"bridge name {bridge!r} is not a valid interface name",
                hint="use 1-15 characters from letters, digits, '_', '.' and '-'",
                bridge=bridge,
            )
        try:
            network = ipaddress.ip_network(subnet)
        except ValueError as exc:
            raise InvalidArgument(
                f"subnet {subnet!r} is not an IP network",
                hint="write it as ADDRESS/PREFIX with the host bits zero, e.g. 10.89.0.0/16",
                subnet=subnet,
            ) from exc
        if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
            raise InvalidArgument(
                f"subnet {subnet!r} must be IPv4 with room for pods (prefix /30 or shorter)",
                subnet=subnet,
            )
        self.paths = paths
        self.bridge = bridge
        self.subnet = str(network)
        self.plugin_dir = plugin_dir
        self.name = f"magikrun-{bridge}"
        self._records = paths.run / "cni" / "pods"
        self._host = HOST_NETWORKS / bridge
        self._ipam = self._host / "ipam"
        self._root_tag = root_tag(paths)
        self._netns_dir = paths.run / "netns"
        self._masquerading = False

    def netns_path(self, pod_id: str) -> Path:
        """Where the pod's network namespace is bound (make it with :func:`create_netns`)."""
        _check_id(pod_id)
        self._netns_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._netns_dir / pod_id

    def attached(self) -> list[str]:
        """Ids of the pods with an attachment record: what ``system gc`` checks for orphans."""
        if not self._records.is_dir():
            return []
        return sorted(p.stem for p in self._records.glob("*.json") if _ID.fullmatch(p.stem))

    def allocated(self) -> list[str]:
        """The addresses this root's pods hold on the bridge (the bridge's other roots aside)."""
        owner = f".{self._root_tag}"
        return sorted(p.name for p, holder in self.allocations().items() if holder.endswith(owner))

    def allocations(self) -> dict[Path, str]:
        """Every address allocated on the bridge by any root: host-local's file for it, with
        the CNI container id that holds it (the pod id, ``.`` and its :func:`root_tag`)."""
        directory = self._ipam / self.name
        found: dict[Path, str] = {}
        if not directory.is_dir():
            return found
        for entry in directory.iterdir():
            try:
                ipaddress.ip_address(entry.name)
                owner = entry.read_text().splitlines()
            except (ValueError, OSError):
                continue
            found[entry] = owner[0] if owner else ""
        return found

    def _config(self, pod_id: str, port_mappings: Sequence[PortMapping]) -> dict[str, Any]:
        """The attachment record: ``lo``'s config and the plugin chain, each config complete.

        ``lo`` is a network of its own (as containerd and CRI-O do it), so it comes up while
        the bridge plugin works. Masquerading is one rule per subnet (see
        :meth:`_ensure_masquerade`), not the bridge plugin's ``ipMasq`` chain per pod, which
        doubles the time of ADD and DEL and leaks when DEL finds the namespace gone.
        """
        common = {"cniVersion": CNI_VERSION, "name": self.name}
        chain: list[dict[str, Any]] = [
            {
                **common,
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(self._ipam),
                    "ranges": [[{"subnet": self.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ]
        if port_mappings:
            chain.append(
                {
                    **common,
                    "type": "portmap",
                    "capabilities": {"portMappings": True},
                    "snat": True,
                    "runtimeConfig": {"portMappings": [m.to_cni() for m in port_mappings]},
                }
            )
        return {
            "container_id": f"{pod_id}.{self._root_tag}",
            "loopback": {**common, "type": "loopback"},
            "chain": chain,
            "result": None,
        }

    async def add(
        self, pod_id: str, netns_path: Path, port_mappings: Iterable[PortMapping] = ()
    ) -> NetworkStatus:
        """Attach the pod's namespace: ``lo`` up, an IP on the bridge, its host ports.

        Either all of it is done or, on any failure (cancellation included), what was done is
        undone before the error propagates.
        """
        _check_id(pod_id)
        if not is_netns(netns_path):
            raise PodNetworkError(
                f"{netns_path} is not a network namespace",
                hint="create it first with create_netns()",
                pod_id=pod_id,
            )
        record = self._config(pod_id, list(port_mappings))
        plugins = ["loopback", "host-local", *(p["type"] for p in record["chain"])]
        for plugin in plugins:
            if not os.access(self.plugin_dir / plugin, os.X_OK):
                raise PodNetworkError(
                    f"CNI plugin {self.plugin_dir / plugin} is not installed",
                    hint="install Debian's containernetworking-plugins",
                    pod_id=pod_id,
                    plugin=plugin,
                )
        if self._record_path(pod_id).exists():
            raise PodNetworkError(
                f"pod {pod_id} is already attached to the network",
                hint="delete its attachment first",
                pod_id=pod_id,
            )
        netns = str(netns_path)
        async with self._bridge_lock(fcntl.LOCK_SH):
            self._claim_subnet()
            self._write_record(pod_id, record)
            try:
                await self._ensure_masquerade()
                result = await _together(
                    self._call(
                        "ADD",
                        "loopback",
                        pod_id,
                        netns,
                        record["loopback"],
                        _cni_id(record, pod_id),
                    ),
                    self._add_chain(pod_id, netns, record),
                )
                return _status(pod_id, result[1])
            except BaseException as exc:
                try:
                    await self.delete(pod_id, netns_path)
                except MagikrunError as cleanup:
                    exc.add_note(f"undoing the network attachment failed too: {cleanup}")
                raise

    @contextlib.asynccontextmanager
    async def _bridge_lock(self, operation: int) -> AsyncIterator[None]:
        """Hold the bridge's host-wide lock: shared while attaching, alone while removing it.

        ``flock`` is polled without blocking, so the event loop never waits in the kernel.
        :meth:`remove_bridge` deletes the lock file with the bridge, so a lock taken on a
        file that is no longer the one at its path is let go and taken again.
        """
        path = self._host / "lock"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CNI_PLUGIN_TIMEOUT
        while True:
            self._host.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                continue
            try:
                while True:
                    try:
                        fcntl.flock(fd, operation | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if loop.time() > deadline:
                            raise PodNetworkError(
                                f"bridge {self.bridge} stayed locked for {CNI_PLUGIN_TIMEOUT} s",
                                hint=f"another magikrun process holds {path}",
                                bridge=self.bridge,
                            ) from None
                        await asyncio.sleep(0.02)
                if _same_file(fd, path):
                    yield
                    return
            finally:
                os.close(fd)

    def _claim_subnet(self) -> None:
        """Record this root's subnet for the bridge, or refuse one that differs from it."""
        path = self._host / "subnet"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            claimed = path.read_text().strip()
            if claimed != self.subnet:
                raise PodNetworkError(
                    f"bridge {self.bridge} carries subnet {claimed}, not {self.subnet}: "
                    "another magikrun root attached pods to it first",
                    hint="give each root its own bridge and subnet, or use the same subnet",
                    bridge=self.bridge,
                    subnet=self.subnet,
                ) from None
            return
        with open(fd, "w") as file:
            file.write(f"{self.subnet}\n")

    async def add_ports(
        self, pod_id: str, netns_path: Path, port_mappings: Iterable[PortMapping]
    ) -> None:
        """Add host port forwards to an attached pod (its infra extensions ask for them).

        The portmap step is replaced by one holding the old and the new forwards; the
        record names it before it runs, so ``delete`` (and recovery) remove them all.
        """
        _check_id(pod_id)
        record = self._read_record(pod_id)
        if record is None or record.get("result") is None:
            raise PodNetworkError(f"pod {pod_id} is not attached to the network", pod_id=pod_id)
        result: dict[str, Any] = record["result"]
        container_id = _cni_id(record, pod_id)
        netns = str(netns_path)
        old = [p for p in record["chain"] if p["type"] == "portmap"]
        mappings = [
            *(
                PortMapping(
                    host_port=m["hostPort"],
                    container_port=m["containerPort"],
                    protocol=m["protocol"],
                    host_ip=m.get("hostIP", ""),
                )
                for p in old
                for m in p["runtimeConfig"]["portMappings"]
            ),
            *port_mappings,
        ]
        taken = {(m.host_port, m.protocol) for m in mappings}
        if len(taken) != len(mappings):
            raise PodNetworkError(
                f"pod {pod_id} already forwards one of these host ports",
                hint="request each host port once",
                pod_id=pod_id,
            )
        for plugin in old:
            await self._call(
                "DEL", "portmap", pod_id, netns, {**plugin, "prevResult": result}, container_id
            )
        portmap = self._config(pod_id, mappings)["chain"][-1]
        chain = [p for p in record["chain"] if p["type"] != "portmap"]
        self._write_record(pod_id, {**record, "chain": [*chain, portmap]})
        await self._call(
            "ADD", "portmap", pod_id, netns, {**portmap, "prevResult": result}, container_id
        )

    async def _add_chain(self, pod_id: str, netns: str, record: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] | None = None
        for plugin in record["chain"]:
            conf = dict(plugin)
            if result is not None:
                conf["prevResult"] = result
            result = await self._call(
                "ADD", plugin["type"], pod_id, netns, conf, _cni_id(record, pod_id)
            )
            if plugin["type"] == "bridge":
                self._write_record(pod_id, {**record, "result": result})
        assert result is not None
        return result

    async def check(self, pod_id: str, netns_path: Path) -> NetworkStatus:
        """Ask the plugins whether the attachment is still as ADD made it (CNI CHECK).

        Checks the bridge, veth, address and IP allocation; not the port forwards (see
        ``_UNCHECKABLE``). Raises ``PodNetworkError`` naming what the plugin found wrong.
        """
        _check_id(pod_id)
        record = self._read_record(pod_id)
        if record is None or record.get("result") is None:
            raise PodNetworkError(f"pod {pod_id} is not attached to the network", pod_id=pod_id)
        result: dict[str, Any] = record["result"]
        for plugin in record["chain"]:
            if plugin["type"] in _UNCHECKABLE:
                continue
            await self._call(
                "CHECK",
                plugin["type"],
                pod_id,
                str(netns_path),
                {**plugin, "prevResult": result},
                _cni_id(record, pod_id),
            )
        return _status(pod_id, result)

    async def delete(self, pod_id: str, netns_path: Path) -> None:
        """Detach the pod: free its IP, remove its veth and port forwards. Idempotent.

        Works when the namespace is already gone (the plugins are then told no namespace):
        the IP and the port forwards are still freed, and the kernel removed the veth with
        the namespace.
        """
        _check_id(pod_id)
        record = self._read_record(pod_id)
        if record is None:
            return
        alive = is_netns(netns_path)
        netns = str(netns_path) if alive else ""
        result: dict[str, Any] | None = record.get("result")
        container_id = _cni_id(record, pod_id)

        async def delete_chain() -> None:
            for plugin in reversed(record["chain"]):
                conf = dict(plugin) if result is None else {**plugin, "prevResult": result}
                await self._call("DEL", plugin["type"], pod_id, netns, conf, container_id)

        steps: list[Coroutine[Any, Any, Any]] = [delete_chain()]
        if alive:
            steps.append(
                self._call("DEL", "loopback", pod_id, netns, record["loopback"], container_id)
            )
        await _together(*steps)
        self._record_path(pod_id).unlink(missing_ok=True)

    def _masquerade_rule(self) -> list[str]:
        return [
            "POSTROUTING",
            "-s",
            self.subnet,
            "!",
            "-d",
            self.subnet,
            "-m",
            "comment",
            "--comment",
            f"{self.name}: masquerade pods",
            "-j",
            "MASQUERADE",
        ]

    async def _iptables(self, action: str) -> int:
        done = await _process.run(
            ["iptables", "-w", "-t", "nat", action, *self._masquerade_rule()],
            timeout=CNI_PLUGIN_TIMEOUT,
        )
        return done.returncode

    async def _ensure_masquerade(self) -> None:
        """Masquerade traffic from the pods' subnet to anywhere else, so pods reach out."""
        if self._masquerading:
            return
        if await self._iptables("-C") != 0 and await self._iptables("-A") != 0:
            raise PodNetworkError(
                f"cannot add the masquerade rule for {self.subnet}",
                hint="check that iptables works (iptables -t nat -S)",
                subnet=self.subnet,
            )
        self._masquerading = True

    async def remove_bridge(self) -> None:
        """Delete the bridge, its masquerade rule and its host-wide state once no pod of
        any root is on it (the CNI plugins never delete a bridge; tests do it here).
        """
        if self._records.is_dir() and any(self._records.glob("*.json")):
            raise PodNetworkError(
                f"pods of this root are still attached to {self.bridge}",
                hint="delete the pods first",
                bridge=self.bridge,
            )
        async with self._bridge_lock(fcntl.LOCK_EX):
            others = sorted(p.name for p in self.allocations())
            if others:
                raise PodNetworkError(
                    f"pods still hold {len(others)} address(es) on {self.bridge}: "
                    f"{', '.join(others)}",
                    hint="delete the pods of the other magikrun roots on this bridge first",
                    bridge=self.bridge,
                )
            while await self._iptables("-C") == 0:
                if await self._iptables("-D") != 0:
                    raise PodNetworkError(
                        f"cannot remove the masquerade rule for {self.subnet}", subnet=self.subnet
                    )
            self._masquerading = False
            done = await _process.run(
                ["ip", "link", "del", "dev", self.bridge, "type", "bridge"],
                timeout=CNI_PLUGIN_TIMEOUT,
            )
            if done.returncode != 0 and b"Cannot find device" not in done.stderr:
                raise PodNetworkError(
                    f"cannot delete bridge {self.bridge}: {done.stderr.decode(errors='replace')}",
                    bridge=self.bridge,
                )
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self._ipam)
            (self._host / "subnet").unlink(missing_ok=True)
            (self._host / "lock").unlink()
            self._host.rmdir()

    async def _call(
        self,
        command: str,
        plugin: str,
        pod_id: str,
        netns: str,
        conf: dict[str, Any],
        container_id: str,
    ) -> dict[str, Any]:
        env = {
            "PATH": _PLUGIN_PATH,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": POD_INTERFACE,
            "CNI_PATH": str(self.plugin_dir),
        }
        binary = self.plugin_dir / plugin
        try:
            done = await _process.run(
                [str(binary)],
                input=json.dumps(conf).encode(),
                env=env,
                timeout=CNI_PLUGIN_TIMEOUT,
            )
        except FileNotFoundError as exc:
            raise PodNetworkError(
                f"CNI plugin {binary} is not installed",
                hint="install Debian's containernetworking-plugins",
                pod_id=pod_id,
                plugin=plugin,
            ) from exc
        except BrokenPipeError as exc:
            raise PodNetworkError(
                f"CNI {plugin} {command} for pod {pod_id} exited without reading its config",
                pod_id=pod_id,
                plugin=plugin,
            ) from exc
        except MagikrunTimeout as exc:
            raise PodNetworkError(
                f"CNI {plugin} {command} for pod {pod_id} did not finish in {CNI_PLUGIN_TIMEOUT} s",
                pod_id=pod_id,
                plugin=plugin,
            ) from exc
        if done.returncode != 0:
            raise _plugin_error(command, plugin, pod_id, done.stdout, done.stderr)
        if command != "ADD":
            return {}
        try:
            parsed = json.loads(done.stdout)
        except ValueError as exc:
            raise PodNetworkError(
                f"CNI {plugin} ADD for pod {pod_id} printed no JSON result",
                pod_id=pod_id,
                plugin=plugin,
            ) from exc
        if not isinstance(parsed, dict):
            raise PodNetworkError(
                f"CNI {plugin} ADD for pod {pod_id} printed a malformed result",
                pod_id=pod_id,
                plugin=plugin,
            )
        return parsed

    def _record_path(self, pod_id: str) -> Path:
        return self._records / f"{pod_id}.json"

    def _write_record(self, pod_id: str, record: dict[str, Any]) -> None:
        self._records.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._record_path(pod_id)
        temp = path.with_name(f".{path.name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as file:
            json.dump(record, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)

    def _read_record(self, pod_id: str) -> dict[str, Any] | None:
        path = self._record_path(pod_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        with open(fd) as file:
            try:
                record = json.load(file)
            except ValueError as exc:
                raise PodNetworkError(
                    f"the network record of pod {pod_id} is corrupt: {path}",
                    hint="remove the file after checking 'ip link' and 'iptables-save'",
                    pod_id=pod_id,
                ) from exc
        if not isinstance(record, dict):
            raise PodNetworkError(f"the network record of pod {pod_id} is corrupt: {path}")
        return record


async def _together(*steps: Coroutine[Any, Any, Any]) -> list[Any]:
    """Run steps concurrently in a task group; fail with the first error, not a group."""
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(step) for step in steps]
    except BaseExceptionGroup as group_error:
        first, *others = group_error.exceptions
        for other in others:
            first.add_note(f"and at the same time: {other}")
        raise first from None
    return [task.result() for task in tasks]


def root_tag(paths: Paths) -> str:
    """What qualifies a root's pod ids into host-wide CNI container ids."""
    return hashlib.sha256(os.fsencode(paths.run.resolve())).hexdigest()[:12]


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _cni_id(record: dict[str, Any], pod_id: str) -> str:
    """The CNI container id the attachment was made with (the bare pod id in old records)."""
    return str(record.get("container_id", pod_id))


def _check_id(pod_id: str) -> None:
    if _ID.fullmatch(pod_id) is None:
        raise InvalidArgument(
            f"pod id {pod_id!r} is not a valid CNI container id",
            hint="use pod_id(namespace, name)",
            pod_id=pod_id,
        )


def _status(pod_id: str, result: dict[str, Any]) -> NetworkStatus:
    interfaces = result.get("interfaces", [])
    for entry in result.get("ips", []):
        index = entry.get("interface")
        iface = interfaces[index] if isinstance(index, int) and index < len(interfaces) else {}
        if not iface.get("sandbox"):
            continue
        address = ipaddress.ip_interface(entry["address"])
        if address.version != 4:
            continue
        return NetworkStatus(
            ip=str(address.ip),
            prefix_length=address.network.prefixlen,
            gateway=entry.get("gateway", ""),
            interface=iface.get("name", POD_INTERFACE),
            mac=iface.get("mac", ""),
        )
    raise PodNetworkError(
        f"the CNI result for pod {pod_id} holds no IPv4 address for the pod",
        pod_id=pod_id,
    )


def _plugin_error(
    command: str, plugin: str, pod_id: str, stdout: bytes, stderr: bytes
) -> PodNetworkError:
    """Map a CNI error document (``code``, ``msg``, ``details``) to our error."""
    code: object = None
    message = stderr.decode(errors="replace").strip()
    with contextlib.suppress(ValueError):
        document = json.loads(stdout)
        if isinstance(document, dict):
            code = document.get("code")
            message = " ".join(
                str(part) for part in (document.get("msg"), document.get("details")) if part
            )
    return PodNetworkError(
        f"CNI {plugin} {command} for pod {pod_id} failed: {message or 'no message'}"
        + (f" (CNI error code {code})" if code is not None else ""),
        pod_id=pod_id,
        plugin=plugin,
        code=code,
    )
