"""MicroVM pods: the pod's containers run by crun inside one QEMU VM of their own.

Every image is pulled and every container's root filesystem (an overlay) and bundle
are made on the host, then shared into the guest over 9p at the same paths, so the
bundles hold valid paths there; vminit mounts them and starts each container with
``crun run``. The VM is owned by a detached *keeper* process, because the control
channel is a socket only the process that started QEMU holds: the keeper boots the
VM, reports ready (or why not) on a pipe, and then relays ``exec``, ``status``,
``logs`` and ``stop`` from a unix socket in the pod's private ``vm`` directory. Its
pid file and QEMU's are pod resources recorded before either process exists, so
rollback, ``delete`` and ``system gc`` end an orphaned QEMU.

Networking is QEMU user-mode (``hostPort`` forwards on 127.0.0.1); the pod's status
message names it and the accelerator. The tap-in-netns design is not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from .. import _process
from ..errors import InvalidArgument, PodError, PodNotFound, VmBootFailed
from ..image import BundleBuilder, ContainerConfig, Image, ImageService, ProgressCallback
from ..platform._limits import EXEC_TIMEOUT, MAX_VCPUS, MAX_VM_MEMORY_MIB, VM_BOOT_TIMEOUT
from ..platform._paths import Paths
from ..runtime import ExecResult
from ..runtime._store import process_start_time
from ._base import PodRuntimeBase, _Where, container_id, pod_dir, together
from ._fault import FaultHook
from ._rollback import Rollback
from ._spec import Container, PodSpec, resolve_env
from ._state import PodRecord
from ._types import ContainerInfo, LogLine, PodHandle, PodPhase, PodStatus, RuntimeName
from ._undo import read_pid_file, stop_process
from ._volumes import container_mounts, prepare_volumes

__all__ = ["MicroVmPodRuntime", "keeper_main", "vm_size"]

GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
_CRUN = ("crun", "--root", "/run/crun")
_VM_OVERHEAD_MIB = 256
_DEFAULT_CONTAINER_MIB = 128
_STOP_POLL = 0.2
_KEEPER_BOOTSTRAP = """
import json, os, sys
pid_file, path, status_fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
if os.fork():
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
log = os.open(pid_file + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
os.dup2(null, 0); os.dup2(null, 1); os.dup2(log, 2); os.close(null); os.close(log)
with open("/proc/self/stat", "rb") as f:
    start = f.read().rsplit(b")", 1)[1].split()[19].decode()
with open(pid_file + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {start}")
os.replace(pid_file + ".tmp", pid_file)
sys.path[:] = path
from magikrun.pod._microvm import keeper_main
keeper_main(sys.argv[4:], status_fd)
"""
"""Starts the keeper detached (double fork, own session); the pid file is out before the imports."""


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
        never_ready: bool = False,
    ) -> None:
        super().__init__(paths, fault_hook=fault_hook)
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
            images: dict[str, Image] = {}
            await together([self._pull(c, images, where) for c in spec.containers])
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
            await asyncio.to_thread(vm_dir.mkdir, 0o700)
            (vm_dir / "plan.json").write_text(json.dumps(plan))
            await self._make(
                rollback, pod, "supervisor", f"{pod}.keeper",
                {"pid_file": str(vm_dir / "keeper.pid")},
                lambda: asyncio.sleep(0),
            )  # fmt: skip
            await self._make(
                rollback, pod, "supervisor", f"{pod}.qemu",
                {"pid_file": str(vm_dir / "qemu.pid")},
                lambda: self._spawn_keeper(pod, vm_dir),
            )  # fmt: skip
            self.store.update(pod, state="ready")
            rollback.pop_all()
        return PodHandle(pod, spec.name, spec.namespace, "microvm", None)

    async def _pull(self, c: Container, images: dict[str, Image], where: _Where) -> None:
        try:
            images[c.image] = await self.images.pull(
                c.image, policy=c.image_pull_policy.value, progress=self.progress
            )
        except Exception:  # the first to fail is named (siblings are not cancelled)
            where.container = where.container or c.name
            raise

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
            argv = [*_CRUN, "run", "--bundle", str(bundle), cid]
            processes.append({"name": c.name, "argv": argv})
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
            "pod": spec.id,
            "run": str(self.paths.run),
            "data": str(self.paths.data),
            "vcpus": vcpus,
            "memory_mib": memory,
            "shares": shares,
            "processes": processes,
            "forwards": forwards,
            "boot_timeout": self.boot_timeout,
            "never_ready": self.never_ready,
        }

    async def _spawn_keeper(self, pod: str, vm_dir: Path) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            argv = [
                sys.executable, "-I", "-S", "-c", _KEEPER_BOOTSTRAP,
                str(vm_dir / "keeper.pid"), json.dumps(sys.path), str(write_fd),
                str(self.paths.data), str(self.paths.run), pod,
            ]  # fmt: skip
            done = await _process.run(argv, timeout=30.0, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        try:
            if done.returncode != 0:
                raise PodError(
                    f"the microVM keeper of pod {pod} did not start: "
                    f"{done.stderr.decode(errors='replace').strip()}",
                    hint="check that magikrun is installed for this Python",
                    pod_id=pod,
                )
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
            )
            read_fd = -1
            try:
                async with asyncio.timeout(self.boot_timeout + 30.0):
                    line = await reader.readline()
            finally:
                transport.close()
        finally:
            if read_fd >= 0:
                os.close(read_fd)
        answer = json.loads(line) if line else {"ok": False, "error": "the keeper died"}
        if not answer.get("ok"):
            raise VmBootFailed(str(answer.get("error")), pod_id=pod)

    # -- talking to the keeper -----------------------------------------------------

    async def _ask(self, pod: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        path = _vm_dir(self.paths, pod) / "control.sock"
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        except OSError as exc:
            raise PodError(
                f"pod {pod}'s microVM is not running ({exc.strerror})",
                hint="see 'magikrun pod status'; delete the pod and run it again",
                pod_id=pod,
            ) from exc
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            while line := await reader.readline():
                message = json.loads(line)
                if "error" in message:
                    raise PodError(str(message["error"]), pod_id=pod)
                yield message
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _ask_one(self, pod: str, request: dict[str, Any]) -> dict[str, Any]:
        async for message in self._ask(pod, request):
            return message
        raise PodError(f"pod {pod}'s microVM keeper gave no answer", pod_id=pod)

    # -- status, exec, logs, stop --------------------------------------------------

    def _status(self, record: PodRecord) -> PodStatus:
        vm_dir = _vm_dir(self.paths, record.id)
        state = _read_json(vm_dir / "state.json")
        keeper = read_pid_file(vm_dir / "keeper.pid")
        alive = keeper is not None and process_start_time(keeper[0]) == keeper[1]
        guest = cast(dict[str, dict[str, Any]], state.get("containers", {}))
        infos = []
        for c in record.spec.containers:
            found = guest.get(c.name)
            if found is None or (found["state"] == "running" and not alive):
                infos.append(
                    ContainerInfo(c.name, c.image, "waiting", None, "VmGone" if found else
                                  "ContainerCreating", None, None, 0, False)
                )  # fmt: skip
            elif found["state"] == "running":
                infos.append(
                    ContainerInfo(c.name, c.image, "running", None, None, None, None, 0, False)
                )
            else:
                code = int(found["exit_code"])
                reason = "Completed" if code == 0 else ("Killed" if code == 137 else "Error")
                infos.append(
                    ContainerInfo(c.name, c.image, "terminated", code, reason, None, None, 0, False)
                )
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
        elif not alive:
            phase, message = PodPhase.FAILED, f"the VM is gone (QEMU exited); {net}"
        elif any(i.state == "running" for i in infos):
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
            with contextlib.suppress(PodError):
                await self._ask_one(pod_id, {"op": "status"})
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
        answer = await self._ask_one(
            pod_id, {"op": "exec", "argv": [*_CRUN, "exec", cid, *argv], "timeout": timeout}
        )
        from ..vminit import ExecOutput

        out = ExecOutput.from_dict(answer["result"])
        return ExecResult(exit_code=out.exit_code, stdout=out.stdout, stderr=out.stderr)

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
                records = [m["item"] async for m in self._ask(pod_id, request) if "item" in m]
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
        with contextlib.suppress(PodError):
            await self._ask_one(pod_id, {"op": "stop", "grace": wait})
        vm_dir = _vm_dir(self.paths, pod_id)
        await stop_process(vm_dir / "keeper.pid")
        await stop_process(vm_dir / "qemu.pid")
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


# -- the keeper process -----------------------------------------------------------


class _Keeper:
    """Owns one pod's VM: boots it, relays requests, records what it last saw."""

    def __init__(self, paths: Paths, pod: str) -> None:
        from ..runtime._qemu import MicroVm, UserNetwork, VmConfig
        from ..vminit import GuestProcess

        self.directory = _vm_dir(paths, pod)
        plan = json.loads((self.directory / "plan.json").read_text())
        self.names = [p["name"] for p in plan["processes"]]
        self.cids = {p["name"]: p["argv"][-1] for p in plan["processes"]}
        gateway = GUEST_GATEWAY
        setup = (
            ("/bin/busybox", "ip", "link", "set", "lo", "up"),
            ("/bin/busybox", "ip", "addr", "add", GUEST_ADDRESS, "dev", "eth0"),
            ("/bin/busybox", "ip", "link", "set", "eth0", "up"),
            ("/bin/busybox", "ip", "route", "add", "default", "via", gateway),
        )
        config = VmConfig(
            vcpus=plan["vcpus"],
            memory_mib=plan["memory_mib"],
            processes=tuple(
                GuestProcess(name=p["name"], argv=tuple(p["argv"])) for p in plan["processes"]
            ),
            network=UserNetwork(host_forwards=tuple((h, g) for h, g in plan["forwards"])),
            boot_timeout=float(plan["boot_timeout"]),
            never_ready=bool(plan["never_ready"]),
            shares=tuple((f"pod.{i}", path) for i, path in enumerate(plan["shares"])),
            setup=setup,
        )
        self.vm = MicroVm(paths, config)
        self.accel = ""
        self.containers: dict[str, Any] = {}

    def save(self, name: str, data: object) -> None:
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.directory / name)

    def save_state(self) -> None:
        self.save("state.json", {"accel": self.vm.accel, "containers": self.containers})

    async def refresh(self) -> None:
        self.containers = await self.vm.client.status()
        self.save_state()

    async def boot(self) -> None:
        qemu_pid = self.directory / "qemu.pid"
        boot = asyncio.ensure_future(self.vm.boot())
        while not boot.done():
            pid = self.vm.pid
            if pid is not None and not qemu_pid.exists():
                qemu_pid.write_text(f"{pid} {process_start_time(pid)}")
            await asyncio.wait({boot}, timeout=0.05)
        boot.result()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.vm.config.boot_timeout
        while True:
            await self.refresh()
            failed = {n: i for n, i in self.containers.items() if i["state"] != "running"}
            if failed or all([await self.created(n) for n in self.names]):
                break
            if loop.time() > deadline:
                raise VmBootFailed(
                    f"the containers did not all run within {self.vm.config.boot_timeout} s",
                    hint="see the pod's logs and the images' commands",
                )
            await asyncio.sleep(_STOP_POLL)
        if failed:
            logs = {n: [r.line async for r in self.vm.client.logs(n)] for n in failed}
            raise PodError(
                "containers failed in the VM: "
                + "; ".join(
                    f"{n} exited {i['exit_code']}: {' / '.join(logs[n][-3:])}"
                    for n, i in failed.items()
                ),
                hint="see the container's command and image",
            )

    async def created(self, name: str) -> bool:
        """Whether crun in the guest has the container running (not merely being made)."""
        out = await self.vm.client.exec([*_CRUN, "state", self.cids[name]])
        return out.exit_code == 0 and json.loads(out.stdout).get("status") == "running"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(message: dict[str, Any]) -> None:
            writer.write(json.dumps(message).encode() + b"\n")

        try:
            request = json.loads(await reader.readline())
            op = request.get("op")
            client = self.vm.client
            if op == "status":
                await self.refresh()
                send({"result": self.containers})
            elif op == "exec":
                out = await client.exec(
                    [str(a) for a in request["argv"]], timeout=float(request["timeout"])
                )
                send({"result": out.to_dict()})
            elif op == "logs":
                async for record in client.logs(
                    str(request["name"]), tail=request.get("tail"), follow=bool(request["follow"])
                ):
                    send({"item": record.to_dict()})
                    await writer.drain()
            elif op == "stop":
                await self.stop(float(request["grace"]))
                send({"result": None})
            else:
                send({"error": f"unknown request {op!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the asking process
            send({"error": str(exc) or type(exc).__name__})
        with contextlib.suppress(OSError):
            await writer.drain()
            writer.close()

    async def stop(self, grace: float) -> None:
        """TERM then KILL each container; keep codes and logs on the host; power off."""
        client = self.vm.client
        for sig, wait in (("TERM", grace), ("KILL", 10.0)):
            await self.refresh()
            running = [n for n, i in self.containers.items() if i["state"] == "running"]
            if not running:
                break
            for name in running:
                await client.exec([*_CRUN, "kill", self.cids[name], sig])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while loop.time() < deadline:
                await self.refresh()
                if all(i["state"] != "running" for i in self.containers.values()):
                    break
                await asyncio.sleep(_STOP_POLL)
        logs = {}
        for name in self.names:
            logs[name] = [r.to_dict() async for r in client.logs(name)]
        self.save("logs.json", logs)
        await self.vm.shutdown(grace=0)


async def _keep(paths: Paths, pod: str, status_fd: int) -> None:
    keeper = _Keeper(paths, pod)
    status = os.fdopen(status_fd, "w")
    try:
        await keeper.boot()
    except BaseException as exc:
        await keeper.vm.kill()
        status.write(json.dumps({"ok": False, "error": str(exc)}) + "\n")
        status.close()
        raise
    socket_path = keeper.directory / "control.sock"
    server = await asyncio.start_unix_server(keeper.handle, str(socket_path), limit=1 << 24)
    status.write(json.dumps({"ok": True, "accel": keeper.vm.accel}) + "\n")
    status.close()
    loop = asyncio.get_running_loop()
    ended = asyncio.ensure_future(keeper.vm.wait())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ended.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await ended
    server.close()
    await keeper.vm.kill()
    socket_path.unlink(missing_ok=True)


def keeper_main(argv: list[str], status_fd: int) -> None:
    """The keeper process: ``DATA RUN POD`` (started by ``_KEEPER_BOOTSTRAP``)."""
    data, run, pod = argv
    paths = Paths(data=Path(data), run=Path(run))
    asyncio.run(_keep(paths, pod, status_fd))
