"""``magikrun image …`` run as a user would: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from magikrun.image import (
    BUSYBOX_DEMO_REF,
    HELLO_WASM_DEMO_REF,
    RegistryClient,
    write_demo_layout,
)
from tests._registry import RegistryServer, busybox_layer, make_image, push_image, unique_repo

MAGIKRUN = Path(sys.executable).with_name("magikrun")


def _run(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(MAGIKRUN), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


def _json(root: Path, *args: str) -> Any:
    return json.loads(_run(root, "--json", *args).stdout)


def test_import_ls_inspect_rm_json(short_tmp: Path) -> None:
    root = short_tmp / "root"
    write_demo_layout(short_tmp / "layout")
    imported = _json(root, "image", "import", str(short_tmp / "layout"))
    assert [i["reference"] for i in imported] == [BUSYBOX_DEMO_REF, HELLO_WASM_DEMO_REF]

    listed = _json(root, "image", "ls")
    assert [i["reference"] for i in listed] == [BUSYBOX_DEMO_REF, HELLO_WASM_DEMO_REF]
    assert {i["kind"] for i in listed} == {"oci", "wasm"}
    assert all(i["size"] > 0 for i in listed)

    doc = _json(root, "image", "inspect", BUSYBOX_DEMO_REF)
    assert doc["manifest_digest"] == imported[0]["manifest_digest"]
    assert doc["config"]["config"]["Cmd"] == ["sh"]
    assert doc["layers"][0]["unpacked"] is True
    assert doc["manifest"]["layers"][0]["digest"] == doc["layers"][0]["digest"]

    human = _run(root, "image", "ls").stdout
    assert BUSYBOX_DEMO_REF in human and "REFERENCE" in human
    assert "Layers:" in _run(root, "image", "inspect", HELLO_WASM_DEMO_REF).stdout

    removed = _json(root, "image", "rm", HELLO_WASM_DEMO_REF)
    assert removed[0]["reference"] == HELLO_WASM_DEMO_REF and len(removed[0]["blobs"]) == 3
    assert [i["reference"] for i in _json(root, "image", "ls")] == [BUSYBOX_DEMO_REF]


def test_errors_print_message_and_hint(short_tmp: Path) -> None:
    root = short_tmp / "root"
    proc = _run(root, "image", "inspect", "example.local/missing:1", ok=False)
    assert "magikrun: error: image example.local/missing:1 is not in the local store" in proc.stderr
    assert "hint: list images" in proc.stderr
    proc = _run(root, "--json", "image", "rm", "example.local/missing:1", ok=False)
    assert json.loads(proc.stderr)["error"] == "ImageNotFound"
    evil = short_tmp / "evil.tar"
    subprocess.run(["tar", "-cf", str(evil), "-C", str(short_tmp), "root"], check=True)
    proc = _run(root, "image", "import", str(evil), ok=False)
    assert "neither index.json nor manifest.json" in proc.stderr
    assert _json(root, "image", "ls") == []


def test_demo_verify_and_system_gc(short_tmp: Path) -> None:
    root = short_tmp / "root"
    demo = _json(root, "image", "demo")
    assert [i["reference"] for i in demo] == [BUSYBOX_DEMO_REF, HELLO_WASM_DEMO_REF]
    assert _json(root, "image", "demo") == demo
    assert _json(root, "image", "verify", BUSYBOX_DEMO_REF)["healthy"] is True
    _run(root, "image", "rm", BUSYBOX_DEMO_REF)
    assert _json(root, "system", "gc")["blobs"] == []


async def test_pull_logs_one_line_per_blob_and_quiet_prints_nothing(
    short_tmp: Path, registry: RegistryServer
) -> None:
    image = make_image([busybox_layer()])
    repo = unique_repo("cli")
    async with RegistryClient(registry.host) as client:
        await push_image(client, repo, "1", image)
    ref = f"{registry.host}/{repo}:1"
    proc = _run(short_tmp / "a", "image", "pull", ref)
    assert proc.stdout.strip() == f"{ref} {image.digest}"
    for digest in image.layer_digests:
        assert f"{digest[7:19]}: done" in proc.stderr
    quiet = _run(short_tmp / "b", "image", "pull", "--quiet", ref)
    assert quiet.stdout == "" and quiet.stderr == ""
    pulled = _json(short_tmp / "b", "image", "pull", ref)
    assert pulled["manifest_digest"] == image.digest


@pytest.mark.parametrize("args", [["image", "pull", "bad ref"], ["image", "rm", "x.local/UP:1"]])
def test_invalid_references_are_refused(short_tmp: Path, args: list[str]) -> None:
    proc = _run(short_tmp / "root", *args, ok=False)
    assert "invalid image reference" in proc.stderr
    assert "hint:" in proc.stderr
