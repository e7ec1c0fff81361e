"""Third-party extensions in native pods: loaded by name from entry points, a failing
``on_start`` (or an unknown name) rolls the pod back with nothing left."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from magikrun.errors import InfraExtensionFailed, PodStartFailed
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
    with pytest.raises(InfraExtensionFailed) as caught:
        await runtime.run_pod(spec)
    assert caught.value.message == (
        f"infra extension 'nope' of pod {spec.id} failed to start: "
        "no infra extension named 'nope' (installed: health)"
    )
    assert env.leftovers() == {}
    assert await runtime.list_pods() == []


async def _port_result(state: Path) -> str:
    return await wait_for(
        lambda: _read(state / "port"), lambda text: text is not None, timeout=60.0
    )


async def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


async def _answer(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("on", ["ContainerStarted", "ContainerExited"])
async def test_port_requested_after_start_is_forwarded_then_removed(
    env: PodEnv, ext_path: Path, on: str
) -> None:
    host_port = free_port()
    runtime = env.native()
    config = {"porter": json.dumps({"port": 8080, "hostPort": host_port, "on": on})}
    spec = PodSpec.from_yaml(infra_pod(unique(), "porter", {"app": "sleep 1"}, config=config))
    handle = await runtime.run_pod(spec)
    state = pod_dir(env.paths, handle.id) / "infra" / "state" / "porter"
    assert await _port_result(state) == "ok"
    assert await _answer(host_port) == b"late\n"
    assert f"--dport {host_port}" in _nat()
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}
    assert f"--dport {host_port}" not in _nat()
    assert spec.id not in _nat()
    assert not (env.paths.run / "cni" / "pods" / f"{handle.id}.json").exists()


async def test_port_request_of_a_host_network_pod_is_refused(env: PodEnv, ext_path: Path) -> None:
    port = free_port()
    runtime = env.native()
    config = {"porter": json.dumps({"port": port, "hostPort": port, "on": "ContainerStarted"})}
    manifest = infra_pod(unique(), "porter", {"app": "sleep 600"}, config=config)
    spec = PodSpec.from_yaml(manifest.replace(b"spec:\n", b"spec:\n  hostNetwork: true\n"))
    handle = await runtime.run_pod(spec)
    state = pod_dir(env.paths, handle.id) / "infra" / "state" / "porter"
    refusal = await _port_result(state)
    assert f"port {port}->{port}/tcp refused: pod {handle.id} uses the host's network" in refusal
    assert await _answer(port) == b"late\n"  # the extension's own port is the host's
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}
    assert f"--dport {port}" not in _nat()


async def test_stop_pod_gives_on_stop_its_grace(env: PodEnv, ext_path: Path) -> None:
    runtime = env.native()
    config = {"lingering": '{"stop": 3}'}  # over the pod's own grace of 2 s
    spec = PodSpec.from_yaml(infra_pod(unique(), "lingering", {"app": "sleep 600"}, config=config))
    handle = await runtime.run_pod(spec)
    await runtime.stop_pod(handle.id, grace=5)
    state = pod_dir(env.paths, handle.id) / "infra" / "state" / "lingering"
    assert (state / "stopped").exists() and not (state / "cut").exists()
    await runtime.delete_pod(handle.id)
    assert env.leftovers() == {}
