"""A pod's supervisor: applies the restart policy, detached from whoever ran the pod.

The pod runtime starts it detached (``_process.detached_argv``),
with ``supervisor.pid`` (``PID START``) in the pod's directory. The supervisor watches
the app containers; one that exited is restarted when the policy says so (``Always``;
``OnFailure`` on a non-zero code) after ``BACKOFF * 2**restarts`` seconds, capped at
``RESTART_BACKOFF_CAP``. It counts restarts in ``restarts.json``; SIGTERM ends it. A pod
with infra extensions gets its containers' exits and restarts reported to the infra
program (whatever the policy: the supervisor then runs for ``Never`` too), and opens the
host port forwards its extensions ask for meanwhile (see :func:`._ports.forward_port`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
from pathlib import Path

from ..errors import ContainerNotFound, MagikrunError
from ..infra._events import ContainerExited, ContainerRestarted, ContainerStarted, Event
from ..infra._host import InfraLink
from ..platform._limits import RESTART_BACKOFF_CAP
from ..platform._paths import Paths
from ..runtime import ContainerStatus, ContainerStore
from ._base import container_id, pod_dir
from ._ports import forward_port
from ._spec import RestartPolicy
from ._state import PodStore
from ._undo import container_runtime

__all__ = ["main", "supervise"]

_POLL = 0.2


def _should_restart(policy: RestartPolicy, code: int | None) -> bool:
    return policy is RestartPolicy.ALWAYS or (policy is RestartPolicy.ON_FAILURE and code != 0)


class _Reporter:
    """Sends events to the pod's infra program; a broken channel is logged once, then the
    events stop (the infra container is gone or going)."""

    def __init__(self, link: InfraLink | None) -> None:
        self.link = link

    async def send(self, *events: Event) -> None:
        for event in events:
            if self.link is None:
                return
            try:
                await self.link.send(event)
            except OSError as exc:
                print(f"infra channel broke: {exc}", file=sys.stderr, flush=True)
                self.link = None


async def supervise(paths: Paths, pod_id: str, backoff: float, stopping: asyncio.Event) -> None:
    """Restart the pod's app containers by its policy until ``stopping`` is set (or the
    pod's directory is gone: nothing is left to supervise), reporting to its infra program."""
    infra = pod_dir(paths, pod_id) / "infra"
    link = None
    if infra.is_dir():
        link = await InfraLink.connect_unix(
            infra, on_port=functools.partial(forward_port, paths, pod_id), pod_id=pod_id
        )
    try:
        async with asyncio.TaskGroup() as group:
            if link is not None:
                group.create_task(link.serve())
            await _supervise(paths, pod_id, backoff, stopping, _Reporter(link))
            if link is not None:
                await link.aclose()
    finally:
        if link is not None:
            await link.aclose()


async def _supervise(
    paths: Paths, pod_id: str, backoff: float, stopping: asyncio.Event, reporter: _Reporter
) -> None:
    record = PodStore(paths).get(pod_id)
    spec = record.spec
    store = ContainerStore(paths)
    runtime = container_runtime(paths, "wasm" if record.runtime == "wasm" else "native")
    directory = pod_dir(paths, pod_id)
    counts_file = directory / "restarts.json"
    counts: dict[str, int] = {}
    reported: set[str] = set()
    due: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    while not stopping.is_set() and directory.is_dir():
        for container in spec.containers:
            cid = container_id(pod_id, container.name)
            try:
                state = store.load(cid)
            except ContainerNotFound:
                continue
            if state.status is not ContainerStatus.STOPPED:
                continue
            if container.name not in reported:
                reported.add(container.name)
                code = state.exit_code if state.exit_code is not None else -1
                reason = "Completed" if code == 0 else "Error"
                await reporter.send(
                    ContainerExited(name=container.name, exit_code=code, reason=reason)
                )
            if not _should_restart(spec.restart_policy, state.exit_code):
                continue
            count = counts.get(container.name, 0)
            when = due.setdefault(
                container.name, loop.time() + min(backoff * 2**count, RESTART_BACKOFF_CAP)
            )
            if loop.time() < when or stopping.is_set():
                continue
            del due[container.name]
            try:
                await runtime.delete(cid, force=True)
                await runtime.create(cid, paths.bundles / cid)
                await runtime.start(cid)
                pid = (await runtime.state(cid)).pid or 0
            except MagikrunError as exc:
                print(f"restart of {container.name} failed: {exc}", file=sys.stderr, flush=True)
                pid = None
            counts[container.name] = count + 1
            if pid is not None:
                reported.discard(container.name)
                await reporter.send(
                    ContainerRestarted(name=container.name, restart_count=count + 1),
                    ContainerStarted(name=container.name, pid=pid),
                )
            tmp = counts_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(counts))
            tmp.replace(counts_file)
        try:
            await asyncio.wait_for(stopping.wait(), _POLL)
        except TimeoutError:
            pass


def main(argv: list[str]) -> None:
    """``DATA RUN POD_ID BACKOFF``: supervise until SIGTERM/SIGINT (started detached by the
    pod runtime, which has written the pid file already)."""
    data, run, pod_id, backoff = argv
    paths = Paths(data=Path(data), run=Path(run))

    async def run_until_signal() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await supervise(paths, pod_id, float(backoff), stopping)

    asyncio.run(run_until_signal())
