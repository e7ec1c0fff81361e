"""What the native and wasm pod runtimes share: steps with intents, status, stop, delete, logs.

A pod runtime makes resources only through :meth:`PodRuntimeBase._make`, which records
the intent, registers the undo with the ``Rollback`` and marks the resource done; the
same undo steps serve rollback, ``delete_pod`` and recovery after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .. import _process
from ..errors import (
    ContainerNotFound,
    InvalidArgument,
    InvalidState,
    MagikrunError,
    PodError,
    PodNotFound,
    PodStartFailed,
)
from ..infra._events import ContainerExited, PodStopping
from ..infra._host import InfraLink
from ..platform._limits import MAX_INIT_OUTPUT_BYTES, RESTART_BACKOFF_BASE
from ..platform._paths import Paths
from ..runtime import (
    ContainerRecord,
    ContainerState,
    ContainerStatus,
    ContainerStore,
    OciRuntime,
)
from ..runtime._monitor import read_exit
from ..runtime._output import last_output
from ..runtime._store import process_start_time, read_pid_file, stop_pid_file
from ._fault import FaultHook, fault_from_env
from ._rollback import Rollback, describe
from ._spec import Container, PodSpec, RestartPolicy
from ._state import PodRecord, PodStore, Resource
from ._types import ContainerInfo, LogLine, PodPhase, PodStatus
from ._undo import recover_pods, undo_all, undo_resource

if TYPE_CHECKING:
    from ..image import Image, ImageService, ProgressCallback

__all__ = [
    "PodRuntimeBase",
    "container_id",
    "infra_id",
    "init_container_failed",
    "kubernetes_annotations",
    "log_tail",
    "together",
]

T = TypeVar("T")

_STOP_POLL = 0.05
_FOLLOW_POLL = 0.1
_INFRA_GRACE = 5.0
_TAIL_WINDOW = 16 * MAX_INIT_OUTPUT_BYTES
"""Bytes of a log's end read for an init container's error: more than the monitor's
longest record (16 KiB), so the last line is whole."""


def container_id(pod_id: str, name: str) -> str:
    """``POD_NAME``: unique (pod ids hold at most one ``_``, container names none), ≤ 128."""
    return f"{pod_id}_{name}"


def infra_id(pod_id: str) -> str:
    """``POD.infra``: no app container id ends so (container names hold no ``.``)."""
    return f"{pod_id}.infra"


def kubernetes_annotations(spec: PodSpec, container_name: str) -> dict[str, str]:
    """The annotations a Kubernetes runtime puts on a pod's container, for tools that read them."""
    return {
        "io.kubernetes.pod.name": spec.name,
        "io.kubernetes.pod.namespace": spec.namespace,
        "io.kubernetes.container.name": container_name,
    }


def init_container_failed(pod_id: str, name: str, code: int, output: Iterable[str]) -> PodError:
    """The error that fails a pod whose init container ``name`` exited non-zero.

    The rollback removes the container's log, so the error carries the log's last
    ``output`` lines (bounded and escaped: the container wrote them), in ``output`` and
    as an indented block after the message's first line.
    """
    text = last_output(output)
    block = "\n".join(f"  | {line}" for line in text.split("\n"))
    said = f"\nits last output:\n{block}" if text else "; it printed nothing"
    return PodError(
        f"init container {name!r} exited with code {code}{said}",
        hint="fix the init container's command or image; the pod was rolled back, "
        "so its log is gone",
        pod_id=pod_id,
        container=name,
        exit_code=code,
        output=text,
    )


def log_tail(path: Path) -> list[str]:
    """The texts of the last records of a CRI log (none when there is no log): enough
    of its end for :func:`last_output`, read without reading the whole file."""
    try:
        with open(path, "rb") as file:
            start = max(file.seek(0, os.SEEK_END) - _TAIL_WINDOW, 0)
            file.seek(start)
            data = file.read()
    except FileNotFoundError:
        return []
    records = data.split(b"\n")
    if start:
        records = records[1:]  # it may begin inside a record
    lines = [_parse_cri("", raw) for raw in records]
    return [line.text for line in lines if line is not None]


def pod_dir(paths: Paths, pod_id: str) -> Path:
    return paths.run / "pods" / pod_id


@dataclass(slots=True)
class _Where:
    """Where run_pod is, for the error that names the step and the container."""

    step: str = "record"
    container: str | None = None


