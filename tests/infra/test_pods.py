"""Third-party extensions in native pods: loaded by name from entry points, a failing
``on_start`` (or an unknown name) rolls the pod back with nothing left."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from magikrun.errors import PodStartFailed
from magikrun.infra import INFRA_PATH_ENV
from magikrun.pod import PodSpec
from magikrun.pod._base import pod_dir
from tests.infra._kit import free_port, infra_pod, wait_for
from tests.infra.extpkg.dist import install
from tests.pod._podkit import PodEnv, unique


@pytest.fixture
def ext_path(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = install(short_tmp / "ext")
    monkeypatch.setenv(INFRA_PATH_ENV, str(path))
    return path


def _nat() -> str:
    return subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout


async def test_third_party_extension_is_loaded_by_name(env: PodEnv, ext_path: Path) -> None:
    runtime = env.native()
    spec = PodSpec.from_yaml(
        infra_pod(unique(), "recorder", {"app": "sleep 600"}, config={"recorder": '{"a": 1}'})
    )
    handle = await runtime.run_pod(spec)
    state = pod_dir(env.paths, handle.id) / "infra" / "state" / "recorder"
    assert json.loads((state / "started").read_text()) == {"config": {"a": 1}, "ip": handle.ip}

    async def kinds() -> list[str]:
        path = state / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line)["kind"] for line in lines]

    assert await wait_for(kinds, lambda k: len(k) >= 2) == ["ContainerCreated", "ContainerStarted"]
    await runtime.stop_pod(handle.id)
    assert (await kinds())[2:] == ["PodStopping", "ContainerExited"]
    assert (state / "stopped").exists()
    await runtime.delete_pod(handle.id)
    assert env.leftovers() == {}


async def test_failing_on_start_rolls_the_pod_back(env: PodEnv, ext_path: Path) -> None:
    host_port = free_port()
    runtime = env.native()
    name = unique()
    spec = PodSpec.from_yaml(
        infra_pod(
            name,
            "health,failstart",
            {"app": "sleep 600"},
            config={"health": json.dumps({"port": 8080, "hostPort": host_port})},
        )
    )
    with pytest.raises(PodStartFailed, match=r"'failstart'.*OSError: the mesh is unreachable"):
        await runtime.run_pod(spec)
    assert env.leftovers() == {}
    assert f"--dport {host_port}" not in _nat()  # health's forward went with the pod
    assert spec.id not in _nat()
    assert await runtime.list_pods() == []


async def test_unknown_extension_fails_the_pod(env: PodEnv) -> None:
    runtime = env.native()
    spec = PodSpec.from_yaml(infra_pod(unique(), "health,nope", {"app": "sleep 600"}))
    with pytest.raises(PodStartFailed, match="no infra extension named 'nope'"):
        await runtime.run_pod(spec)
    assert env.leftovers() == {}
    assert await runtime.list_pods() == []
