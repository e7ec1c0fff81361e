"""MicroVM pods: the pod's containers run by crun inside one QEMU VM of their own.

Every image is pulled and every container's root filesystem (an overlay) and bundle
are made on the host, then shared into the guest over 9p at the same paths, so the
bundles hold valid paths there; vminit mounts them and starts each container with
``crun run``. The VM belongs to a detached keeper process
(:mod:`magikrun.runtime._microvm`) through which ``exec``, ``status``, ``logs`` and
``stop`` go. The keeper's and QEMU's pid files are pod resources recorded before
either process exists, so rollback, ``delete`` and ``system gc`` end an orphaned QEMU.

The network is the native pods' own: a network namespace attached by the same CNI
chain (bridge ``magikrun0``, host-local, portmap for ``hostPort``), with the same
recorded resources, so rollback, ``delete`` and ``system gc`` undo it the same way.
The VM's NIC is a tap inside that namespace, redirected to and from the CNI's ``eth0``
(:mod:`magikrun.runtime._tap`); the guest takes the pod IP, so the pod IP and
``hostPort`` reach the guest as they reach a native pod. Where that cannot be set up
here, QEMU user-mode networking (``hostPort`` forwards on 127.0.0.1) stands in, and
the pod's status message says so and why, next to the accelerator.

Init containers run in the guest, one by one, before the app containers; one that
exits non-zero fails the boot as it fails a native pod. With infra extensions
(``magikrun.io/infra-extensions``), vminit runs the host's infra program unchanged
before any container, from the host's Python and the ``$MAGIKRUN_INFRA_PATH``
directories shared read-only; it reads the ``pod.json`` written here into the pod's
shared ``infra`` directory, hears the containers' events from vminit, and has its port
requests answered by the keeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from .._threads import finish_in_thread
from ..errors import (
    BackendFailed,
    InvalidArgument,
    MagikrunError,
    PodError,
    PodNetworkError,
    PodNotFound,
    VmBootFailed,
)
from ..image import BundleBuilder, ContainerConfig, Image, ImageService, ProgressCallback
from ..infra._host import extension_failed, infra_path, resolve_extensions, write_pod_config
from ..platform._limits import (
    EXEC_TIMEOUT,
    MAX_VCPUS,
    MAX_VM_MEMORY_MIB,
    RESTART_BACKOFF_BASE,
    RESTART_BACKOFF_CAP,
    VM_BOOT_TIMEOUT,
)
from ..platform._paths import Paths
from ..runtime import ExecResult
from ..runtime._microvm import (
    CRUN,
    GUEST_ADDRESS,
    ask,
    ask_one,
    crun_run,
    exec_result,
    spawn_keeper,
    vm_alive,
)
from ..runtime._qemu import python_shares
from ..runtime._store import stop_pid_file
from ..runtime._tap import tap_unavailable_reason
from ..runtime._trace import trace
from ..vminit._client import INFRA_GUEST_DIR
from ._base import (
    PodRuntimeBase,
    _Where,
    container_id,
    init_container_failed,
    kubernetes_annotations,
    pod_dir,
    together,
)
from ._fault import FaultHook
from ._hostfiles import etc_mounts, write_etc_files
from ._netns import create_netns
from ._network import NetworkStatus, PodNetwork, PortMapping
from ._rollback import Rollback
from ._spec import Container, PodSpec, RuntimeFields, resolve_env
from ._state import PodRecord
from ._types import ContainerInfo, LogLine, PodHandle, PodPhase, PodStatus
from ._volumes import container_mounts, prepare_volumes

__all__ = ["MicroVmPodRuntime", "vm_size"]

_VM_OVERHEAD_MIB = 256
_DEFAULT_CONTAINER_MIB = 128
_CNI_PLUGINS = ("loopback", "host-local", "bridge", "portmap")


def vm_size(spec: PodSpec) -> tuple[int, int]:
    """(vCPUs, MiB): the sum of the app containers' limits (or the largest init
    container's, which runs alone) plus overhead, bounded by the limits."""

    def millicores(cs: Sequence[Container]) -> list[int]:
        return [c.resources.limits.cpu_millicores or 0 for c in cs]

    def mib(cs: Sequence[Container]) -> list[int]:
        return [(c.resources.limits.memory_bytes or _DEFAULT_CONTAINER_MIB << 20) >> 20 for c in cs]

    cpu = max([sum(millicores(spec.containers)), *millicores(spec.init_containers)])
    memory = max([sum(mib(spec.containers)), *mib(spec.init_containers)])
    vcpus = min(max(1, -(-cpu // 1000)), MAX_VCPUS)
    return vcpus, min(memory + _VM_OVERHEAD_MIB, MAX_VM_MEMORY_MIB)


def _vm_dir(paths: Paths, pod: str) -> Path:
    return pod_dir(paths, pod) / "vm"


class MicroVmPodRuntime(PodRuntimeBase):
    """Pods whose containers share one QEMU microVM (crun inside the guest).

    Parameters:
        paths: the magikrun root.
        fault_hook: called with each step's name (tests); ``$MAGIKRUN_FAULT`` otherwise.
        network: ``"bridge"`` (a tap in the pod's netns on the CNI bridge), ``"user"``
            (QEMU user-mode networking, hostPort forwards on 127.0.0.1), or None: the
            bridge where it can be set up here, user-mode otherwise (the status says why).
        pod_network: the CNI network of bridge pods (default: ``PodNetwork(paths)``).
        boot_timeout: seconds the guest has to report every container running.
        progress: receives pull progress events.
        restart_backoff: seconds before vminit's first restart of a container (doubling).
        never_ready: test-only: the guest never reports ready (the boot deadline).
    """

    name = "microvm"
    backend = "native"
    """The containers are crun's, inside the guest (no host container records)."""

    def __init__(
        self,
        paths: Paths,
        *,
        fault_hook: FaultHook | None = None,
        network: str | None = None,
        pod_network: PodNetwork | None = None,
        boot_timeout: float = VM_BOOT_TIMEOUT,
        progress: ProgressCallback | None = None,
        restart_backoff: float = RESTART_BACKOFF_BASE,
        never_ready: bool = False,
    ) -> None:
        super().__init__(paths, fault_hook=fault_hook, restart_backoff=restart_backoff)
        if network not in (None, "bridge", "user"):
            raise InvalidArgument(
                f"unknown microVM network {network!r}", hint="use 'bridge', 'user' or None"
            )
        self.network = network
        self.pod_network = pod_network or PodNetwork(paths)
        self.boot_timeout = boot_timeout
        self.never_ready = never_ready
        self.images = ImageService(paths)
        self.builder = BundleBuilder(paths)
        self.progress = progress

    async def run_pod(self, spec: PodSpec) -> PodHandle:
        """Boot the pod's VM with every container running, or leave nothing behind."""
        trace("pod.run_pod")
        await self._ready()
        network = await self._choose_network()
        extensions = await finish_in_thread(resolve_extensions, spec.id, spec.metadata.annotations)
        record = self.store.create(spec, self.name)
        pod = record.id
        where = _Where()
        directory = pod_dir(self.paths, pod)
        async with self._rollback(spec, where) as rollback:
            rollback.push("record", lambda: self._drop_record(pod, rollback))
            self._at(where, "pull")
            images = await self._pull_all(spec, where)
            trace("pod.pulled")
            attached = None
            if network == "bridge":
                attached = await self._attach(rollback, spec, where)
                self.store.update(pod, ip=attached.ip)
                trace("pod.attached")
            ip = attached.ip if attached else None
            fields = RuntimeFields(pod_ip=ip or "", host_ip=attached.gateway if attached else "")
            self._at(where, "bundle")
            await self._make(
                rollback, pod, "poddir", pod, {"path": str(directory)},
                lambda: finish_in_thread(directory.mkdir, 0o711, True),
            )  # fmt: skip
            volumes = await finish_in_thread(prepare_volumes, spec, directory)
            rootfs: dict[str, Path] = {}
            await together(
                [
                    self._bundle(rollback, spec, c, images[c.image], volumes, rootfs, where, fields)
                    for c in (*spec.init_containers, *spec.containers)
                ]
            )
            await finish_in_thread(write_etc_files, spec, directory / "etc", pod_ip=ip)
            trace("pod.bundles")
            self._at(where, "boot")
            plan = self._plan(spec, directory, rootfs, network, attached, extensions)
            if extensions:
                await finish_in_thread(_write_infra_config, spec, directory, plan, extensions)
            vm_dir = _vm_dir(self.paths, pod)
            await self._make(
                rollback, pod, "supervisor", f"{pod}.keeper",
                {"pid_file": str(vm_dir / "keeper.pid")},
                lambda: asyncio.sleep(0),
            )  # fmt: skip
            try:
                await self._make(
                    rollback, pod, "supervisor", f"{pod}.qemu",
                    {"pid_file": str(vm_dir / "qemu.pid")},
                    lambda: spawn_keeper(self.paths, vm_dir, plan),
                )  # fmt: skip
            except VmBootFailed as exc:
                error = _boot_error(pod, where, exc)
                if error is None:
                    raise
                raise error from exc
            self.store.update(pod, state="ready")
            rollback.pop_all()
        trace("pod.ready")
        return PodHandle(pod, spec.name, spec.namespace, "microvm", ip)

    async def _choose_network(self) -> str:
        """``bridge``, or ``user (why)``; an explicit bridge that cannot work fails here."""
        if self.network == "user":
            return "user (requested)"
        missing = [
            p for p in _CNI_PLUGINS if not os.access(self.pod_network.plugin_dir / p, os.X_OK)
        ]
        reason = (
            f"CNI plugins missing from {self.pod_network.plugin_dir}: {', '.join(missing)}"
            if missing
            else await tap_unavailable_reason()
        )
        if reason is None:
            return "bridge"
        if self.network == "bridge":
            raise PodNetworkError(
                f"a microVM pod cannot be put on the bridge here: {reason}",
                hint="install what is missing, or run the pod with network 'user'",
            )
        return f"user ({reason})"

    async def _attach(self, rollback: Rollback, spec: PodSpec, where: _Where) -> NetworkStatus:
        """The pod's netns on the CNI bridge with its host ports, as native pods get it."""
        pod = spec.id
        netns = self.pod_network.netns_path(pod)
        self._at(where, "netns")
        await self._make(
            rollback, pod, "netns", pod, {"path": str(netns)},
            lambda: finish_in_thread(create_netns, netns),
        )  # fmt: skip
        self._at(where, "network")
        data = {
            "bridge": self.pod_network.bridge,
            "subnet": self.pod_network.subnet,
            "netns": str(netns),
        }
        return await self._make(
            rollback, pod, "network", pod, data,
            lambda: self.pod_network.add(pod, netns, PortMapping.from_spec(spec)),
        )  # fmt: skip

    async def _bundle(
        self,
        rollback: Rollback,
        spec: PodSpec,
        c: Container,
        image: Image,
        volumes: dict[str, Path],
        rootfs: dict[str, Path],
        where: _Where,
        fields: RuntimeFields,
    ) -> None:
        cid = container_id(spec.id, c.name)
        env = resolve_env(c, spec, fields)
        env.setdefault("HOSTNAME", spec.effective_hostname)
        config = ContainerConfig(
            name=cid,
            command=c.command,
            args=c.args,
            env=env,
            working_dir=c.working_dir,
            mounts=[
                *etc_mounts(pod_dir(self.paths, spec.id) / "etc"),
                *container_mounts(c, spec, volumes),
            ],
            annotations=kubernetes_annotations(spec, c.name),
        )
        bundle_dir = self.paths.bundles / cid
        try:
            made = await self._make(
                rollback, spec.id, "rootfs", cid, {},
                lambda: self.images.prepare_rootfs(image, cid),
            )  # fmt: skip
            rootfs[c.name] = made.path

            def build() -> None:
                self.builder.build_oci_bundle(image, config, made.path, bundle_dir)
                _join_guest_network(bundle_dir / "config.json")

            await self._make(
                rollback, spec.id, "bundle", cid, {"path": str(bundle_dir)},
                lambda: finish_in_thread(build),
            )  # fmt: skip
        except Exception:  # the first to fail is named (siblings are not cancelled)
            where.container = where.container or c.name
            raise

    def _plan(
        self,
        spec: PodSpec,
        directory: Path,
        rootfs: dict[str, Path],
        network: str,
        attached: NetworkStatus | None,
        extensions: Mapping[str, str],
    ) -> dict[str, Any]:
        """What the keeper boots: shares, the containers' crun commands, size, network,
        the pod IP the guest has, and the infra program when the pod has extensions."""
        shares = [str(directory)]
        init, processes = [], []
        for c in (*spec.init_containers, *spec.containers):
            cid = container_id(spec.id, c.name)
            bundle = self.paths.bundles / cid
            shares += [str(bundle), str(rootfs[c.name])]
            process: dict[str, Any] = {
                "name": c.name,
                "cid": cid,
                "argv": crun_run(bundle, cid),
            }
            if c in spec.init_containers:
                init.append(process)
                continue
            process.update(
                restart=spec.restart_policy.value,
                backoff=self.restart_backoff,
                backoff_cap=RESTART_BACKOFF_CAP,
            )
            processes.append(process)
        infra = None
        read_only: tuple[str, ...] = ()
        if extensions:
            infra = {
                "argv": [sys.executable, "-I", "-m", "magikrun.infra", spec.id, INFRA_GUEST_DIR],
                "config": str(directory / "infra" / "pod.json"),
                "grace": float(spec.termination_grace_period_seconds),
            }
            read_only = python_shares(infra_path())
        forwards = sorted(
            {
                (p.host_port, p.container_port)
                for c in spec.containers
                for p in c.ports
                if p.host_port
            }
        )
        tap = None
        if attached is not None:
            if not attached.mac:
                raise PodNetworkError(
                    f"the CNI result for pod {spec.id} names no MAC for {attached.interface}",
                    pod_id=spec.id,
                )
            tap = {
                "netns": str(self.pod_network.netns_path(spec.id)),
                "mac": attached.mac,
                "address": f"{attached.ip}/{attached.prefix_length}",
                "gateway": attached.gateway,
                "pod_id": spec.id,
            }
        vcpus, memory = vm_size(spec)
        return {
            "vcpus": vcpus,
            "memory_mib": memory,
            "shares": shares,
            "read_only_shares": list(read_only),
            "init": init,
            "processes": processes,
            "network": network,
            "forwards": None if tap else forwards,
            "tap": tap,
            "infra": infra,
            "pod_ip": attached.ip if attached else GUEST_ADDRESS.split("/")[0],
            "boot_timeout": self.boot_timeout,
            "never_ready": self.never_ready,
        }

    # -- status, exec, logs, stop --------------------------------------------------

    def _status(self, record: PodRecord) -> PodStatus:
        vm_dir = _vm_dir(self.paths, record.id)
        state = _read_json(vm_dir / "state.json")
        network = _read_json(vm_dir / "plan.json").get("network", "?")
        running = vm_alive(vm_dir)
        guest = cast(dict[str, dict[str, Any]], state.get("containers", {}))
        inits = [
            _info(c, guest.get(c.name), running, init=True) for c in record.spec.init_containers
        ]
        infos = [_info(c, guest.get(c.name), running, init=False) for c in record.spec.containers]
        net = f"network {network}, accelerator {state.get('accel', '?')}"
        if record.state == "creating":
            phase = PodPhase.PENDING if record.owner_alive() else PodPhase.UNKNOWN
            message = net
        elif record.state == "failed":
            phase, message = PodPhase.FAILED, "a rollback did not finish; run 'magikrun system gc'"
        elif record.state == "stopped":
            done = all(i.state == "terminated" for i in infos)
            ok = done and all(i.exit_code == 0 for i in infos)
            phase, message = (PodPhase.SUCCEEDED if ok else PodPhase.FAILED), f"stopped; {net}"
        elif not running:
            phase, message = PodPhase.FAILED, f"the VM is gone (QEMU exited); {net}"
        elif any(i.state in ("running", "waiting") for i in infos):
            phase, message = PodPhase.RUNNING, net
        else:
            ok = all(i.exit_code == 0 for i in infos)
            phase, message = (PodPhase.SUCCEEDED if ok else PodPhase.FAILED), net
        return record.status(phase, (*inits, *infos), message)

    async def pod_status(self, pod_id: str) -> PodStatus:
        await self._ready()
        record = self.store.get(pod_id)
        if record.state == "ready":
            with contextlib.suppress(BackendFailed):
                await ask_one(_vm_dir(self.paths, pod_id), {"op": "status"})
        return self._status(record)

    async def exec(
        self,
        pod_id: str,
        container: str | None,
        argv: Sequence[str],
        *,
        timeout: float = EXEC_TIMEOUT,
    ) -> ExecResult:
        """Run ``argv`` in a container with ``crun exec`` inside the guest."""
        cid, argv = await self._exec_checked(pod_id, container, argv)
        request = {"op": "exec", "argv": [*CRUN, "exec", cid, *argv], "timeout": timeout}
        return exec_result(await ask_one(_vm_dir(self.paths, pod_id), request))

    async def logs(
        self,
        pod_id: str,
        container: str | None = None,
        *,
        follow: bool = False,
        tail: int | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        """The containers' lines, from the guest (or the copy kept when the VM stopped)."""
        await self._ready()
        record = self.store.get(pod_id)
        names = self._container_names(record, container)
        if tail is not None and tail < 0:
            raise InvalidArgument(f"tail {tail} is negative", hint="use 0 or more lines")
        saved = _read_json(_vm_dir(self.paths, pod_id) / "logs.json")
        for name in names:
            if name in saved:
                records = saved[name] if tail is None else saved[name][len(saved[name]) - tail :]
                records = records if tail != 0 else []
            else:
                request = {"op": "logs", "name": name, "tail": tail, "follow": follow}
                vm_dir = _vm_dir(self.paths, pod_id)
                records = [m["item"] async for m in ask(vm_dir, request) if "item" in m]
            for item in records:
                yield LogLine(name, item["stream"], _time(item["time"]), item["line"])

    async def stop_pod(self, pod_id: str, grace: float | None = None) -> None:
        """TERM the containers, KILL after ``grace``; keep their logs and codes; end the VM."""
        await self._ready()
        record = self.store.get(pod_id)
        self._refuse_creating(record, "stop")
        wait = float(record.spec.termination_grace_period_seconds if grace is None else grace)
        if wait < 0:
            raise InvalidArgument(f"grace {grace} is negative", hint="use 0 or more seconds")
        vm_dir = _vm_dir(self.paths, pod_id)
        with contextlib.suppress(BackendFailed):
            await ask_one(vm_dir, {"op": "stop", "grace": wait})
        await stop_pid_file(vm_dir / "keeper.pid")
        await stop_pid_file(vm_dir / "qemu.pid")
        self.store.update(pod_id, state="stopped")

    async def delete_pod(self, pod_id: str, force: bool = False) -> None:
        """Remove the VM and everything of the pod on the host (see the base class)."""
        try:
            await super().delete_pod(pod_id, force=force)
        except PodNotFound:
            return


def _info(
    c: Container, found: dict[str, Any] | None, running: bool, *, init: bool
) -> ContainerInfo:
    """A container as the guest last reported it (``running``: whether its VM still runs)."""
    count = 0 if found is None else int(found.get("restarts", 0))
    if found is None or (found["state"] == "running" and not running):
        reason = "VmGone" if found else "ContainerCreating"
        return ContainerInfo(c.name, c.image, "waiting", None, reason, None, None, 0, init)
    if found["state"] == "running":
        return ContainerInfo(c.name, c.image, "running", None, None, None, None, count, init)
    if found.get("restarting") and running:
        return ContainerInfo(
            c.name, c.image, "waiting", None, "CrashLoopBackOff", None, None, count, init
        )
    code = int(found["exit_code"])
    reason = "Completed" if code == 0 else ("Killed" if code == 137 else "Error")
    return ContainerInfo(c.name, c.image, "terminated", code, reason, None, None, count, init)


def _write_infra_config(
    spec: PodSpec, directory: Path, plan: dict[str, Any], extensions: Mapping[str, str]
) -> None:
    """``pod.json`` in the pod's shared ``infra`` directory, beside the extensions' state."""
    infra = directory / "infra"
    (infra / "state").mkdir(mode=0o700, parents=True)
    meta = spec.metadata
    write_pod_config(
        infra,
        name=spec.name,
        namespace=spec.namespace,
        uid=meta.uid or spec.id,
        labels=meta.labels,
        annotations=meta.annotations,
        pod_ip=plan["pod_ip"],
        placement="microvm",
        grace=float(spec.termination_grace_period_seconds),
        extensions=extensions,
        path=infra_path(),
    )


def _boot_error(pod: str, where: _Where, exc: VmBootFailed) -> MagikrunError | None:
    """The error a native pod would raise where the guest says why the boot failed."""
    subject = exc.subject
    if "init_container" in subject:
        where.step, where.container = "init", str(subject["init_container"])
        text = str(subject.get("output") or "")
        output = text.split("\n") if text else []
        return init_container_failed(pod, where.container, int(subject["exit_code"]), output)
    if "infra_error" in subject:
        where.step, where.container = "infra", None
        if subject.get("extension") is None:
            return PodError(
                f"the infra program of pod {pod} ended before its extensions started: "
                f"{subject['infra_error']}",
                hint="check that magikrun and the extensions are installed for this Python",
                pod_id=pod,
            )
        return extension_failed(pod, str(subject["extension"]), str(subject["infra_error"]))
    return None


def _join_guest_network(config_json: Path) -> None:
    """Drop the new network namespace: the pod's network is the guest's own."""
    spec = json.loads(config_json.read_text())
    namespaces = spec["linux"]["namespaces"]
    spec["linux"]["namespaces"] = [n for n in namespaces if n["type"] != "network"]
    config_json.write_text(json.dumps(spec))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _time(text: str) -> datetime:
    head, _, rest = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{rest[:6].ljust(6, '0')}").replace(tzinfo=UTC)
