"""``magikrun pod`` with a pod whose runtime this magikrun cannot open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magikrun.platform import Paths
from magikrun.pod import PodSpec
from magikrun.pod._state import PodStore
from tests.cli.test_pod import _json, _name, _run
from tests.conftest import requires_root

pytestmark = [requires_root, pytest.mark.root]


def test_a_pod_of_an_unavailable_runtime_is_listed_and_not_removed(short_tmp: Path) -> None:
    root = short_tmp / "root"
    name = _name("elsewhere")
    store = PodStore(Paths.resolve(root).ensure())
    manifest = (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\n"
        "spec:\n  containers:\n  - {name: app, image: magikrun.local/busybox:demo}\n"
    )
    record = store.create(PodSpec.from_yaml(manifest.encode()), "gvisor")
    store.update(record.id, state="ready")

    [listed] = _json(root, "pod", "ls")
    assert (listed["id"], listed["runtime"], listed["phase"]) == (record.id, "gvisor", "Unknown")
    assert "'gvisor' is unknown" in listed["message"]
    row = _run(root, "pod", "ls").stdout.splitlines()[1].split()
    assert row[:4] == [name, "default", "gvisor", "Unknown"] and row[5] == "0/1"

    for args in (["rm", "--force"], ["stop"], ["status"]):
        proc = _run(root, "--json", "pod", *args, name, code=1)
        error = json.loads(proc.stderr)
        assert error["error"] == "RuntimeUnavailable"
        assert f"pod default/{name} cannot be handled here" in error["message"]
    assert store.get(record.id).state == "ready"
    store.remove(record.id)
    assert _json(root, "pod", "ls") == []
