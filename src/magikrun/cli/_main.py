"""Root of the ``magikrun`` command: global options, lazy sub-commands, error printing.

Sub-command modules are imported only when their command runs, so that
``magikrun state ID`` does not pay for httpx, rich or wasmtime.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from ..errors import MagikrunError

# command name -> (module, attribute). Groups and the OCI runtime verbs alike.
_COMMANDS: dict[str, tuple[str, str]] = {
    "image": ("magikrun.cli._image", "image"),
    "pod": ("magikrun.cli._pod", "pod"),
    "create": ("magikrun.cli._oci", "create"),
    "start": ("magikrun.cli._oci", "start"),
    "state": ("magikrun.cli._oci", "state"),
    "kill": ("magikrun.cli._oci", "kill"),
    "delete": ("magikrun.cli._oci", "delete"),
    "run": ("magikrun.cli._oci", "run"),
    "exec": ("magikrun.cli._oci", "exec_"),
    "list": ("magikrun.cli._oci", "list_"),
    "ps": ("magikrun.cli._oci", "ps"),
    "system": ("magikrun.cli._system", "system"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _COMMANDS:
            module, attr = _COMMANDS[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


class Context:
    """What every sub-command gets through ``click.pass_obj``."""

    def __init__(self, root: str | None, json_output: bool) -> None:
        self.root = root
        self.json = json_output

    @property
    def paths(self) -> Any:
        from ..platform import Paths

        return Paths.resolve(self.root)

    def emit(self, data: Any) -> None:
        """Print ``data`` as JSON (the machine form every command offers)."""
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    envvar="MAGIKRUN_ROOT",
    type=click.Path(file_okay=False),
    help="Keep all content and state under this directory.",
)
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@click.option("--log", hidden=True, help="Accepted for runc compatibility.")
@click.option("--log-format", hidden=True, help="Accepted for runc compatibility.")
@click.option("--debug", is_flag=True, hidden=True, help="Accepted for runc compatibility.")
@click.option(
    "--systemd-cgroup", is_flag=True, hidden=True, help="Accepted for runc compatibility."
)
@click.pass_context
def cli(
    ctx: click.Context,
    root: str | None,
    json_output: bool,
    log: str | None,
    log_format: str | None,
    debug: bool,
    systemd_cgroup: bool,
) -> None:
    """magikrun: Linux containers, WebAssembly modules and microVMs behind one runtime."""
    ctx.obj = Context(root, json_output)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, print magikrun errors as message + hint, exit non-zero."""
    try:
        cli.main(args=argv, prog_name="magikrun", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except MagikrunError as exc:
        if "--json" in (argv if argv is not None else sys.argv[1:]):
            click.echo(json.dumps(exc.to_dict()), err=True)
        else:
            click.echo(f"magikrun: error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(1)
