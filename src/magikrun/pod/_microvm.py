"""MicroVM pods: the pod's containers run by crun inside one QEMU VM of their own.

Every image is pulled and every container's root filesystem (an overlay) and bundle
are made on the host, then shared into the guest over 9p at the same paths, so the
bundles hold valid paths there; vminit mounts them and starts each container with
``crun run``. The VM belongs to a detached keeper process
(:mod:`magikrun.runtime._microvm`) through which ``exec``, ``status``, ``logs`` and
``stop`` go. The keeper's and QEMU's pid files are pod resources recorded before
either process exists, so rollback, ``delete`` and ``system gc`` end an orphaned QEMU.

Networking is QEMU user-mode (``hostPort`` forwards on 127.0.0.1); the pod's status
message names it and the accelerator. The tap-in-netns design is not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from ..errors import BackendFailed, InvalidArgument, PodNotFound
from ..image import BundleBuilder, ContainerConfig, Image, ImageService, ProgressCallback
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
    ask,
    ask_one,
    crun_run,
    exec_result,
    spawn_keeper,
    vm_alive,
)
from ..runtime._store import stop_pid_file
from ._base import PodRuntimeBase, _Where, container_id, pod_dir, together
from ._fault import FaultHook
from ._rollback import Rollback
from ._spec import Container, PodSpec, resolve_env
from ._state import PodRecord
from ._types import ContainerInfo, LogLine, PodHandle, PodPhase, PodStatus, RuntimeName
from ._volumes import container_mounts, prepare_volumes

__all__ = ["MicroVmPodRuntime", "vm_size"]

_VM_OVERHEAD_MIB = 256
_DEFAULT_CONTAINER_MIB = 128


def vm_size(spec: PodSpec) -> tuple[int, int]:
    """(vCPUs, MiB): the sum of the containers' limits plus overhead, bounded by the limits."""
    millicores = sum(c.resources.limits.cpu_millicores or 0 for c in spec.containers)
    memory = sum(
        (c.resources.limits.memory_bytes or _DEFAULT_CONTAINER_MIB << 20) >> 20
        for c in spec.containers
    )
    vcpus = min(max(1, -(-millicores // 1000)), MAX_VCPUS)
    return vcpus, min(memory + _VM_OVERHEAD_MIB, MAX_VM_MEMORY_MIB)


def _vm_dir(paths: Paths, pod: str) -> Path:
    return pod_dir(paths, pod) / "vm"


class MicroVmPodRuntime(PodRuntimeBase):
    """Pods whose containers share one QEMU microVM (crun inside the guest).

    Parameters:
        paths: the magikrun root.
        fault_hook: called with each step's name (tests); ``$MAGIKRUN_FAULT`` otherwise.
        network: ``"user"`` (QEMU user-mode networking, hostPort forwards on 127.0.0.1);
            the only kind built so far, named in the pod's status.
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
        boot_timeout: float = VM_BOOT_TIMEOUT,
        progress: ProgressCallback | None = None,
        restart_backoff: float = RESTART_BACKOFF_BASE,
        never_ready: bool = False,
    ) -> None:
        super().__init__(paths, fault_hook=fault_hook, restart_backoff=restart_backoff)
        if network not in (None, "user"):
            raise InvalidArgument(
                f"unknown microVM network {network!r}",
                hint="use 'user' (the tap-in-netns network is not built yet)",
            )
        self.network = "user"
        self.boot_timeout = boot_timeout
        self.never_ready = never_ready
        self.images = ImageService(paths)
        self.builder = BundleBuilder(paths)
        self.progress = progress

    async def run_pod(self, spec: PodSpec) -> PodHandle:
        """Boot the pod's VM with every container running, or leave nothing behind."""
        if spec.init_containers:
            raise InvalidArgument(
                "microVM pods do not run init containers yet",
                hint="run this pod with runtimeClassName: magikrun-native",
            )
        await self._ready()
        record = self.store.create(spec, self.name)
        pod = record.id
        where = _Where()
        directory = pod_dir(self.paths, pod)
        async with self._rollback(spec, where) as rollback:
            rollback.push("record", lambda: self._drop_record(pod, rollback))
            self._at(where, "pull")
            images = await self._pull_all(spec, where)
            self._at(where, "bundle")
            await self._make(
                rollback, pod, "poddir", pod, {"path": str(directory)},
                lambda: asyncio.to_thread(directory.mkdir, 0o711, True),
            )  # fmt: skip
            volumes = await asyncio.to_thread(prepare_volumes, spec, directory)
            rootfs: dict[str, Path] = {}
            await together(
                [
                    self._bundle(rollback, spec, c, images[c.image], volumes, rootfs, where)
                    for c in spec.containers
                ]
            )
            self._at(where, "boot")
            plan = self._plan(spec, directory, rootfs)
            vm_dir = _vm_dir(self.paths, pod)
            await self._make(
                rollback, pod, "supervisor", f"{pod}.keeper",
                {"pid_file": str(vm_dir / "keeper.pid")},
                lambda: asyncio.sleep(0),
            )  # fmt: skip
            await self._make(
                rollback, pod, "supervisor", f"{pod}.qemu",
                {"pid_file": str(vm_dir / "qemu.pid")},
                lambda: spawn_keeper(self.paths, vm_dir, plan),
            )  # fmt: skip
            self.store.update(pod, state="ready")
            rollback.pop_all()
        return PodHandle(pod, spec.name, spec.namespace, "microvm", None)

    async def _bundle(
        self,
        rollback: Rollback,
        spec: PodSpec,
        c: Container,
        image: Image,
        volumes: dict[str, Path],
        rootfs: dict[str, Path],
        where: _Where,
    ) -> None:
        cid = container_id(spec.id, c.name)
        env = resolve_env(c, spec)
        env.setdefault("HOSTNAME", spec.effective_hostname)
        config = ContainerConfig(
            name=cid,
            command=c.command,
            args=c.args,
            env=env,
            working_dir=c.working_dir,
            mounts=container_mounts(c, spec, volumes),
            annotations={
                "io.kubernetes.pod.name": spec.name,
                "io.kubernetes.pod.namespace": spec.namespace,
                "io.kubernetes.container.name": c.name,
            },
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
                lambda: asyncio.to_thread(build),
            )  # fmt: skip
        except Exception:  # the first to fail is named (siblings are not cancelled)
            where.container = where.container or c.name
            raise

    def _plan(self, spec: PodSpec, directory: Path, rootfs: dict[str, Path]) -> dict[str, Any]:
        """What the keeper boots: shares, the containers' crun commands, size, forwards."""
        shares = [str(directory)]
        processes = []
        for c in spec.containers:
            cid = container_id(spec.id, c.name)
            bundle = self.paths.bundles / cid
            shares += [str(bundle), str(rootfs[c.name])]
            argv = crun_run(bundle, cid)
            processes.append(
                {
                    "name": c.name,
                    "cid": cid,
                    "argv": argv,
                    "restart": spec.restart_policy.value,
                    "backoff": self.restart_backoff,
                    "backoff_cap": RESTART_BACKOFF_CAP,
                }
            )
        forwards = sorted(
            {
                (p.host_port, p.container_port)
                for c in spec.containers
                for p in c.ports
                if p.host_port
            }
        )
        vcpus, memory = vm_size(spec)
        return {
            "vcpus": vcpus,
            "memory_mib": memory,
            "shares": shares,
            "processes": processes,
            "forwards": forwards,
            "boot_timeout": self.boot_timeout,
            "never_ready": self.never_ready,
        }

    # -- status, exec, logs, stop --------------------------------------------------

    def _status(self, record: PodRecord) -> PodStatus:
        vm_dir = _vm_dir(self.paths, record.id)
        state = _read_json(vm_dir / "state.json")
        running = vm_alive(vm_dir)
        guest = cast(dict[str, dict[str, Any]], state.get("containers", {}))
        infos = []
        for c in record.spec.containers:
            found = guest.get(c.name)
            count = 0 if found is None else int(found.get("restarts", 0))
            if found is None or (found["state"] == "running" and not running):
                reason = "VmGone" if found else "ContainerCreating"
                info = ContainerInfo(c.name, c.image, "waiting", None, reason, None, None, 0, False)
            elif found["state"] == "running":
                info = ContainerInfo(
                    c.name, c.image, "running", None, None, None, None, count, False
                )
            elif found.get("restarting") and running:
                info = ContainerInfo(
                    c.name, c.image, "waiting", None, "CrashLoopBackOff", None, None, count, False
                )
            else:
                code = int(found["exit_code"])
                reason = "Completed" if code == 0 else ("Killed" if code == 137 else "Error")
                info = ContainerInfo(
                    c.name, c.image, "terminated", code, reason, None, None, count, False
                )
            infos.append(info)
        net = f"network {self.network}, accelerator {state.get('accel', '?')}"
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
        return PodStatus(
            id=record.id,
            name=record.name,
            namespace=record.namespace,
            runtime=cast(RuntimeName, record.runtime),
            phase=phase,
            ip=record.ip,
            containers=tuple(infos),
            created_at=record.created,
            message=message,
        )

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
