"""The OCI runtime command line: runc-compatible verbs over magikrun's runtimes.

Standard verbs (create, start, state, kill, delete) come first, then the common
extras (run, exec, list, ps), as liboci-cli splits them. Flags runc accepts that
magikrun does not need are accepted and ignored, so tools written for runc can
use ``magikrun`` as their runtime. This module stays lean: no httpx, rich or
wasmtime on its import path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from ..runtime import OciRuntime, RuntimeRegistry, load_bundle_config, parse_signal

__all__ = ["create", "delete", "exec_", "kill", "list_", "ps", "run", "start", "state"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _registry(obj: Any, oci_binary: str | None) -> RuntimeRegistry:
    return RuntimeRegistry(obj.paths.ensure(), oci_binary=oci_binary)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _oci_binary_option(func: F) -> F:
    return click.option(
        "--oci-binary",
        envvar="MAGIKRUN_OCI_BINARY",
        help="OCI runtime for native containers: crun (default) or runc.",
    )(func)


def _ignored(*names: str, flag: bool = False) -> Callable[[F], F]:
    """runc flags that are accepted and have no effect here."""

    def decorate(func: F) -> F:
        for name in names:
            option = click.option(name, hidden=True, is_flag=flag, expose_value=False)
            func = option(func)
        return func

    return decorate


async def _create(
    registry: RuntimeRegistry,
    id: str,
    bundle: str,
    *,
    pid_file: str | None,
    console_socket: str | None,
    runtime: str | None,
    foreground: bool,
) -> OciRuntime:
    spec = load_bundle_config(bundle)
    backend = registry.backend(registry.select_backend(spec, runtime))
    await backend.create(
        id, bundle, pid_file=pid_file, console_socket=console_socket, foreground=foreground
    )
    return backend


def _create_options(func: F) -> F:
    for option in reversed(
        [
            click.option("--bundle", "-b", default=".", type=click.Path(file_okay=False)),
            click.option("--pid-file", type=click.Path(dir_okay=False)),
            click.option("--console-socket", type=click.Path(dir_okay=False)),
            click.option("--runtime", help="native, wasm or microvm (default: from the bundle)."),
        ]
    ):
        func = option(func)
    func = _ignored("--no-pivot", "--no-new-keyring", flag=True)(func)
    return _ignored("--preserve-fds", "--notify-socket")(func)


# ---------------------------------------------------------------------------- standard verbs


@click.command()
@click.argument("id")
@_create_options
@_oci_binary_option
@click.pass_obj
def create(
    obj: Any,
    id: str,
    bundle: str,
    pid_file: str | None,
    console_socket: str | None,
    runtime: str | None,
    oci_binary: str | None,
) -> None:
    """Create container ID from the bundle; its process waits for 'start'."""
    registry = _registry(obj, oci_binary)
    _run(
        _create(
            registry,
            id,
            bundle,
            pid_file=pid_file,
            console_socket=console_socket,
            runtime=runtime,
            foreground=False,
        )
    )


@click.command()
@click.argument("id")
@_oci_binary_option
@click.pass_obj
def start(obj: Any, id: str, oci_binary: str | None) -> None:
    """Run the user process of created container ID."""
    registry = _registry(obj, oci_binary)
    _run(registry.for_container(id).start(id))


@click.command()
@click.argument("id")
@click.pass_obj
def state(obj: Any, id: str) -> None:
    """Print the OCI state document of container ID."""
    registry = _registry(obj, None)
    obj.emit(_run(registry.for_container(id).state(id)).to_oci())


@click.command()
@click.argument("id")
@click.argument("signal", default="TERM")
@click.option("--all", "-a", "all_", is_flag=True, help="Signal every process of the container.")
@_oci_binary_option
@click.pass_obj
def kill(obj: Any, id: str, signal: str, all_: bool, oci_binary: str | None) -> None:
    """Send SIGNAL (name or number, default TERM) to container ID."""
    number = parse_signal(signal)
    registry = _registry(obj, oci_binary)
    _run(registry.for_container(id).kill(id, number, all=all_))


@click.command()
@click.argument("id")
@click.option("--force", "-f", is_flag=True, help="Kill the container first if it still runs.")
@_oci_binary_option
@click.pass_obj
def delete(obj: Any, id: str, force: bool, oci_binary: str | None) -> None:
    """Remove container ID and everything magikrun kept for it."""
    registry = _registry(obj, oci_binary)
    _run(registry.for_container(id).delete(id, force=force))


# ----------------------------------------------------------------------------------- extras


@click.command(name="list")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--quiet", "-q", is_flag=True, help="Print only the ids.")
@click.pass_obj
def list_(obj: Any, fmt: str, quiet: bool) -> None:
    """List the containers of this magikrun root."""
    states = [r.to_state().to_oci() for r in _registry(obj, None).store.list()]
    if obj.json or fmt == "json":
        obj.emit(states)
        return
    if quiet:
        for doc in states:
            click.echo(doc["id"])
        return
    rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED")]
    rows += [
        (d["id"], str(d.get("pid", 0)), d["status"], d["bundle"], d.get("created", ""))
        for d in states
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@click.command()
@click.argument("id")
@_create_options
@click.option("--detach", "-d", is_flag=True, help="Return once started; do not wait.")
@click.option("--keep", is_flag=True, help="Do not delete the container after it exits.")
@_oci_binary_option
@click.pass_obj
def run(
    obj: Any,
    id: str,
    bundle: str,
    pid_file: str | None,
    console_socket: str | None,
    runtime: str | None,
    detach: bool,
    keep: bool,
    oci_binary: str | None,
) -> None:
    """Create, start and wait for container ID; exits with the container's exit code.

    In the foreground the container's stdin, stdout and stderr are this command's,
    and SIGINT/SIGTERM/SIGHUP/SIGQUIT are passed on to it.
    """
    registry = _registry(obj, oci_binary)

    async def _go() -> int:
        backend = await _create(
            registry,
            id,
            bundle,
            pid_file=pid_file,
            console_socket=console_socket,
            runtime=runtime,
            foreground=not detach,
        )
        try:
            await backend.start(id)
            if detach:
                return 0
            loop = asyncio.get_running_loop()
            forwarding: set[asyncio.Task[None]] = set()
            for sig in _FORWARDED:
                loop.add_signal_handler(sig, _forward, backend, id, sig, forwarding)
            return await backend.wait(id)
        finally:
            if not detach and not keep:
                with contextlib.suppress(Exception):
                    await backend.delete(id, force=True)

    sys.exit(_run(_go()))


def _forward(backend: OciRuntime, id: str, sig: int, tasks: set[asyncio.Task[None]]) -> None:
    task = asyncio.ensure_future(backend.kill(id, sig))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE for the process (repeatable).")
@click.option("--cwd", help="Working directory inside the container.")
@_ignored("--tty", "-t", "--detach", "-d", "--no-new-privs", flag=True)
@_ignored("--user", "-u", "--process", "-p", "--console-socket", "--pid-file")
@_oci_binary_option
@click.pass_obj
def exec_(
    obj: Any,
    id: str,
    command: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str | None,
    oci_binary: str | None,
) -> None:
    """Run COMMAND inside running container ID; exits with its exit code."""
    environment = dict(item.partition("=")[::2] for item in env)
    registry = _registry(obj, oci_binary)
    result = _run(registry.for_container(id).exec(id, list(command), env=environment, cwd=cwd))
    os.write(sys.stdout.fileno(), result.stdout)
    os.write(sys.stderr.fileno(), result.stderr)
    sys.exit(result.exit_code)


@click.command()
@click.argument("id")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@_oci_binary_option
@click.pass_obj
def ps(obj: Any, id: str, fmt: str, oci_binary: str | None) -> None:
    """List the host pids of the processes in container ID."""
    registry = _registry(obj, oci_binary)
    pids = _run(registry.for_container(id).ps(id))
    if obj.json or fmt == "json":
        obj.emit(pids)
        return
    click.echo("PID")
    for pid in pids:
        click.echo(str(pid))
