"""``magikrun system``: what this machine can run, and housekeeping of the magikrun root.

Each sub-command is one function on the ``system`` group; the report builders are plain
functions so that the JSON form and the two human forms cannot drift apart.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..platform import Paths, Platform, find_tools
from ._main import Context

_PATH_NAMES = (
    "data",
    "run",
    "blobs",
    "ingest",
    "snapshots",
    "cache",
    "metadata_db",
    "containers",
    "bundles",
    "oci_root",
)

Section = tuple[str, list[tuple[str, str]]]


@click.group()
def system() -> None:
    """Facts about this machine and housekeeping of the magikrun root."""


@system.command()
@click.pass_obj
def info(ctx: Context) -> None:
    """Show the platform, its capabilities, the hypervisor verdict, backends and paths.

    The first run after a boot test-boots the guest kernel under KVM (up to 10 s);
    later runs read the verdict from the root's cache.
    """
    report = system_report(ctx.paths)
    if ctx.json:
        ctx.emit(report)
    elif sys.stdout.isatty():
        _print_rich(_sections(report))
    else:
        _print_plain(_sections(report))


@system.command()
@click.pass_obj
def gc(ctx: Context) -> None:
    """Roll back half-made pods, then free blobs, layers and downloads nothing references."""
    import asyncio
    from dataclasses import asdict

    from ..image import ImageService
    from ..pod import recover_pods

    paths = ctx.paths.ensure()
    pods = asyncio.run(recover_pods(paths))
    result = asyncio.run(ImageService(paths).gc())
    if ctx.json:
        ctx.emit({**asdict(result), "pods": pods})
    else:
        if pods:
            click.echo(f"rolled back {len(pods)} half-made pods: {', '.join(pods)}")
        click.echo(
            f"freed {len(result.blobs)} blobs, {len(result.snapshots)} layers, "
            f"{len(result.ingests)} stale downloads ({result.bytes_freed} bytes)"
        )


def system_report(paths: Paths) -> dict[str, Any]:
    """Everything ``system info`` shows, JSON-friendly."""
    import importlib.metadata  # costs 0.2 s of imports, so only where it is used

    try:
        wasmtime: str | None = importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        wasmtime = None
    return {
        "platform": Platform.detect(paths).to_dict(),
        "backends": {t.name: {"path": t.path, "version": t.version} for t in find_tools()},
        "wasmtime": wasmtime,
        "paths": {name: str(getattr(paths, name)) for name in _PATH_NAMES},
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _sections(report: dict[str, Any]) -> list[Section]:
    p = report["platform"]
    cgroups = p["cgroups"]
    hierarchies = []
    for h in cgroups["hierarchies"]:
        if h["controllers"] or h["version"] == 2:
            hierarchies.append(
                f"v{h['version']} {h['mountpoint']}: {', '.join(h['controllers']) or '-'}"
            )
    cgroup_text = "\n".join([cgroups["mode"], *hierarchies])
    if cgroups["unified_holds_controllers"]:
        cgroup_text += (
            "\nthe cgroup2 hierarchy holds controllers: crun 1.8 refuses this hybrid layout"
        )
    platform_rows = [
        ("platform", p["oci_platform"]),
        ("kernel", p["kernel"]),
        ("namespaces", ", ".join(p["namespaces"]) or "-"),
        ("cgroups", cgroup_text),
        ("seccomp", _yes(p["seccomp"])),
        ("overlayfs", _yes(p["overlayfs"])),
        ("user namespaces", _yes(p["user_namespaces"])),
        ("wasm", _yes(p["wasm"])),
    ]
    backends = [
        (name, f"{b['version'] or 'unknown version'}  {b['path']}" if b["path"] else "not found")
        for name, b in report["backends"].items()
    ]
    backends.append(("wasmtime", report["wasmtime"] or "not installed"))
    return [
        ("Platform", platform_rows),
        ("Capabilities", [("tags", ", ".join(p["capabilities"]) or "-")]),
        (
            "Hypervisor",
            [("kind", p["hypervisor"]["kind"]), ("reason", p["hypervisor"]["reason"])],
        ),
        ("Backends", backends),
        ("Paths", list(report["paths"].items())),
    ]


def _print_plain(sections: list[Section]) -> None:
    width = max(len(key) for _, rows in sections for key, _ in rows)
    for index, (title, rows) in enumerate(sections):
        if index:
            click.echo()
        click.echo(f"{title}:")
        for key, value in rows:
            first, *rest = value.splitlines() or [""]
            click.echo(f"  {key:<{width}}  {first}")
            for line in rest:
                click.echo(f"  {'':<{width}}  {line}")


def _print_rich(sections: list[Section]) -> None:
    from rich.console import Console
    from rich.table import Table

    width = max(len(key) for _, rows in sections for key, _ in rows)
    console = Console()
    for title, rows in sections:
        table = Table(title=title, title_justify="left", show_header=False, box=None)
        table.add_column(style="bold", min_width=width)
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