class PodRuntimeBase:
    """The shared half of a pod runtime; subclasses implement ``_start`` and the backend."""

    name: str
    backend: Literal["native", "wasm"]
    images: ImageService
    progress: ProgressCallback | None

    def __init__(
        self,
        paths: Paths,
        *,
        fault_hook: FaultHook | None = None,
        restart_backoff: float = RESTART_BACKOFF_BASE,
    ) -> None:
        self.paths = paths.ensure()
        self.store = PodStore(paths)
        self.containers = ContainerStore(paths)
        self.fault_hook = fault_hook if fault_hook is not None else fault_from_env()
        self.restart_backoff = restart_backoff
        self._recovered = False

    # -- the pieces subclasses use -------------------------------------------------

    async def _pull_all(self, spec: PodSpec, where: _Where) -> dict[str, Image]:
        """Every image the pod names, each pulled once, concurrently; the first container
        whose image fails is named in ``where``."""
        wanted: dict[str, Container] = {}
        for c in (*spec.init_containers, *spec.containers):
            wanted.setdefault(c.image, c)
        images: dict[str, Image] = {}

        async def pull(container: Container) -> None:
            try:
                images[container.image] = await self.images.pull(
                    container.image,
                    policy=container.image_pull_policy.value,
                    progress=self.progress,
                )
            except Exception:  # the first to fail is named (siblings are not cancelled)
                where.container = where.container or container.name
                raise

        await together([pull(c) for c in wanted.values()])
        return images

    async def _ready(self) -> None:
        if not self._recovered:
            await recover_pods(self.paths, self.store)
            self._recovered = True

    def _at(self, where: _Where, step: str, container: str | None = None) -> None:
        where.step, where.container = step, container
        if self.fault_hook is not None:
            label = step if container is None else f"{step}:{container}"
            self.fault_hook(label)

    async def _make(
        self,
        rollback: Rollback,
        pod_id: str,
        kind: str,
        key: str,
        data: dict[str, Any],
        create: Callable[[], Awaitable[T]],
    ) -> T:
        """Record the intent, register the undo, create, mark done.

        The undo is registered before creating, as the intent is written before: each
        undo is idempotent, so a half-made resource is undone as well as a whole one.
        """
        resource = self.store.intent(pod_id, kind, key, data)
        rollback.push(f"{kind} {key}", lambda: self._undo(resource))
        result = await create()
        self.store.done(resource)
        return result

    async def _create(self, rollback: Rollback, pod: str, cid: str) -> ContainerState:
        """Create container ``cid`` from its bundle, as a recorded resource of ``pod``."""
        runtime = self._runtime()
        return await self._make(
            rollback,
            pod,
            "container",
            cid,
            {"backend": self.backend},
            lambda: runtime.create(cid, self.paths.bundles / cid),
        )

    async def _create_all(
        self, rollback: Rollback, pod: str, containers: Sequence[Container], where: _Where
    ) -> None:
        """Create the containers concurrently (each is its own step, in order)."""
        failed: list[str] = []

        async def create(c: Container) -> None:
            try:
                self._at(where, "create", c.name)
                await self._create(rollback, pod, container_id(pod, c.name))
            except Exception:
                failed.append(c.name)
                raise

        try:
            await together([create(c) for c in containers])
        finally:
            if failed:
                where.step, where.container = "create", failed[0]

    async def _undo(self, resource: Resource) -> None:
        await undo_resource(self.paths, resource)
        self.store.forget(resource)

    def _rollback(self, spec: PodSpec, where: _Where) -> Rollback:
        def wrap(exc: Exception, undone: list[str]) -> Exception:
            container = f" of container {where.container!r}" if where.container else ""
            first, newline, rest = describe(exc).partition("\n")
            carried = getattr(exc, "subject", {})
            return PodStartFailed(
                f"pod {spec.namespace}/{spec.name}: step {where.step}{container} failed: "
                f"{first}; undone: {len(undone)} resource(s), nothing is left{newline}{rest}",
                hint=getattr(exc, "hint", None) or PodStartFailed.default_hint,
                pod_id=spec.id,
                container=where.container,
                step=where.step,
                undone=tuple(undone),
                **{key: carried[key] for key in ("exit_code", "output") if key in carried},
            )

        return Rollback(wrap=wrap)

    async def _drop_record(self, pod_id: str, rollback: Rollback) -> None:
        """The last undo: forget the pod, or leave it ``failed`` for recovery to retry."""
        if rollback.errors:
            self.store.update(pod_id, state="failed")
        else:
            self.store.remove(pod_id)

    def _runtime(self) -> OciRuntime:
        raise NotImplementedError

    async def _start_supervisor(self, rollback: Rollback, spec: PodSpec, directory: Path) -> None:
        """A detached process that applies the restart policy (when there is one to apply)
        and reports container exits to the infra extensions (when the pod has some)."""
        if spec.restart_policy is RestartPolicy.NEVER and not (directory / "infra").is_dir():
            return
        pid_file = directory / "supervisor.pid"

        async def spawn() -> None:
            argv = _process.detached_argv(
                str(pid_file),
                "magikrun.pod._supervisor:main",
                [str(self.paths.data), str(self.paths.run), spec.id, str(self.restart_backoff)],
            )
            done = await _process.run(argv, timeout=30.0)
            if done.returncode != 0 or not pid_file.exists():
                raise PodError(
                    f"the supervisor of pod {spec.id} did not start: "
                    f"{done.stderr.decode(errors='replace').strip()}",
                    hint="check that magikrun is installed for this Python",
                    pod_id=spec.id,
                )

        await self._make(
            rollback, spec.id, "supervisor", spec.id, {"pid_file": str(pid_file)}, spawn
        )

    # -- status ----------------------------------------------------------------------

    async def pod_status(self, pod_id: str) -> PodStatus:
        await self._ready()
        return self._status(self.store.get(pod_id))

    async def list_pods(self) -> list[PodStatus]:
        await self._ready()
        return [self._status(r) for r in self.store.list() if r.runtime == self.name]

    def _status(self, record: PodRecord) -> PodStatus:
        spec = record.spec
        directory = pod_dir(self.paths, record.id)
        restarts = _read_json(directory / "restarts.json")
        supervisor = read_pid_file(directory / "supervisor.pid")
        supervising = supervisor is not None and _alive(*supervisor)
        infos = [
            self._container_info(record.id, c, init=True, restarts=restarts)
            for c in spec.init_containers
        ]
        apps = [
            self._container_info(record.id, c, init=False, restarts=restarts)
            for c in spec.containers
        ]
        message = None
        if record.state == "creating":
            phase = PodPhase.PENDING if record.owner_alive() else PodPhase.UNKNOWN
        elif record.state == "failed":
            phase, message = PodPhase.FAILED, "a rollback did not finish; run 'magikrun system gc'"
        elif any(c.state == "running" for c in apps):
            phase = PodPhase.RUNNING
        elif supervising and record.state == "ready":
            phase = PodPhase.RUNNING
        elif all(c.state == "terminated" for c in apps):
            ok = all(c.exit_code == 0 for c in apps)
            phase = PodPhase.SUCCEEDED if ok else PodPhase.FAILED
        else:
            phase = PodPhase.UNKNOWN
        if record.state == "stopped":
            message = "stopped"
        return record.status(phase, (*infos, *apps), message)

    def _load(self, cid: str) -> ContainerRecord | None:
        """The container's record, None when it is gone (or removed meanwhile by the
        supervisor restarting it)."""
        try:
            return self.containers.load(cid)
        except ContainerNotFound:
            return None

    def _container_info(
        self, pod_id: str, container: Container, *, init: bool, restarts: dict[str, Any]
    ) -> ContainerInfo:
        cid = container_id(pod_id, container.name)
        count = int(restarts.get(container.name, 0))
        record = self._load(cid)
        if record is None:
            reason = "CrashLoopBackOff" if count else "ContainerCreating"
            return ContainerInfo(
                container.name, container.image, "waiting", None, reason, None, None, count, init
            )
        started = _parse_time(record.created)
        if record.status is ContainerStatus.RUNNING:
            return ContainerInfo(
                container.name, container.image, "running", None, None, started, None, count, init
            )
        if record.status is ContainerStatus.STOPPED:
            exited = read_exit(str(self.containers.directory(cid))) or {}
            code = record.exit_code
            reason = "Completed" if code == 0 else ("Killed" if code == 137 else "Error")
            return ContainerInfo(
                container.name,
                container.image,
                "terminated",
                code,
                reason,
                started,
                _parse_time(exited.get("finished")),
                count,
                init,
            )
        return ContainerInfo(
            container.name, container.image, "waiting", None, "Created", started, None, count, init
        )

    # -- stop and delete -------------------------------------------------------------

    async def stop_pod(self, pod_id: str, grace: float | None = None) -> None:
        """Supervisor first (no restarts), then TERM the app containers, KILL after
        ``grace``, infra last. Idempotent."""
        await self._ready()
        record = self.store.get(pod_id)
        self._refuse_creating(record, "stop")
        spec = record.spec
        wait = float(spec.termination_grace_period_seconds if grace is None else grace)
        if wait < 0:
            raise InvalidArgument(f"grace {grace} is negative", hint="use 0 or more seconds")
        await stop_pid_file(pod_dir(self.paths, pod_id) / "supervisor.pid")
        link = await self._infra_link(pod_id)
        try:
            if link is not None:
                await link.send(PodStopping(grace=wait))
            async with asyncio.TaskGroup() as group:
                for container in spec.containers:
                    group.create_task(self._stop_app(pod_id, container.name, wait, link))
        finally:
            if link is not None:
                await link.aclose()
        await self._stop_container(infra_id(pod_id), _INFRA_GRACE + wait)
        self.store.update(pod_id, state="stopped")

    async def _infra_link(self, pod_id: str) -> InfraLink | None:
        """A channel to the pod's running infra program, if it runs extensions."""
        directory = pod_dir(self.paths, pod_id) / "infra"
        infra = self._load(infra_id(pod_id))
        if not directory.is_dir() or infra is None or not infra.status.can_kill:
            return None
        try:
            return await InfraLink.connect_unix(
                directory, on_port=None, pod_id=pod_id, timeout=_INFRA_GRACE
            )
        except (MagikrunError, OSError) as exc:
            print(f"pod {pod_id}: infra extensions not told of the stop: {exc}", file=sys.stderr)
            return None

    async def _stop_app(self, pod_id: str, name: str, grace: float, link: InfraLink | None) -> None:
        cid = container_id(pod_id, name)
        before = self._load(cid)
        await self._stop_container(cid, grace)
        after = self._load(cid)
        if link is None or before is None or not before.status.can_kill or after is None:
            return
        code = after.exit_code if after.exit_code is not None else -1
        reason = "Completed" if code == 0 else "Error"
        with contextlib.suppress(OSError):  # the infra program is going: nothing to tell
            await link.send(ContainerExited(name=name, exit_code=code, reason=reason))

    async def _stop_container(self, cid: str, grace: float) -> None:
        runtime = self._runtime()
        record = self._load(cid)
        if record is None or not record.status.can_kill:
            return
        for signal_name, wait in (("TERM", grace), ("KILL", _INFRA_GRACE * 2)):
            with contextlib.suppress(InvalidState, ContainerNotFound):
                await runtime.kill(cid, signal_name, all=signal_name == "KILL")
            if await self._stopped_within(cid, wait):
                return

    async def _stopped_within(self, cid: str, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            record = self._load(cid)
            if record is None or record.status is ContainerStatus.STOPPED:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_STOP_POLL)

    async def delete_pod(self, pod_id: str, force: bool = False) -> None:
        """Remove everything of the pod (containers, mounts, bundles, volumes, network,
        records). A running pod needs ``force`` (which stops it without grace first).
        Idempotent: deleting a pod that is gone does nothing."""
        await self._ready()
        try:
            record = self.store.get(pod_id)
        except PodNotFound:
            return
        self._refuse_creating(record, "delete")
        running = [
            c.name for c in self._status(record).containers if c.state == "running" and not c.init
        ]
        if running and not force:
            raise PodError(
                f"pod {record.namespace}/{record.name} is running ({', '.join(running)})",
                hint="stop it first ('magikrun pod stop') or delete with force",
                pod_id=pod_id,
            )
        if record.state != "stopped" and (force or running):
            await self.stop_pod(pod_id, grace=0.0)
        errors = await undo_all(self.paths, self.store, record)
        if errors:
            self.store.update(pod_id, state="failed")
            raise PodError(
                f"pod {pod_id} was not fully removed: {'; '.join(errors)}",
                hint="fix the cause, then 'magikrun system gc' finishes the removal",
                pod_id=pod_id,
            )
        self.store.remove(pod_id)

    def _refuse_creating(self, record: PodRecord, verb: str) -> None:
        if record.state == "creating" and record.owner_alive():
            raise PodError(
                f"cannot {verb} pod {record.id}: it is being created by process {record.owner_pid}",
                hint="wait for 'pod run' to finish",
                pod_id=record.id,
            )

    # -- logs ------------------------------------------------------------------------

    async def logs(
        self,
        pod_id: str,
        container: str | None = None,
        *,
        follow: bool = False,
        tail: int | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        """Lines of the app containers' CRI logs (one container's with ``container``).

        ``tail`` keeps the last N lines of each container; ``follow`` goes on until the
        containers have stopped. ``timestamps`` is for the printer: every line has its time.
        """
        await self._ready()
        record = self.store.get(pod_id)
        names = self._container_names(record, container)
        if tail is not None and tail < 0:
            raise InvalidArgument(f"tail {tail} is negative", hint="use 0 or more lines")
        queue: asyncio.Queue[LogLine | None] = asyncio.Queue(maxsize=1024)

        async def feed() -> None:
            async with asyncio.TaskGroup() as group:
                for name in names:
                    group.create_task(self._read_log(pod_id, name, follow, tail, queue))
            await queue.put(None)

        async with asyncio.TaskGroup() as group:
            task = group.create_task(feed())
            try:
                while (line := await queue.get()) is not None:
                    yield line
            finally:
                task.cancel()

    def _container_names(self, record: PodRecord, container: str | None) -> list[str]:
        spec = record.spec
        names = [c.name for c in spec.containers]
        if container is None:
            return names
        known = names + [c.name for c in spec.init_containers]
        if container not in known:
            raise InvalidArgument(
                f"pod {record.id} has no container {container!r}",
                hint=f"pick one of {', '.join(known)}",
                pod_id=record.id,
                container=container,
            )
        return [container]

    async def _read_log(
        self,
        pod_id: str,
        name: str,
        follow: bool,
        tail: int | None,
        queue: asyncio.Queue[LogLine | None],
    ) -> None:
        cid = container_id(pod_id, name)
        path = self.containers.log_path(cid)
        position = 0
        pending = b""
        first = True
        while True:
            try:
                with open(path, "rb") as file:
                    file.seek(position)
                    chunk = file.read()
            except FileNotFoundError:
                chunk = b""
            position += len(chunk)
            data = pending + chunk
            *complete, pending = data.split(b"\n")
            lines = [_parse_cri(name, raw) for raw in complete]
            parsed = [line for line in lines if line is not None]
            if first and tail is not None:
                parsed = parsed[-tail:] if tail else []
            first = False
            for line in parsed:
                await queue.put(line)
            if not follow or self._finished(cid):
                if follow and chunk:
                    continue
                return
            await asyncio.sleep(_FOLLOW_POLL)

    def _finished(self, cid: str) -> bool:
        record = self._load(cid)
        return record is None or record.status is ContainerStatus.STOPPED

    # -- exec ------------------------------------------------------------------------

    def _app_container(self, pod_id: str, container: str | None) -> str:
        record = self.store.get(pod_id)
        names = [c.name for c in record.spec.containers]
        chosen = container or names[0]
        if chosen not in names:
            raise InvalidArgument(
                f"pod {pod_id} has no app container {chosen!r}",
                hint=f"pick one of {', '.join(names)}",
                pod_id=pod_id,
                container=chosen,
            )
        return container_id(pod_id, chosen)

    async def _exec_checked(
        self, pod_id: str, container: str | None, argv: Sequence[str]
    ) -> tuple[str, Sequence[str]]:
        await self._ready()
        if not argv:
            raise InvalidArgument("exec needs a command", hint="pass the program and its args")
        return self._app_container(pod_id, container), argv


async def together(steps: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run steps concurrently; raise the first failure itself once all have ended.

    Siblings of a failed step are not cancelled but finish: a step cancelled while its
    file work runs in a thread would go on after the rollback had undone it.
    """
    errors: list[Exception] = []

    async def step_of(step: Coroutine[Any, Any, None]) -> None:
        try:
            await step
        except Exception as exc:  # noqa: BLE001 - collected, the first is raised below
            errors.append(exc)

    async with asyncio.TaskGroup() as group:
        for step in steps:
            group.create_task(step_of(step))
    if errors:
        for other in errors[1:]:
            errors[0].add_note(f"also failed: {other}")
        raise errors[0]


def _alive(pid: int, start: int | None) -> bool:
    return process_start_time(pid) == start


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _parse_time(text: object) -> datetime | None:
    """An RFC 3339 time with up to nanoseconds (Python reads microseconds)."""
    if not isinstance(text, str) or not text:
        return None
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _parse_cri(container: str, raw: bytes) -> LogLine | None:
    """``TIME STREAM TAG TEXT`` → LogLine (partial ``P`` records are shown as lines too)."""
    parts = raw.split(b" ", 3)
    if len(parts) < 3:
        return None
    time = _parse_time(parts[0].decode(errors="replace"))
    stream = parts[1].decode(errors="replace")
    if time is None or stream not in ("stdout", "stderr"):
        return None
    text = parts[3].decode(errors="replace") if len(parts) == 4 else ""
    return LogLine(container, "stdout" if stream == "stdout" else "stderr", time, text)
