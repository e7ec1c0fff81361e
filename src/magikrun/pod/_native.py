"""Native pods: an infra container holding the namespaces, app containers run by crun.

```python
runtime = NativePodRuntime(Paths.resolve())
handle = await runtime.run_pod(PodSpec.from_yaml(manifest))
await runtime.stop_pod(handle.id)
await runtime.delete_pod(handle.id)
```

``run_pod`` goes: record → pull every image and prepare every bundle, concurrently →
network namespace → CNI ADD → infra container → init containers in order → app
containers created, then started → supervisor (restart policy). Every step is a
recorded intent with its undo (see :mod:`._base`), so any failure, or a crash, leaves
nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .._threads import finish_in_thread
from ..errors import PodError
from ..image import BundleBuilder, ContainerConfig, Image, ImageService, Mount, ProgressCallback
from ..image import Resources as BundleResources
from ..infra._events import ContainerCreated, ContainerExited, ContainerStarted
from ..infra._host import (
    InfraLink,
    infra_extensions,
    infra_path,
    resolve_extensions,
    write_pod_config,
)
from ..platform._limits import DEFAULT_MEMORY_BYTES, EXEC_TIMEOUT, RESTART_BACKOFF_BASE
from ..platform._paths import Paths
from ..runtime import ExecResult, NativeRuntime
from ._base import (
    PodRuntimeBase,
    _Where,
    container_id,
    infra_id,
    init_container_failed,
    kubernetes_annotations,
    log_tail,
    pod_dir,
    together,
)
from ._fault import FaultHook
from ._hostfiles import etc_mounts, write_etc_files
from ._netns import create_netns
from ._network import PodNetwork, PortMapping
from ._ports import forward_port
from ._rollback import Rollback
from ._spec import Container, PodSpec, RuntimeFields, resolve_env
from ._types import PodHandle
from ._volumes import container_mounts, prepare_volumes

__all__ = ["NativePodRuntime"]

_libc = ctypes.CDLL(None, use_errno=True)
_MS_BIND = 0x1000
_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_INFRA_DIR = "/run"
"""Where the infra container sees its directory (``pod.json``, ``infra.sock``, ``state/``)."""
_SHARED_NS = ("ipc", "uts", "pid")
"""Namespaces the infra container holds besides the network one (bound under ``ns/``)."""
_NETWORK_FIELDS = ("status.podIP", "status.podIPs", "status.hostIP", "status.hostIPs")
"""Downward-API fields known only once the pod is on the network."""


def _bind(source: str, target: Path, *, readonly: bool = False) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, _MS_BIND, None) != 0:
        code = ctypes.get_errno()
        raise PodError(f"cannot bind {source} on {target}: {os.strerror(code)}", path=str(target))
    if readonly:
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
        if _libc.mount(None, os.fsencode(target), None, flags, None) != 0:
            code = ctypes.get_errno()
            raise PodError(f"cannot make {target} read-only: {os.strerror(code)}", path=str(target))


def _hold_namespaces(pid: int, ns_dir: Path) -> None:
    """Bind the infra process's shared namespaces (one thread for all, not one each)."""
    for name in _SHARED_NS:
        _bind(f"/proc/{pid}/ns/{name}", ns_dir / name)


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _python_mounts(extra: Sequence[str] = ()) -> list[Mount]:
    """Read-only binds of the filesystems this Python (and ``extra``) lives on, beyond the
    root one."""
    import magikrun

    wanted = {sys.base_prefix, sys.prefix, sys.executable, os.path.dirname(magikrun.__file__)}
    wanted.update(extra)
    points = sorted({_mount_point(p) for p in wanted} - {"/"})
    return [Mount(destination=p, source=p, options=("rbind", "ro")) for p in points]


async def _tell(link: InfraLink | None, event: ContainerCreated | ContainerExited) -> None:
    if link is not None:
        await link.send(event)


def _reason(code: int) -> str:
    return "Completed" if code == 0 else "Error"


