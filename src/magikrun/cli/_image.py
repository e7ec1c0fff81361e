"""``magikrun image``: pull, list, inspect, remove, import, verify, and the demo images."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..image import Image, ImageService, build_demo_images

if TYPE_CHECKING:
    from ..image import ProgressEvent
from ._main import Context

__all__ = ["image"]

_T = TypeVar("_T")

json_option = click.option("--json", "json_flag", is_flag=True, help="Machine-readable output.")


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def _wants_json(ctx: Context, flag: bool) -> bool:
    return ctx.json or flag


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _image_json(image: Image) -> dict[str, Any]:
    doc = asdict(image)
    doc["platform"] = str(image.platform)
    doc["size"] = image.size
    return doc


@click.group()
def image() -> None:
    """Pull, import, list, inspect and remove images."""


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[ProgressEvent], None] | None]:
    """Per-blob progress: rich bars on a terminal, one log line per blob otherwise."""
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        seen: set[str] = set()

        def log(event: ProgressEvent) -> None:
            if event.finished and event.digest not in seen:
                seen.add(event.digest)
                click.echo(f"{_short(event.digest)}: done ({_size(event.total)})", err=True)

        yield log
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bars:
        tasks: dict[str, Any] = {}

        def show(event: ProgressEvent) -> None:
            task = tasks.get(event.digest)
            if task is None:
                task = tasks[event.digest] = bars.add_task(_short(event.digest), total=event.total)
            bars.update(task, completed=event.total if event.finished else event.done)

        yield show


@image.command()
@click.argument("ref")
@click.option("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image.")
@click.option("--creds", help="USER:PASSWORD for the registry.")
@click.option("--plain-http", is_flag=True, default=None, help="Talk HTTP, not HTTPS.")
@click.option(
    "--policy",
    type=click.Choice(["IfNotPresent", "Always", "Never"]),
    default="IfNotPresent",
    show_default=True,
    help="Whether to ask the registry when the image is stored already.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@json_option
@click.pass_obj
def pull(
    ctx: Context,
    ref: str,
    platform: str | None,
    creds: str | None,
    plain_http: bool | None,
    policy: Any,
    quiet: bool,
    json_flag: bool,
) -> None:
    """Pull REF from its registry and unpack its layers."""
    service = ImageService(ctx.paths.ensure())
    as_json = _wants_json(ctx, json_flag)
    with _progress(quiet or as_json) as progress:
        pulled = _run(
            service.pull(
                ref,
                platform=platform,
                creds=creds,
                plain_http=plain_http,
                progress=progress,
                policy=policy,
            )
        )
    if as_json:
        ctx.emit(_image_json(pulled))
    elif not quiet:
        click.echo(f"{pulled.reference} {pulled.manifest_digest}")


@image.command("ls")
@json_option
@click.pass_obj
def list_images(ctx: Context, json_flag: bool) -> None:
    """List stored images."""
    summaries = ImageService(ctx.paths.ensure()).list()
    if _wants_json(ctx, json_flag):
        ctx.emit([asdict(s) for s in summaries])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("REFERENCE", "DIGEST", "KIND", "PLATFORM", "SIZE", "PULLED"):
        table.add_column(column, no_wrap=True)
    for s in summaries:
        table.add_row(
            s.reference,
            _short(s.manifest_digest),
            s.kind,
            s.platform,
            _size(s.size),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.pulled)),
        )
    Console(width=None if sys.stdout.isatty() else 250).print(table)


@image.command()
@click.argument("ref")
@json_option
@click.pass_obj
def inspect(ctx: Context, ref: str, json_flag: bool) -> None:
    """Show REF's manifest, config, layers and sizes."""
    doc = ImageService(ctx.paths.ensure()).inspect(ref)
    if _wants_json(ctx, json_flag):
        ctx.emit(doc)
        return
    settings = doc["config"].get("config") or {}
    click.echo(f"Reference:  {doc['reference']}")
    click.echo(f"Digest:     {doc['manifest_digest']}")
    click.echo(f"Config:     {doc['config_digest']}")
    click.echo(f"Kind:       {doc['kind']}")
    click.echo(f"Platform:   {doc['platform']}")
    click.echo(f"Size:       {_size(doc['size'])}")
    click.echo(f"Created:    {doc['created'] or '-'}")
    for key in ("Entrypoint", "Cmd", "Env", "WorkingDir", "User"):
        if settings.get(key):
            click.echo(f"{key + ':':<11} {settings[key]}")
    click.echo("Layers:")
    for layer in doc["layers"]:
        state = {True: "unpacked", False: "not unpacked", None: "not an archive"}[layer["unpacked"]]
        click.echo(
            f"  {layer['digest']}  {_size(layer['size']):>9}  {layer['media_type']}  ({state})"
        )


@image.command()
@click.argument("refs", nargs=-1, required=True)
@json_option
@click.pass_obj
def rm(ctx: Context, refs: tuple[str, ...], json_flag: bool) -> None:
    """Remove images; blobs and layers no other image uses are freed."""
    service = ImageService(ctx.paths.ensure())
    results = []
    for ref in refs:
        freed = _run(service.remove(ref))
        results.append({"reference": ref, **asdict(freed)})
        if not _wants_json(ctx, json_flag):
            click.echo(
                f"removed {ref} (freed {len(freed.blobs)} blobs, {len(freed.snapshots)} "
                f"layers, {_size(freed.bytes_freed)})"
            )
    if _wants_json(ctx, json_flag):
        ctx.emit(results)


@image.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.argument("ref", required=False)
@click.option("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform index.")
@json_option
@click.pass_obj
def import_(
    ctx: Context, path: str, ref: str | None, platform: str | None, json_flag: bool
) -> None:
    """Import an OCI layout (directory or tar) or a 'docker save' archive, as REF if given."""
    from ..image import PlatformSpec

    service = ImageService(ctx.paths.ensure())
    wanted = PlatformSpec.parse(platform) if platform else None
    images = _run(service.import_(path, reference=ref, platform=wanted))
    if _wants_json(ctx, json_flag):
        ctx.emit([_image_json(i) for i in images])
        return
    for i in images:
        click.echo(f"imported {i.reference} {i.manifest_digest}")


@image.command()
@click.argument("ref")
@json_option
@click.pass_obj
def verify(ctx: Context, ref: str, json_flag: bool) -> None:
    """Re-hash every blob of REF; fetch corrupt ones again from its registry."""
    result = _run(ImageService(ctx.paths.ensure()).verify(ref))
    if _wants_json(ctx, json_flag):
        ctx.emit({**asdict(result), "healthy": result.healthy})
    else:
        click.echo(
            f"{result.reference}: {len(result.ok)} ok, {len(result.repaired)} repaired, "
            f"{len(result.broken)} broken"
        )
        for digest in result.broken:
            click.echo(f"  broken: {digest}")
        if result.error:
            click.echo(f"  repair failed: {result.error}")
    if not result.healthy:
        sys.exit(1)


@image.command()
@json_option
@click.pass_obj
def demo(ctx: Context, json_flag: bool) -> None:
    """Build the embedded demo images (busybox, hello-wasm) and import them."""
    images = _run(build_demo_images(ctx.paths.ensure()))
    if _wants_json(ctx, json_flag):
        ctx.emit([_image_json(i) for i in images])
        return
    for i in images:
        click.echo(f"imported {i.reference} {i.manifest_digest}")
