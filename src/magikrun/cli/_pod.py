"""``magikrun pod``: run Kubernetes Pod manifests and manage the pods that run.

Only click is imported at module level: the pod runtimes, rich and the image layer are
imported inside the commands, so ``magikrun pod ls`` starts as fast as the CLI can.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ._main import Context

if TYPE_CHECKING:
    from datetime import datetime

    from ..platform import Paths
    from ..pod import PodRuntime, PodSpec, PodStatus
    from ..runtime import ExecResult

__all__ = ["pod"]

_T = TypeVar("_T")

_RUNTIMES = ("native", "wasm", "microvm")

json_option = click.option("--json", "json_flag", is_flag=True, help="Machine-readable output.")
namespace_option = click.option(
    "-n", "--namespace", default="default", show_default=True, help="The pod's namespace."
)


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    import asyncio  # 70 ms of imports: only once a command runs

    return asyncio.run(coro)


def _wants_json(ctx: Context, flag: bool) -> bool:
    return ctx.json or flag


def _age(since: datetime) -> str:
    seconds = max(0, int(time.time() - since.timestamp()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(stamp: datetime | None) -> str:
    return "-" if stamp is None else stamp.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _ready(status: PodStatus) -> str:
    apps = [c for c in status.containers if not c.init]
    running = sum(1 for c in apps if c.state == "running")
    return f"{running}/{len(apps)}"


def _locate(paths: Paths, pod: str, namespace: str) -> tuple[PodRuntime, str]:
    """The runtime that owns pod ``pod`` (a name or an id) and the pod's id."""
    from ..pod import find_pod, runtime_for_pod

    pod_id = find_pod(paths, pod, namespace)
    return runtime_for_pod(paths, pod_id), pod_id


@click.group()
def pod() -> None:
    """Run Kubernetes Pod manifests: natively, as WebAssembly, or in a microVM."""


async def _pull_with_progress(paths: Paths, spec: PodSpec) -> None:
    """Pull the pod's images before ``run_pod``, so that a terminal shows their progress."""
    from ..image import ImageService
    from ._image import _progress

    service = ImageService(paths)
    refs = {c.image: c.image_pull_policy for c in (*spec.init_containers, *spec.containers)}
    with _progress(quiet=False) as progress:
        for ref, policy in refs.items():
            await service.pull(ref, policy=policy.value, progress=progress)


@pod.command("run")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--runtime",
    type=click.Choice([*_RUNTIMES, *(f"magikrun-{r}" for r in _RUNTIMES)]),
    help="Override the manifest's runtimeClassName.",
)
@click.option(
    "--vm-network",
    type=click.Choice(["bridge", "user"]),
    help="A microVM pod's network: its NIC on the CNI bridge (fails where that can't be set "
    "up) or QEMU's user-mode networking. Default: the bridge where it works, user otherwise.",
)
@json_option
@click.pass_obj
def run(
    ctx: Context, manifest: Path, runtime: str | None, vm_network: str | None, json_flag: bool
) -> None:
    """Run the pod in MANIFEST (a v1 Pod, plus its ConfigMaps and Secrets).

    Returns once every container runs; on failure nothing of the pod is left.
    """
    from ..platform import MAX_POD_SPEC_SIZE
    from ..pod import PodSpec, open_pod_runtime

    with manifest.open("rb") as file:
        data = file.read(MAX_POD_SPEC_SIZE + 1)
    spec = PodSpec.from_yaml(data)
    paths = ctx.paths.ensure()
    as_json = _wants_json(ctx, json_flag)

    async def go() -> PodStatus:
        backend = open_pod_runtime(paths, runtime, spec, vm_network=vm_network)
        if sys.stderr.isatty() and not as_json:
            await _pull_with_progress(paths, spec)
        handle = await backend.run_pod(spec)
        return await backend.pod_status(handle.id)

    status = _run(go())
    if as_json:
        ctx.emit(status.to_dict())
    else:
        click.echo(
            f"pod {status.namespace}/{status.name} started on {status.runtime}: "
            f"id {status.id}, ip {status.ip or '-'}, phase {status.phase}"
        )


@pod.command("ls")
@json_option
@click.pass_obj
def list_pods(ctx: Context, json_flag: bool) -> None:
    """List pods: NAME, NAMESPACE, RUNTIME, PHASE, IP, ready/total containers, AGE."""
    from ..pod import list_all_pods

    pods = _run(list_all_pods(ctx.paths.ensure()))
    if _wants_json(ctx, json_flag):
        ctx.emit([p.to_dict() for p in pods])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "NAMESPACE", "RUNTIME", "PHASE", "IP", "CONTAINERS", "AGE"):
        table.add_column(column, no_wrap=True)
    for p in pods:
        table.add_row(
            p.name, p.namespace, p.runtime, str(p.phase), p.ip or "-", _ready(p), _age(p.created_at)
        )
    Console(width=None if sys.stdout.isatty() else 250).print(table)


