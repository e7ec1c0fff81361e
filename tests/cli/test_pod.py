"""``magikrun pod …`` run as a user would: the installed console script, in a subprocess,
against real crun, CNI plugins and wasmtime, each test in its own ``--root``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from magikrun.image import BUSYBOX_DEMO_REF, HELLO_WASM_DEMO_REF
from tests.conftest import requires_root

pytestmark = [requires_root, pytest.mark.root]

MAGIKRUN = Path(sys.executable).with_name("magikrun")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LOOP = "trap 'exit 0' TERM; while true; do sleep 1 & wait; done"


def _run(root: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(MAGIKRUN), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc


def _json(root: Path, *args: str) -> Any:
    return json.loads(_run(root, "--json", *args).stdout)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _container(name: str, script: str, image: str = BUSYBOX_DEMO_REF) -> dict[str, Any]:
    return {"name": name, "image": image, "command": ["sh", "-c", script]}


def _manifest(path: Path, name: str, containers: list[dict[str, Any]], **spec: Any) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"terminationGracePeriodSeconds": 5, **spec, "containers": containers},
    }
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(root) in line]


@pytest.fixture
def root(short_tmp: Path) -> Path:
    root = short_tmp / "root"
    _run(root, "image", "demo")
    return root


def test_run_ls_status_logs_exec_stop_rm(root: Path, short_tmp: Path) -> None:
    name = _name("cli")
    manifest = _manifest(
        short_tmp / "pod.yaml",
        name,
        [
            _container("writer", f"echo started; echo oops >&2; {LOOP}"),
            _container("other", LOOP),
        ],
    )
    ran = _json(root, "pod", "run", str(manifest))
    assert ran["name"] == name and ran["namespace"] == "default"
    assert ran["runtime"] == "native" and ran["phase"] == "Running"
    assert ran["ip"].startswith("10.")
    assert {c["name"]: c["state"] for c in ran["containers"]} == {
        "writer": "running",
        "other": "running",
    }

    listed = _json(root, "pod", "ls")
    assert [(p["id"], p["phase"]) for p in listed] == [(ran["id"], "Running")]
    table = _run(root, "pod", "ls").stdout
    assert table.split()[:7] == ["NAME", "NAMESPACE", "RUNTIME", "PHASE", "IP", "CONTAINERS", "AGE"]
    assert table.splitlines()[1].split()[:5] == [name, "default", "native", "Running", ran["ip"]]
    assert table.splitlines()[1].split()[5] == "2/2"

    status = _json(root, "pod", "status", name)
    assert status["id"] == ran["id"]
    for c in status["containers"]:
        assert set(c) >= {"name", "image", "state", "exitCode", "reason", "restartCount"}
        assert c["image"] == BUSYBOX_DEMO_REF and c["restartCount"] == 0
    human = _run(root, "pod", "status", ran["id"]).stdout
    assert "Phase:      Running" in human and "writer" in human

    logs = _run(root, "pod", "logs", name, "-c", "writer")
    assert logs.stdout.splitlines()[0] == "started"
    assert "oops" in logs.stderr
    assert "[writer] started" in _run(root, "pod", "logs", name).stdout
    stamped = _run(root, "pod", "logs", name, "-c", "writer", "--timestamps", "--tail", "1")
    assert stamped.stdout == ""
    stamp, text = stamped.stderr.split()
    assert text == "oops" and datetime.fromisoformat(stamp).tzinfo is not None

    exec_ = _run(
        root, "pod", "exec", name, "-c", "other", "--", "sh", "-c", "hostname; exit 7", code=7
    )
    assert exec_.stdout.strip() == name
    assert _run(root, "pod", "exec", name, "--", "cat", "/etc/hostname").stdout.strip() == name

    _run(root, "pod", "stop", name, "--grace", "5")
    stopped = _json(root, "pod", "status", name)
    assert all(c["state"] == "terminated" and c["exitCode"] == 0 for c in stopped["containers"])
    assert stopped["phase"] in ("Succeeded", "Failed")
    assert f"removed {name}" in _run(root, "pod", "rm", name).stdout
    assert _json(root, "pod", "ls") == []
    assert _mounts_under(root) == []


def test_rm_force_removes_a_running_pod(root: Path, short_tmp: Path) -> None:
    name = _name("force")
    manifest = _manifest(short_tmp / "pod.yaml", name, [_container("only", LOOP)])
    _run(root, "pod", "run", str(manifest))
    assert name in _run(root, "pod", "ls").stdout
    _run(root, "pod", "rm", "--force", name)
    assert _json(root, "pod", "ls") == []
    assert _mounts_under(root) == []


def test_wasm_demo_pod(root: Path) -> None:
    ran = _json(root, "pod", "run", str(EXAMPLES / "demo-wasm.yaml"))
    assert ran["runtime"] == "wasm"
    logs = _run(root, "pod", "logs", "demo-wasm").stdout
    assert "Hello from magikrun on WebAssembly!" in logs
    proc = _run(root, "pod", "exec", "demo-wasm", "--", "true", code=1)
    assert "hint:" in proc.stderr
    _run(root, "pod", "rm", "--force", "demo-wasm")
    assert _json(root, "pod", "ls") == []


def test_runtime_option_overrides_runtime_class(root: Path, short_tmp: Path) -> None:
    manifest = _manifest(
        short_tmp / "pod.yaml",
        _name("wasm"),
        [{"name": "hello", "image": HELLO_WASM_DEMO_REF}],
        runtimeClassName="magikrun-native",
        restartPolicy="Never",
    )
    ran = _json(root, "pod", "run", "--runtime", "magikrun-wasm", str(manifest))
    assert ran["runtime"] == "wasm"
    _run(root, "pod", "rm", "--force", ran["id"])


def test_bad_manifest_names_the_field_and_leaves_nothing(root: Path, short_tmp: Path) -> None:
    manifest = _manifest(short_tmp / "pod.yaml", _name("bad"), [_container("a", LOOP)])
    doc = json.loads(manifest.read_text())
    doc["spec"]["containers"][0]["ports"] = [{"containerPort": 70000}]
    manifest.write_text(json.dumps(doc))
    proc = _run(root, "pod", "run", str(manifest), code=1)
    assert "spec.containers[0].ports[0].containerPort" in proc.stderr
    assert "out of range" in proc.stderr and "hint:" in proc.stderr
    as_json = _run(root, "--json", "pod", "run", str(manifest), code=1)
    assert json.loads(as_json.stderr)["error"] == "InvalidPodSpec"
    assert _json(root, "pod", "ls") == []


def test_missing_command_says_what_was_undone_and_leaves_nothing(
    root: Path, short_tmp: Path
) -> None:
    name = _name("nocmd")
    manifest = _manifest(
        short_tmp / "pod.yaml",
        name,
        [
            _container("first", LOOP),
            _container("second", LOOP),
            {"name": "third", "image": BUSYBOX_DEMO_REF, "command": ["/no/such/program"]},
        ],
    )
    proc = _run(root, "pod", "run", str(manifest), code=1)
    assert "third" in proc.stderr and "undone" in proc.stderr
    assert "hint:" in proc.stderr
    assert _json(root, "pod", "ls") == []
    assert _mounts_under(root) == []
    _run(root, "pod", "status", name, code=1)


@pytest.mark.parametrize(
    "args",
    [
        ["pod", "status", "no-such-pod"],
        ["pod", "logs", "no-such-pod"],
        ["pod", "exec", "no-such-pod", "--", "true"],
        ["pod", "stop", "no-such-pod"],
        ["pod", "rm", "no-such-pod"],
    ],
)
def test_unknown_pod_is_an_error_with_a_hint(short_tmp: Path, args: list[str]) -> None:
    root = short_tmp / "root"
    proc = _run(root, *args, code=1)
    assert "no-such-pod" in proc.stderr and "hint:" in proc.stderr
    proc = _run(root, "--json", *args, code=1)
    assert json.loads(proc.stderr)["error"] == "PodNotFound"


def test_vm_network_is_refused_for_a_pod_that_is_no_microvm(root: Path, short_tmp: Path) -> None:
    manifest = _manifest(short_tmp / "pod.yaml", _name("novm"), [_container("a", LOOP)])
    proc = _run(root, "pod", "run", "--vm-network", "user", str(manifest), code=1)
    assert (
        "magikrun: error: a VM network (user) is for microVM pods, and this pod runs on native"
        in proc.stderr
    )
    assert "hint: drop the VM network, or run the pod with runtime microvm" in proc.stderr
    assert _json(root, "pod", "ls") == []
    assert _mounts_under(root) == []
