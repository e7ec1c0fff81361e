"""Crash recovery: the process running run_pod dies at a step; the next runtime rolls back."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from magikrun.pod import PodPhase, recover_pods
from magikrun.pod._state import PodStore
from tests.conftest import requires_root
from tests.pod._podkit import PodEnv, busybox, pod_yaml, unique

pytestmark = [requires_root, pytest.mark.root]

RUNNER = """
import asyncio, sys
from magikrun.platform import Paths
from magikrun.pod import NativePodRuntime, PodNetwork, PodSpec
root, bridge, subnet, manifest = sys.argv[1:]
paths = Paths.resolve(root)
runtime = NativePodRuntime(paths, network=PodNetwork(paths, bridge=bridge, subnet=subnet))
handle = asyncio.run(runtime.run_pod(PodSpec.from_yaml(manifest.encode())))
print(handle.id)
"""


def _manifest(name: str) -> str:
    return (
        pod_yaml(
            name,
            busybox("a", "exec sleep 1000") + busybox("b", "exec sleep 1000"),
            "  volumes: [{name: secret, secret: {secretName: s}}]\n",
            restart="Always",
        ).decode()
        + "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {k: dg==}\n"
    )


async def _run(env: PodEnv, name: str, fault: str | None) -> tuple[int, str]:
    child_env = dict(os.environ)
    child_env.pop("MAGIKRUN_FAULT", None)
    if fault is not None:
        child_env["MAGIKRUN_FAULT"] = fault
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUNNER,
        str(env.paths.data),
        env.bridge,
        env.subnet,
        _manifest(name),
        env=child_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


@pytest.mark.parametrize(
    "step", ["bundle", "network", "infra", "create:b", "start:b", "supervisor"]
)
async def test_crash_at_a_step_is_rolled_back_by_the_next_runtime(env: PodEnv, step: str) -> None:
    code, output = await _run(env, unique(), f"{step}:exit")
    assert code == 137, output
    stuck = PodStore(env.paths).list()
    assert [r.state for r in stuck] == ["creating"]
    assert env.leftovers() != {}
    runtime = env.native()
    assert await runtime.list_pods() == []
    assert env.leftovers() == {}


async def test_system_gc_path_recovers_too(env: PodEnv) -> None:
    code, output = await _run(env, unique(), "start:a:exit")
    assert code == 137, output
    recovered = await recover_pods(env.paths)
    assert len(recovered) == 1
    assert env.leftovers() == {}


async def test_a_running_pod_survives_its_creator(env: PodEnv) -> None:
    name = unique()
    code, output = await _run(env, name, None)
    assert code == 0, output
    pod_id = output.split()[0]
    runtime = env.native()
    [status] = await runtime.list_pods()
    assert (status.id, status.name, status.phase) == (pod_id, name, PodPhase.RUNNING)
    result = await runtime.exec(pod_id, "b", ["cat", "/etc/hostname"])
    assert result.stdout.decode().strip() == name
    await runtime.delete_pod(pod_id, force=True)
    assert env.leftovers() == {}