@pod.command()
@click.argument("pod_name", metavar="POD")
@namespace_option
@json_option
@click.pass_obj
def status(ctx: Context, pod_name: str, namespace: str, json_flag: bool) -> None:
    """Show POD's phase and each container's state, exit code, reason and restarts."""

    async def go() -> PodStatus:
        backend, pod_id = _locate(ctx.paths.ensure(), pod_name, namespace)
        return await backend.pod_status(pod_id)

    st = _run(go())
    if _wants_json(ctx, json_flag):
        ctx.emit(st.to_dict())
        return
    click.echo(f"Name:       {st.name}")
    click.echo(f"Namespace:  {st.namespace}")
    click.echo(f"ID:         {st.id}")
    click.echo(f"Runtime:    {st.runtime}")
    click.echo(f"Phase:      {st.phase}")
    click.echo(f"IP:         {st.ip or '-'}")
    click.echo(f"Created:    {_when(st.created_at)}")
    if st.message:
        click.echo(f"Message:    {st.message}")
    click.echo("Containers:")
    rows = [("NAME", "STATE", "EXIT", "REASON", "RESTARTS", "STARTED", "FINISHED", "IMAGE")]
    for c in st.containers:
        rows.append(
            (
                f"{c.name} (init)" if c.init else c.name,
                c.state,
                "-" if c.exit_code is None else str(c.exit_code),
                c.reason or "-",
                str(c.restart_count),
                _when(c.started_at),
                _when(c.finished_at),
                c.image,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )


@pod.command()
@click.argument("pod_name", metavar="POD")
@click.option("-c", "--container", help="Only this container's log.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the pod ends.")
@click.option("--tail", type=click.IntRange(min=0), help="Only the last N lines of each log.")
@click.option("--timestamps", is_flag=True, help="Prefix each line with its time.")
@namespace_option
@click.pass_obj
def logs(
    ctx: Context,
    pod_name: str,
    container: str | None,
    follow: bool,
    tail: int | None,
    timestamps: bool,
    namespace: str,
) -> None:
    """Print the logs of POD's containers (stderr lines go to stderr)."""

    async def go() -> None:
        backend, pod_id = _locate(ctx.paths.ensure(), pod_name, namespace)
        lines = backend.logs(pod_id, container, follow=follow, tail=tail, timestamps=timestamps)
        async for line in lines:
            prefix = "" if container else f"[{line.container}] "
            stamp = f"{line.time.isoformat()} " if timestamps else ""
            click.echo(f"{prefix}{stamp}{line.text}", err=line.stream == "stderr")

    try:
        _run(go())
    except KeyboardInterrupt:
        sys.exit(130)


@pod.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("pod_name", metavar="POD")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-c", "--container", help="The container to run in (default: the first one).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds before the command is killed.",
)
@namespace_option
@click.pass_obj
def exec_(
    ctx: Context,
    pod_name: str,
    command: tuple[str, ...],
    container: str | None,
    timeout: float | None,
    namespace: str,
) -> None:
    """Run COMMAND in a container of POD; exits with COMMAND's exit code."""
    import os

    from ..platform import EXEC_TIMEOUT

    async def go() -> ExecResult:
        backend, pod_id = _locate(ctx.paths.ensure(), pod_name, namespace)
        return await backend.exec(pod_id, container, command, timeout=timeout or EXEC_TIMEOUT)

    result = _run(go())
    os.write(sys.stdout.fileno(), result.stdout)
    os.write(sys.stderr.fileno(), result.stderr)
    sys.exit(result.exit_code)


@pod.command()
@click.argument("pod_name", metavar="POD")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    help="Seconds between SIGTERM and SIGKILL (default: the pod's terminationGracePeriodSeconds).",
)
@namespace_option
@click.pass_obj
def stop(ctx: Context, pod_name: str, grace: float | None, namespace: str) -> None:
    """Stop POD's containers (SIGTERM, then SIGKILL after the grace period)."""

    async def go() -> PodStatus:
        backend, pod_id = _locate(ctx.paths.ensure(), pod_name, namespace)
        await backend.stop_pod(pod_id, grace=grace)
        return await backend.pod_status(pod_id)

    st = _run(go())
    if ctx.json:
        ctx.emit(st.to_dict())
    else:
        click.echo(f"stopped {st.namespace}/{st.name}")


@pod.command()
@click.argument("pod_name", metavar="POD")
@click.option("--force", "-f", is_flag=True, help="Kill a running pod instead of refusing.")
@namespace_option
@click.pass_obj
def rm(ctx: Context, pod_name: str, force: bool, namespace: str) -> None:
    """Remove POD and everything it made (containers, network, volumes, state)."""

    async def go() -> str:
        backend, pod_id = _locate(ctx.paths.ensure(), pod_name, namespace)
        await backend.delete_pod(pod_id, force=force)
        return pod_id

    pod_id = _run(go())
    if ctx.json:
        ctx.emit({"id": pod_id, "removed": True})
    else:
        click.echo(f"removed {pod_name} ({pod_id})")