class NativePodRuntime(PodRuntimeBase):
    """Pods of native Linux containers (crun, or runc) on a CNI bridge network.

    Parameters:
        paths: the magikrun root.
        oci_binary: ``"crun"`` (default when it works here) or ``"runc"``.
        network: the pods' network (default: ``PodNetwork(paths)``, the ``magikrun0`` bridge).
        fault_hook: called with each step's name (tests); ``$MAGIKRUN_FAULT`` otherwise.
        restart_backoff: seconds before the first restart of a container (doubling, capped).
        progress: receives pull progress events.
    """

    name = "native"
    backend = "native"

    def __init__(
        self,
        paths: Paths,
        *,
        oci_binary: str | None = None,
        network: PodNetwork | None = None,
        fault_hook: FaultHook | None = None,
        restart_backoff: float = RESTART_BACKOFF_BASE,
        progress: ProgressCallback | None = None,
    ) -> None:
        super().__init__(paths, fault_hook=fault_hook, restart_backoff=restart_backoff)
        self.images = ImageService(paths)
        self.builder = BundleBuilder(paths)
        self.runtime = NativeRuntime(paths, oci_binary=oci_binary, store=self.containers)
        self.network = network or PodNetwork(paths)
        self.progress = progress

    def _runtime(self) -> NativeRuntime:
        return self.runtime

    async def run_pod(self, spec: PodSpec) -> PodHandle:
        """Start the whole pod, or nothing: ``PodStartFailed`` names the step and container."""
        await self._ready()
        extensions = await finish_in_thread(resolve_extensions, spec.id, spec.metadata.annotations)
        record = self.store.create(spec, self.name)
        pod = record.id
        where = _Where()
        directory = pod_dir(self.paths, pod)
        async with self._rollback(spec, where) as rollback:
            rollback.push("record", lambda: self._drop_record(pod, rollback))
            self._at(where, "pull")
            images = await self._pull_all(spec, where)
            self._at(where, "bundle")
            netns = directory / "ns" / "net" if spec.host_network else self.network.netns_path(pod)
            await self._make(
                rollback,
                pod,
                "poddir",
                pod,
                {"path": str(directory)},
                lambda: finish_in_thread(self._make_pod_dir, spec, directory),
            )
            volumes = await finish_in_thread(prepare_volumes, spec, directory)
            # The host as a pod reaches it: itself on its network, else the bridge's gateway.
            ip, host_ip = "", "127.0.0.1" if spec.host_network else ""
            configs = {
                c.name: self._config(spec, c, directory, netns, volumes, ip, host_ip)
                for c in (*spec.init_containers, *spec.containers)
            }
            await together(
                [
                    self._infra_bundle(rollback, spec, directory, netns, where, extensions),
                    *(
                        self._bundle(rollback, pod, c, images[c.image], configs[c.name], where)
                        for c in (*spec.init_containers, *spec.containers)
                    ),
                ]
            )
            if not spec.host_network:
                self._at(where, "netns")
                await self._make(
                    rollback,
                    pod,
                    "netns",
                    pod,
                    {"path": str(netns)},
                    lambda: finish_in_thread(create_netns, netns),
                )
                self._at(where, "network")
                status = await self._make(
                    rollback,
                    pod,
                    "network",
                    pod,
                    {
                        "bridge": self.network.bridge,
                        "subnet": self.network.subnet,
                        "netns": str(netns),
                    },
                    lambda: self.network.add(pod, netns, PortMapping.from_spec(spec)),
                )
                ip = status.ip
                self.store.update(pod, ip=ip)
                await self._rebuild_for_ip(
                    spec,
                    pod,
                    images=images,
                    ip=ip,
                    host_ip=status.gateway,
                    directory=directory,
                    netns=netns,
                    volumes=volumes,
                )
            await finish_in_thread(write_etc_files, spec, directory / "etc", pod_ip=ip or None)
            self._at(where, "infra")
            link = await self._start_infra(rollback, spec, directory, extensions, ip=ip or None)
            for init in spec.init_containers:
                self._at(where, "init", init.name)
                await self._run_init(rollback, pod, init, link)
            await self._create_all(rollback, pod, spec.containers, where)
            for c in spec.containers:
                await _tell(link, ContainerCreated(name=c.name))
            for c in spec.containers:
                self._at(where, "start", c.name)
                await self.runtime.start(container_id(pod, c.name))
                await self._tell_started(link, pod, c.name)
            if link is not None:
                await link.aclose()  # the supervisor connects next
            self._at(where, "supervisor")
            await self._start_supervisor(rollback, spec, directory)
            self.store.update(pod, state="ready")
            rollback.pop_all()
        return PodHandle(pod, spec.name, spec.namespace, self.backend, ip or None)

    def _make_pod_dir(self, spec: PodSpec, directory: Path) -> None:
        """The pod's directory: etc files (filled once the IP is known), ns files, infra root."""
        directory.mkdir(mode=0o711, parents=True)
        write_etc_files(spec, directory / "etc", pod_ip=None)
        ns = directory / "ns"
        ns.mkdir(mode=0o700)
        for name in (*_SHARED_NS, "net"):
            (ns / name).touch(mode=0o444)
        if spec.host_network:
            _bind("/proc/self/ns/net", ns / "net")
        if infra_extensions(spec.metadata.annotations):
            (directory / "infra").mkdir(mode=0o700)
        root = directory / "infra-root"
        root.mkdir(mode=0o755)
        _bind("/", root, readonly=True)

    def _config(
        self,
        spec: PodSpec,
        c: Container,
        directory: Path,
        netns: Path,
        volumes: dict[str, Path],
        ip: str,
        host_ip: str,
    ) -> ContainerConfig:
        cid = container_id(spec.id, c.name)
        sc = c.security_context
        user = None
        if sc.run_as_user is not None:
            user = f"{sc.run_as_user}:{sc.run_as_group if sc.run_as_group is not None else 0}"
        namespaces = {"network": str(netns)}
        namespaces["ipc"] = str(directory / "ns" / "ipc")
        namespaces["uts"] = str(directory / "ns" / "uts")
        if spec.share_process_namespace:
            namespaces["pid"] = str(directory / "ns" / "pid")
        env = resolve_env(c, spec, RuntimeFields(pod_ip=ip, host_ip=host_ip))
        env.setdefault("HOSTNAME", spec.effective_hostname)
        return ContainerConfig(
            name=cid,
            command=c.command,
            args=c.args,
            env=env,
            working_dir=c.working_dir,
            user=user,
            readonly_rootfs=sc.read_only_root_filesystem,
            capabilities_add=sc.capabilities.add,
            capabilities_drop=sc.capabilities.drop,
            no_new_privileges=sc.allow_privilege_escalation is not True,
            privileged=sc.privileged,
            resources=BundleResources(
                memory_bytes=c.resources.limits.memory_bytes or DEFAULT_MEMORY_BYTES,
                cpu_millicores=c.resources.limits.cpu_millicores,
            ),
            namespaces=namespaces,
            mounts=[*etc_mounts(directory / "etc"), *container_mounts(c, spec, volumes)],
            annotations=kubernetes_annotations(spec, c.name),
        )

    async def _bundle(
        self,
        rollback: Rollback,
        pod: str,
        c: Container,
        image: Image,
        config: ContainerConfig,
        where: _Where,
    ) -> None:
        cid = config.name
        try:
            rootfs = await self._make(
                rollback,
                pod,
                "rootfs",
                cid,
                {},
                lambda: self.images.prepare_rootfs(image, cid),
            )
            bundle_dir = self.paths.bundles / cid
            await self._make(
                rollback,
                pod,
                "bundle",
                cid,
                {"path": str(bundle_dir)},
                lambda: finish_in_thread(
                    self.builder.build_oci_bundle, image, config, rootfs.path, bundle_dir
                ),
            )
        except Exception:  # the first to fail is named (siblings are not cancelled)
            where.container = where.container or c.name
            raise

    async def _rebuild_for_ip(
        self,
        spec: PodSpec,
        pod: str,
        *,
        images: dict[str, Image],
        ip: str,
        host_ip: str,
        directory: Path,
        netns: Path,
        volumes: dict[str, Path],
    ) -> None:
        """Rewrite the config of containers whose env refers to the pod's or host's IP."""
        for c in (*spec.init_containers, *spec.containers):
            if not any(v.field_ref in _NETWORK_FIELDS for v in c.env):
                continue
            cid = container_id(pod, c.name)
            config = self._config(spec, c, directory, netns, volumes, ip, host_ip)
            rootfs = self.images.snapshots.rootfs(cid)
            assert rootfs is not None
            await finish_in_thread(
                self.builder.build_oci_bundle,
                images[c.image],
                config,
                rootfs.path,
                self.paths.bundles / cid,
            )

    async def _infra_bundle(
        self,
        rollback: Rollback,
        spec: PodSpec,
        directory: Path,
        netns: Path,
        where: _Where,
        extensions: Mapping[str, str],
    ) -> None:
        cid = infra_id(spec.id)
        command = [sys.executable, "-I", "-m", "magikrun.infra", spec.id]
        mounts = _python_mounts()
        if extensions:
            command.append(_INFRA_DIR)
            mounts = [
                *_python_mounts(infra_path()),
                Mount(destination=_INFRA_DIR, source=str(directory / "infra"), options=("bind",)),
            ]
        config = ContainerConfig(
            name=cid,
            command=command,
            hostname=spec.effective_hostname,
            readonly_rootfs=True,
            capabilities_drop=("ALL",),
            namespaces={"network": str(netns)},
            mounts=mounts,
            resources=BundleResources(memory_bytes=DEFAULT_MEMORY_BYTES),
        )
        bundle_dir = self.paths.bundles / cid
        try:
            await self._make(
                rollback,
                spec.id,
                "bundle",
                cid,
                {"path": str(bundle_dir)},
                lambda: finish_in_thread(
                    self.builder.build_oci_bundle,
                    None,
                    config,
                    directory / "infra-root",
                    bundle_dir,
                ),
            )
        except Exception:  # the first to fail is named (siblings are not cancelled)
            where.container = where.container or "infra"
            raise

    async def _start_infra(
        self,
        rollback: Rollback,
        spec: PodSpec,
        directory: Path,
        extensions: Mapping[str, str],
        *,
        ip: str | None,
    ) -> InfraLink | None:
        """Start the infra container; with extensions, wait until each one started."""
        pod = spec.id
        cid = infra_id(pod)
        if extensions:
            meta = spec.metadata
            await finish_in_thread(
                write_pod_config,
                directory / "infra",
                name=spec.name,
                namespace=spec.namespace,
                uid=meta.uid or pod,
                labels=meta.labels,
                annotations=meta.annotations,
                pod_ip=ip,
                placement="native",
                grace=float(spec.termination_grace_period_seconds),
                extensions=extensions,
                path=infra_path(),
            )
        state = await self._create(rollback, pod, cid)
        assert state.pid is not None
        await finish_in_thread(_hold_namespaces, state.pid, directory / "ns")
        await self.runtime.start(cid)
        if not extensions:
            return None

        link = await InfraLink.connect_unix(
            directory / "infra",
            on_port=functools.partial(forward_port, self.paths, pod),
            pod_id=pod,
        )
        rollback.push("infra-link", link.aclose)
        await link.wait_ready()
        return link

    async def _tell_started(self, link: InfraLink | None, pod: str, name: str) -> None:
        if link is not None:
            state = await self.runtime.state(container_id(pod, name))
            await link.send(ContainerStarted(name=name, pid=state.pid or 0))

    async def _run_init(
        self, rollback: Rollback, pod: str, init: Container, link: InfraLink | None
    ) -> None:
        cid = container_id(pod, init.name)
        await self._create(rollback, pod, cid)
        await _tell(link, ContainerCreated(name=init.name))
        await self.runtime.start(cid)
        await self._tell_started(link, pod, init.name)
        code = await self.runtime.wait(cid)
        await _tell(link, ContainerExited(name=init.name, exit_code=code, reason=_reason(code)))
        if code != 0:
            output = log_tail(self.containers.log_path(cid))
            raise init_container_failed(pod, init.name, code, output)

    async def exec(
        self,
        pod_id: str,
        container: str | None,
        argv: Sequence[str],
        *,
        timeout: float = EXEC_TIMEOUT,
    ) -> ExecResult:
        """Run ``argv`` in an app container (the first one when ``container`` is None)."""
        cid, argv = await self._exec_checked(pod_id, container, argv)
        return await self.runtime.exec(cid, argv, timeout=timeout)
