"""A pod's supervisor: applies the restart policy, detached from whoever ran the pod.

``python -I -m magikrun.pod._supervisor DATA RUN POD_ID BACKOFF`` forks; the parent
exits once the child has written ``supervisor.pid`` (``PID START``) in the pod's
directory, so the caller waits for a short-lived child and the supervisor is
re-parented away from it. The supervisor watches the app containers; one that
exited is restarted when the policy says so (``Always``; ``OnFailure`` on a non-zero
code) after ``BACKOFF * 2**restarts`` seconds, capped at ``RESTART_BACKOFF_CAP``. It
counts restarts in ``restarts.json``. SIGTERM ends it between two actions.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from ..errors import ContainerNotFound, MagikrunError
from ..platform._limits import RESTART_BACKOFF_CAP
from ..platform._paths import Paths
from ..runtime import ContainerStatus, ContainerStore
from ..runtime._store import process_start_time
from ._base import container_id, pod_dir
from ._spec import RestartPolicy
from ._state import PodStore
from ._undo import container_runtime

__all__ = ["supervise"]

_POLL = 0.2


def _should_restart(policy: RestartPolicy, code: int | None) -> bool:
    return policy is RestartPolicy.ALWAYS or (policy is RestartPolicy.ON_FAILURE and code != 0)


async def supervise(paths: Paths, pod_id: str, backoff: float, stopping: asyncio.Event) -> None:
    """Restart the pod's app containers by its policy until ``stopping`` is set."""
    record = PodStore(paths).get(pod_id)
    spec = record.spec
    store = ContainerStore(paths)
    runtime = container_runtime(paths, "wasm" if record.runtime == "wasm" else "native")
    directory = pod_dir(paths, pod_id)
    counts_file = directory / "restarts.json"
    counts: dict[str, int] = {}
    due: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        for container in spec.containers:
            cid = container_id(pod_id, container.name)
            try:
                state = store.load(cid)
            except (ContainerNotFound, FileNotFoundError):
                continue
            if state.status is not ContainerStatus.STOPPED:
                continue
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
            except MagikrunError as exc:
                print(f"restart of {container.name} failed: {exc}", file=sys.stderr, flush=True)
            counts[container.name] = count + 1
            tmp = counts_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(counts))
            tmp.replace(counts_file)
        try:
            await asyncio.wait_for(stopping.wait(), _POLL)
        except TimeoutError:
            pass


def _main(argv: list[str]) -> None:
    data, run, pod_id, backoff = argv
    paths = Paths(data=Path(data), run=Path(run))
    pid_file = pod_dir(paths, pod_id) / "supervisor.pid"
    read_fd, write_fd = os.pipe()
    if os.fork() != 0:
        os.close(write_fd)
        ok = os.read(read_fd, 1) == b"1"
        os._exit(0 if ok else 1)
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    log = os.open(
        pid_file.with_name("supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    pid = os.getpid()
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{pid} {process_start_time(pid)}")
    tmp.replace(pid_file)
    os.write(write_fd, b"1")
    os.close(write_fd)

    async def run_until_signal() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await supervise(paths, pod_id, float(backoff), stopping)

    asyncio.run(run_until_signal())


if __name__ == "__main__":
    _main(sys.argv[1:])
