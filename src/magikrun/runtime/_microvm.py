"""Containers in QEMU microVMs: the keeper that owns a VM, and ``MicroVmRuntime``.

The control channel to a VM's init is a socket only the process that started QEMU
holds, while the OCI verbs and ``magikrun pod`` commands come from short-lived
processes. So a detached *keeper* process boots the VM from a ``plan.json`` in a
private (0700) directory, reports ready or why not on a pipe, and then relays
``exec``, ``status``, ``logs``, ``start``, ``kill``, ``stop`` and ``port`` (host
port forwards) from a unix socket there. Its pid file and QEMU's are written before
anything else runs, so whoever cleans up (rollback, ``delete``, ``system gc``) can end
an orphaned QEMU.

Inside the guest crun runs each container from a bundle the host built, shared over
9p at its host path. ``MicroVmRuntime`` runs one container per VM: ``create`` boots
the VM with the container's ``crun run`` held behind a gate (a fifo), ``start`` opens
the gate; the keeper writes the container's CRI log and exit record on the host, as
the native monitor does, so ``ContainerStore`` reads its status the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _process
from ..errors import (
    BackendFailed,
    InvalidArgument,
    MagikrunError,
    NotSupported,
    RuntimeUnavailable,
    VmBootFailed,
    VmControlError,
)
from ..platform._limits import MAX_INIT_OUTPUT_LINES, VM_BOOT_TIMEOUT, VM_CONTROL_TIMEOUT
from ..platform._paths import Paths
from ._crun import load_bundle_config, rootfs_of
from ._monitor import EXIT_FILE, LOG_FILE, rfc3339_nano
from ._output import last_output
from ._store import ContainerStore, process_start_time, read_pid_file, stop_pid_file
from ._trace import trace
from ._types import ContainerState, ContainerStatus, ExecResult, parse_signal

if TYPE_CHECKING:
    from ..vminit import ControlClient, GuestProcess

__all__ = [
    "CRUN",
    "GUEST_ADDRESS",
    "MicroVmRuntime",
    "ask",
    "ask_one",
    "crun_run",
    "guest_pid_file",
    "keeper_main",
    "spawn_keeper",
]

CRUN = ("crun", "--root", "/run/crun")
"""crun in the guest (the host's, from the shared /usr), with state on the guest's tmpfs."""
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
_BUSYBOX = "/bin/busybox"
_GATE = "/run/magikrun-gate"
_POLL = 0.2
_VM_END_WAIT = 5.0
"""Seconds a keeper gives a guest whose channel closed to finish powering off."""
_KILL_WAIT = 10.0


def guest_pid_file(cid: str) -> str:
    """Where ``crun run --pid-file`` records container ``cid`` in the guest: once it is
    there the container runs, which vminit tells the keeper (no polling from the host)."""
    return f"/run/magikrun-{cid}.pid"


def crun_run(bundle: Path, cid: str) -> list[str]:
    """The guest's command that runs container ``cid`` from ``bundle`` (a host path
    shared at the same place), recording it in :func:`guest_pid_file`."""
    return [*CRUN, "run", "--pid-file", guest_pid_file(cid), "--bundle", str(bundle), cid]


def alive(path: Path) -> bool:
    """Whether the process a pid file names still runs (the same process, by start time)."""
    found = read_pid_file(path)
    return found is not None and process_start_time(found[0]) == found[1]


async def spawn_keeper(paths: Paths, vm_dir: Path, plan: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``plan`` and start its keeper; its ready answer, or ``VmBootFailed``.

    ``vm_dir`` (made here, 0700) gets ``keeper.pid`` and ``qemu.pid``: the caller
    records both as resources before calling, so an interrupted boot is cleaned up.
    """
    vm_dir.mkdir(mode=0o700, exist_ok=True)
    (vm_dir / "plan.json").write_text(json.dumps(plan))
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    trace("keeper.spawn")
    try:
        argv = _process.detached_argv(
            str(vm_dir / "keeper.pid"),
            "magikrun.runtime._microvm:keeper_main",
            [str(write_fd), str(vm_dir), str(paths.data), str(paths.run)],
        )
        done = await _process.run(argv, timeout=30.0, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    trace("keeper.detached")
    with os.fdopen(read_fd, "rb", 0) as status:
        if done.returncode != 0:
            raise VmBootFailed(
                f"the microVM keeper did not start: {done.stderr.decode(errors='replace').strip()}",
                hint="check that magikrun is installed for this Python",
            )
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), status
        )
        try:
            async with asyncio.timeout(float(plan["boot_timeout"]) + 30.0):
                line = await reader.readline()
        finally:
            transport.close()
    trace("keeper.answered")
    answer: dict[str, Any] = json.loads(line) if line else {}
    if not answer.get("ok"):
        raise VmBootFailed(
            str(answer.get("error") or "the microVM keeper ended without an answer"),
            hint="see the error; the VM was killed and nothing of it is left",
            **answer.get("subject", {}),
        )
    return answer


