"""``magikrun system info``: the JSON schema, the plain form, and the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from click.testing import CliRunner

from magikrun.cli._main import cli
from magikrun.platform import Capability, HypervisorKind, Paths

PLATFORM_KEYS = {
    "os",
    "arch",
    "variant",
    "oci_platform",
    "kernel",
    "capabilities",
    "namespaces",
    "cgroups",
    "seccomp",
    "overlayfs",
    "user_namespaces",
    "hypervisor",
    "wasm",
    "qemu",
    "guest_kernel",
}
BACKENDS = {"crun", "runc", "conmon", "qemu-system-x86_64", "virtiofsd", "guest-kernel"}


def _check_schema(report: dict[str, Any], paths: Paths) -> None:
    assert set(report) == {"platform", "backends", "wasmtime", "paths"}
    platform = report["platform"]
    assert set(platform) == PLATFORM_KEYS
    assert platform["oci_platform"].startswith(f"{platform['os']}/{platform['arch']}")
    assert set(platform["capabilities"]) <= {str(c) for c in Capability}
    assert platform["hypervisor"]["kind"] in {str(k) for k in HypervisorKind}
    assert platform["hypervisor"]["reason"]
    cgroups = platform["cgroups"]
    assert cgroups["mode"] in {"v1", "v2", "hybrid", "none"}
    assert isinstance(cgroups["unified_holds_controllers"], bool)
    for hierarchy in cgroups["hierarchies"]:
        assert hierarchy["version"] in (1, 2)
        assert isinstance(hierarchy["controllers"], list)
    assert BACKENDS <= set(report["backends"])
    for backend in report["backends"].values():
        assert set(backend) == {"path", "version"}
        if backend["path"] is None:
            assert backend["version"] is None
    assert report["paths"]["data"] == str(paths.data)
    assert report["paths"]["cache"] == str(paths.cache)
    assert report["paths"]["oci_root"] == str(paths.oci_root)


def test_json_schema(paths: Paths) -> None:
    result = CliRunner().invoke(cli, ["--root", str(paths.data), "--json", "system", "info"])
    assert result.exit_code == 0, result.output
    _check_schema(json.loads(result.output), paths)


def test_plain_output_has_every_section(paths: Paths) -> None:
    result = CliRunner().invoke(cli, ["--root", str(paths.data), "system", "info"])
    assert result.exit_code == 0, result.output
    for section in ("Platform:", "Capabilities:", "Hypervisor:", "Backends:", "Paths:"):
        assert section in result.output
    assert "\x1b[" not in result.output  # no terminal codes when not on a terminal
    report = json.loads(
        CliRunner().invoke(cli, ["--root", str(paths.data), "--json", "system", "info"]).output
    )
    assert report["platform"]["hypervisor"]["reason"] in result.output.replace("\n", "")


def test_entry_point_json(paths: Paths) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "magikrun", "--root", str(paths.data), "--json", "system", "info"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    _check_schema(report, paths)
    assert (paths.cache / "hypervisor.json").is_file()