async def _boot_failure(failure: Mapping[str, Any], client: ControlClient) -> VmBootFailed:
    """What stopped the guest's boot, with its subject (``init_container``, ``exit_code``
    and its last ``output``, or the infra ``extension``) for the pod runtime's error."""
    if failure.get("kind") == "init":
        name, code = str(failure["name"]), int(failure["exit_code"])
        try:
            records = client.logs(name, tail=MAX_INIT_OUTPUT_LINES)
            output = last_output([record.line async for record in records])
        except VmControlError as exc:
            output = f"(its output could not be read from the guest: {exc})"
        return VmBootFailed(
            f"init container {name!r} exited with code {code}",
            init_container=name,
            exit_code=code,
            output=output,
        )
    error = str(failure.get("error"))
    return VmBootFailed(
        f"the infra program failed: {error}", extension=failure.get("extension"), infra_error=error
    )


async def ask(vm_dir: Path, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Send one request to a VM's keeper; its answers (``BackendFailed`` for an error)."""
    path = vm_dir / "control.sock"
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
    except OSError as exc:
        raise BackendFailed(
            f"the microVM is not running ({exc.strerror})",
            hint="its QEMU ended; delete it and create it again",
        ) from exc
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        while line := await reader.readline():
            message: dict[str, Any] = json.loads(line)
            if "error" in message:
                raise BackendFailed(str(message["error"]), hint="see the error from the guest")
            yield message
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def ask_one(vm_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    async for message in ask(vm_dir, request):
        return message
    raise BackendFailed("the microVM keeper gave no answer", hint="see keeper.pid.log")


def exec_result(answer: Mapping[str, Any]) -> ExecResult:
    from ..vminit import ExecOutput

    out = ExecOutput.from_dict(answer["result"])
    return ExecResult(exit_code=out.exit_code, stdout=out.stdout, stderr=out.stderr)


# -- the keeper process -----------------------------------------------------------


def _guest_process(spec: Mapping[str, Any]) -> GuestProcess:
    from ..vminit import GuestProcess

    return GuestProcess(
        name=spec["name"],
        argv=tuple(spec["argv"]),
        restart=spec.get("restart", "Never"),
        backoff=float(spec.get("backoff", 1.0)),
        backoff_cap=float(spec.get("backoff_cap", 10.0)),
    )


class _Keeper:
    """Owns one VM: boots it from the plan, relays requests, records what it last saw.

    The plan's ``init`` containers run in the guest before its ``processes``; with an
    ``infra`` program, the keeper answers its port requests for the VM's whole life.
    """

    def __init__(self, paths: Paths, directory: Path) -> None:
        from ..vminit import GuestInfra
        from ._qemu import MicroVm, TapNetwork, UserNetwork, VmConfig

        self.paths = paths
        self.directory = directory
        plan = json.loads((directory / "plan.json").read_text())
        self.plan = plan
        self.names = [p["name"] for p in plan["processes"]]
        self.inits = [p["name"] for p in plan.get("init", [])]
        self.cids = {p["name"]: p["cid"] for p in plan["processes"]}
        infra = plan.get("infra")
        self.infra_grace = float(infra["grace"]) if infra else 0.0
        self.relay: asyncio.Future[None] | None = None
        self.gated = bool(plan.get("gate"))
        self.started = False
        setup: list[tuple[str, ...]] = []
        network: UserNetwork | TapNetwork | None = None
        tap = plan.get("tap")
        if tap is not None:
            network = TapNetwork(
                netns=tap["netns"], mac=tap["mac"], address=tap["address"], gateway=tap["gateway"]
            )
        elif plan.get("forwards") is not None:
            network = UserNetwork(
                host_forwards=tuple((h, g) for h, g in plan["forwards"]),
                address=GUEST_ADDRESS,
                gateway=GUEST_GATEWAY,
            )
        if self.gated:
            setup.append((_BUSYBOX, "mkfifo", "-m", "0600", _GATE))
        config = VmConfig(
            vcpus=plan["vcpus"],
            memory_mib=plan["memory_mib"],
            processes=tuple(_guest_process(p) for p in plan["processes"]),
            init=tuple(_guest_process(p) for p in plan.get("init", [])),
            infra=GuestInfra(argv=tuple(infra["argv"]), config=infra["config"]) if infra else None,
            read_only_shares=tuple(
                (f"ro.{i}", path) for i, path in enumerate(plan.get("read_only_shares", []))
            ),
            network=network,
            boot_timeout=float(plan["boot_timeout"]),
            never_ready=bool(plan.get("never_ready")),
            shares=tuple((f"pod.{i}", path) for i, path in enumerate(plan["shares"])),
            setup=tuple(setup),
        )
        self.vm = MicroVm(paths, config, directory=self.directory / "qemu")
        self.containers: dict[str, Any] = {}

    def save(self, name: str, data: object) -> None:
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.directory / name)

    async def refresh(self) -> None:
        self.containers = await self.vm.client.status()
        self.save("state.json", {"accel": self.vm.accel, "containers": self.containers})

    async def wait_started(self, timeout: float) -> list[str]:
        """Wait until crun runs every container (or it already ended), as vminit reports;
        the containers whose process ended before crun ever ran them."""
        try:
            async with asyncio.timeout(timeout):
                return await self.vm.client.started(
                    {name: guest_pid_file(cid) for name, cid in self.cids.items()}
                )
        except TimeoutError as exc:
            raise BackendFailed(
                f"the containers did not all run within {timeout} s",
                hint="see the containers' logs and the images' commands",
            ) from exc

    async def boot(self) -> None:
        """Boot; return once every container runs (or, gated, waits at its gate)."""
        qemu_pid = self.directory / "qemu.pid"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.vm.config.boot_timeout  # one deadline for all of it
        boot = asyncio.ensure_future(self.vm.boot())
        while not boot.done():
            pid = self.vm.pid
            if pid is not None and not qemu_pid.exists():
                qemu_pid.write_text(f"{pid} {process_start_time(pid)}")
            await asyncio.wait({boot}, timeout=0.05)
        boot.result()
        trace("keeper.vm_ready")
        if self.vm.config.infra is not None:
            self.relay = asyncio.ensure_future(self.relay_ports())
        if self.gated:
            await self.refresh()
            return
        while True:
            stage = await self.vm.client.boot()
            if stage["failure"] is not None:
                raise await _boot_failure(stage["failure"], self.vm.client)
            if stage["stage"] == "apps":
                break
            if loop.time() > deadline:
                raise VmBootFailed(
                    f"the pod did not get past its {stage['stage']} stage within "
                    f"{self.vm.config.boot_timeout} s",
                    hint="make the init containers (and extensions) finish sooner; the pod "
                    "was rolled back, so their logs are gone",
                )
            await asyncio.sleep(_POLL)
        trace("keeper.apps_stage")
        never_ran = await self.wait_started(max(deadline - loop.time(), _POLL))
        trace("keeper.started")
        await self.refresh()
        trace("keeper.refreshed")
        failed = {n: self.containers[n] for n in never_ran}
        if failed:
            logs = {n: [r.line async for r in self.vm.client.logs(n)] for n in failed}
            raise BackendFailed(
                "containers failed in the VM: "
                + "; ".join(
                    f"{n} exited {i['exit_code']}: {' / '.join(logs[n][-3:])}"
                    for n, i in failed.items()
                ),
                hint="see the container's command and image",
            )

    async def relay_ports(self) -> None:
        """Answer the guest's port requests (from infra extensions) until the VM ends."""
        client = self.vm.client
        while True:
            try:
                message = await client.next_event()
            except VmControlError:
                return
            if message.get("event") != "port":
                continue
            error: str | None = None
            request = message.get("request")
            if type(request) is not int:
                continue  # nothing to answer: the guest did not say which request
            try:
                await self.open_port(
                    str(message["protocol"]),
                    int(message["host_port"]),
                    int(message["container_port"]),
                )
            except (KeyError, TypeError, ValueError, MagikrunError) as exc:
                error = str(exc)
            with contextlib.suppress(VmControlError):
                await client.port_result(request, error)

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
            elif op == "start":
                await self.open_gate("start")
                send({"result": None})
            elif op == "kill":
                await self.kill(str(request["signal"]), bool(request["all"]))
                send({"result": None})
            elif op == "stop":
                await self.stop(float(request["grace"]))
                send({"result": None})
            elif op == "port":
                await self.open_port(
                    str(request["protocol"]),
                    int(request["host_port"]),
                    int(request["container_port"]),
                )
                send({"result": None})
            else:
                send({"error": f"unknown request {op!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the asking process
            send({"error": str(exc) or type(exc).__name__})
        with contextlib.suppress(OSError):
            await writer.drain()
            writer.close()

    async def open_port(self, protocol: str, host_port: int, container_port: int) -> None:
        """Forward ``host_port`` on the host to ``container_port`` in the guest.

        On the bridge through CNI portmap to the pod IP (kept in the pod's attachment
        record, so deleting the pod removes it); on user-mode networking through QEMU's
        ``hostfwd`` on 127.0.0.1 (gone with QEMU).
        """
        if protocol not in ("tcp", "udp"):
            raise InvalidArgument(f"unknown protocol {protocol!r}", hint="use tcp or udp")
        for port in (host_port, container_port):
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"port {port} is outside 1..65535", port=port)
        tap = self.plan.get("tap")
        if tap is None:
            await self.vm.add_host_forward(protocol, host_port, container_port)
            return
        # The pod's CNI attachment is the pod layer's: a bridge pod's keeper is its agent,
        # as the supervisor is a native pod's.
        from ..pod._ports import forward_port

        await forward_port(self.paths, tap["pod_id"], protocol, host_port, container_port)

    async def open_gate(self, word: str) -> None:
        if not self.gated or self.started:
            raise InvalidArgument("the container was already started")
        out = await self.vm.client.exec([_BUSYBOX, "sh", "-c", f"echo {word} > {_GATE}"])
        if out.exit_code != 0:
            raise BackendFailed(f"cannot open the gate: {out.stderr.decode(errors='replace')}")
        self.started = True
        if word == "start":
            await self.wait_running()

    async def wait_running(self) -> None:
        """Return once crun runs the container, or its process has already ended."""
        try:
            await self.wait_started(VM_CONTROL_TIMEOUT)
        except VmControlError:
            # A container that exits at once can end its VM before it is seen
            # running; the keeper's watch records its exit code.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.vm.wait(), timeout=_VM_END_WAIT)
            if self.vm.alive:
                raise

    async def kill(self, sig: str, everything: bool) -> None:
        if self.gated and not self.started:
            await self.open_gate("kill")
            return
        for name in self.names:
            argv = [*CRUN, "kill", *(["--all"] if everything else []), self.cids[name], sig]
            await self.vm.client.exec(argv)

    async def stop(self, grace: float) -> None:
        """TERM then KILL each container; keep codes and logs on the host; power off
        (giving the infra program, if any, its grace to stop its extensions)."""
        await self.vm.client.hold(grace)
        for sig, wait in (("TERM", grace), ("KILL", _KILL_WAIT)):
            await self.refresh()
            running = [n for n, i in self.containers.items() if i["state"] == "running"]
            if not running:
                break
            for name in running:
                await self.vm.client.exec([*CRUN, "kill", self.cids[name], sig])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while loop.time() < deadline:
                await self.refresh()
                if all(i["state"] != "running" for i in self.containers.values()):
                    break
                await asyncio.sleep(_POLL)
        logs = {
            name: [r.to_dict() async for r in self.vm.client.logs(name)]
            for name in (*self.inits, *self.names)
        }
        self.save("logs.json", logs)
        await self.vm.shutdown(grace=self.infra_grace)

    async def stop_relay(self) -> None:
        if self.relay is not None:
            self.relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.relay

    async def follow_container(self) -> None:
        """Single-container VMs: CRI log and exit record on the host, then power off."""
        container_dir = Path(self.plan["container_dir"])
        name = self.names[0]
        fd = os.open(
            container_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        try:
            async for record in self.vm.client.logs(name, follow=True):
                os.write(fd, f"{record.time} {record.stream} F {record.line}\n".encode())
        finally:
            os.close(fd)
        await self.refresh()
        code = self.containers[name]["exit_code"]
        tmp = container_dir / f".{EXIT_FILE}.tmp"
        tmp.write_text(json.dumps({"exitCode": code, "finished": rfc3339_nano()}))
        os.replace(tmp, container_dir / EXIT_FILE)
        await self.vm.shutdown(grace=0)


async def _keep(paths: Paths, directory: Path, status_fd: int) -> None:
    trace("keeper.main")
    status = os.fdopen(status_fd, "w")
    keeper = _Keeper(paths, directory)
    trace("keeper.init")
    try:
        await keeper.boot()
    except BaseException as exc:
        await keeper.stop_relay()
        await keeper.vm.kill()
        subject = {
            key: value
            for key, value in (exc.subject if isinstance(exc, MagikrunError) else {}).items()
            if isinstance(value, str | int | float | None)
        }
        status.write(json.dumps({"ok": False, "error": str(exc), "subject": subject}) + "\n")
        status.close()
        raise
    socket_path = directory / "control.sock"
    server = await asyncio.start_unix_server(keeper.handle, str(socket_path), limit=1 << 24)
    status.write(json.dumps({"ok": True, "accel": keeper.vm.accel}) + "\n")
    status.close()
    loop = asyncio.get_running_loop()
    ended = asyncio.ensure_future(keeper.vm.wait())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ended.cancel)
    async with asyncio.TaskGroup() as group:
        if keeper.plan.get("container_dir"):
            follower = group.create_task(keeper.follow_container())
            ended.add_done_callback(lambda _: follower.cancel())
        with contextlib.suppress(asyncio.CancelledError):
            await ended
    server.close()
    await keeper.stop_relay()
    await keeper.vm.kill()
    socket_path.unlink(missing_ok=True)


def keeper_main(argv: list[str]) -> None:
    """The keeper process: ``STATUS_FD VM_DIR DATA RUN`` (started detached by
    :func:`spawn_keeper`, which has the pid file already)."""
    status_fd, directory, data, run = argv
    paths = Paths(data=Path(data), run=Path(run))
    asyncio.run(_keep(paths, Path(directory), int(status_fd)))


# -- one container per VM ---------------------------------------------------------


class MicroVmRuntime:
    """One container in its own QEMU microVM (crun inside the guest).

    ``create`` boots the VM with the container held at a gate (the OCI ``created``
    state); ``start`` releases it. The container's ``pid`` is its QEMU's host pid.

    Parameters:
        paths: the magikrun root.
        store: the container store shared with the other backends.
        boot_timeout: seconds the guest has to report ready.
        memory_mib: the VM's memory.
    """

    name = "microvm"
    aliases: tuple[str, ...] = ("qemu", "vm", "krun")
    features = frozenset({"microvm", "exec", "kvm-or-tcg"})

    def __init__(
        self,
        paths: Paths,
        *,
        store: ContainerStore | None = None,
        boot_timeout: float = VM_BOOT_TIMEOUT,
        memory_mib: int = 384,
    ) -> None:
        self.paths = paths
        self.store = store or ContainerStore(paths)
        self.boot_timeout = boot_timeout
        self.memory_mib = memory_mib

    def can_handle(self, spec: Mapping[str, Any]) -> bool:
        """Never on its own: a microVM is chosen explicitly (``--runtime microvm``)."""
        return False

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        from ._guestkernel import BOOT_DIR, MODULES_DIR, _newest_kernel
        from ._qemu import QEMU

        if shutil.which(QEMU) is None:
            return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
        try:
            _newest_kernel(BOOT_DIR, MODULES_DIR)
        except RuntimeUnavailable as exc:
            return str(exc)
        return None

    def _vm_dir(self, id: str) -> Path:
        return self.store.directory(id) / "vm"

    async def create(
        self,
        id: str,
        bundle: str | Path,
        *,
        pid_file: str | Path | None = None,
        console_socket: str | Path | None = None,
        foreground: bool = False,
    ) -> ContainerState:
        if console_socket is not None or foreground:
            raise NotSupported(
                "a microVM container has no console socket or foreground mode",
                hint="read its output with the container's log",
                id=id,
            )
        bundle = Path(bundle).absolute()
        spec = load_bundle_config(bundle)
        rootfs = rootfs_of(bundle, spec)
        reason = self.unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailable(f"microVMs cannot run here: {reason}", id=id)
        record = self.store.reserve(id, backend=self.name, bundle=bundle)
        vm_dir = self._vm_dir(id)
        shares = [str(bundle)]
        if not rootfs.is_relative_to(bundle):
            shares.append(str(rootfs))
        command = f'read x < {_GATE}; [ "$x" = start ] || exit 137; exec "$@"'
        plan = {
            "vcpus": 1,
            "memory_mib": self.memory_mib,
            "shares": shares,
            "processes": [
                {
                    "name": "container",
                    "cid": id,
                    "argv": [
                        _BUSYBOX,
                        "sh",
                        "-c",
                        command,
                        "gate",
                        *crun_run(bundle, id),
                    ],
                }
            ],
            "forwards": None,
            "gate": True,
            "container_dir": str(self.store.directory(id)),
            "boot_timeout": self.boot_timeout,
        }
        try:
            await spawn_keeper(self.paths, vm_dir, plan)
        except BaseException:
            await stop_pid_file(vm_dir / "keeper.pid")
            await stop_pid_file(vm_dir / "qemu.pid")
            self.store.remove(id)
            raise
        keeper = read_pid_file(vm_dir / "keeper.pid")
        qemu = read_pid_file(vm_dir / "qemu.pid")
        assert keeper is not None and qemu is not None
        record = self.store.update(
            record,
            status=ContainerStatus.CREATED,
            pid=qemu[0],
            pid_start=qemu[1],
            monitor_pid=keeper[0],
            monitor_start=keeper[1],
        )
        if pid_file is not None:
            from ._store import write_pid_file

            write_pid_file(Path(pid_file), qemu[0])
        return record.to_state()

    async def start(self, id: str) -> ContainerState:
        record = self.store.guard(id, "start")
        await ask_one(self._vm_dir(id), {"op": "start"})
        return self.store.update(record, status=ContainerStatus.RUNNING).to_state()

    async def state(self, id: str) -> ContainerState:
        return self.store.load(id).to_state()

    async def kill(self, id: str, signal: int | str, all: bool = False) -> None:
        self.store.guard(id, "kill")
        number = parse_signal(signal)
        await ask_one(self._vm_dir(id), {"op": "kill", "signal": str(number), "all": all})

    async def delete(self, id: str, force: bool = False) -> None:
        self.store.load(id) if force else self.store.guard(id, "delete")
        vm_dir = self._vm_dir(id)
        await stop_pid_file(vm_dir / "keeper.pid")
        await stop_pid_file(vm_dir / "qemu.pid")
        self.store.remove(id)

    async def wait(self, id: str) -> int:
        record = self.store.load(id)
        if record.status in (ContainerStatus.CREATED, ContainerStatus.RUNNING):
            if record.monitor_alive():
                await _process.wait_exit(record.monitor_pid)
            record = self.store.load(id)
        if record.exit_code is None:
            raise BackendFailed(
                f"the exit code of container {id!r} was lost (its VM ended without one)",
                hint="QEMU or its keeper was killed; delete the container with --force",
                id=id,
            )
        return record.exit_code

    async def exec(
        self,
        id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        self.store.guard(id, "exec")
        if not argv:
            raise InvalidArgument("exec needs a command", hint="pass the program and its args")
        extra = [f"--env={k}={v}" for k, v in (env or {}).items()]
        extra += [f"--cwd={cwd}"] if cwd else []
        request = {
            "op": "exec",
            "argv": [*CRUN, "exec", *extra, id, *argv],
            "timeout": timeout or VM_CONTROL_TIMEOUT,
        }
        return exec_result(await ask_one(self._vm_dir(id), request))

    async def ps(self, id: str) -> list[int]:
        """QEMU's host pid: the container's processes live in the guest."""
        record = self.store.guard(id, "kill")
        return [record.pid] if record.pid is not None else []


def vm_alive(vm_dir: Path) -> bool:
    """Whether the keeper of ``vm_dir`` still runs."""
    return alive(vm_dir / "keeper.pid")
