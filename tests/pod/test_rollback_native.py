"""Fault injection: run_pod fails at each step in turn, and nothing of the pod is left."""

from __future__ import annotations

import asyncio

import pytest

from magikrun.errors import BackendFailed, PodStartFailed
from tests.conftest import requires_root
from tests.pod._podkit import PodEnv, busybox, pod_yaml, spec, unique

pytestmark = [requires_root, pytest.mark.root]

STEPS = [
    "pull",
    "bundle",
    "netns",
    "network",
    "infra",
    "init:setup",
    "create:a",
    "create:b",
    "start:a",
    "start:b",
    "supervisor",
]


def _manifest(name: str) -> bytes:
    mount = (
        "    volumeMounts: [{name: scratch, mountPath: /scratch}, {name: conf, mountPath: /conf}]\n"
    )
    return (
        pod_yaml(
            name,
            busybox("a", "exec sleep 1000", mount) + busybox("b", "exec sleep 1000", mount),
            "  volumes:\n"
            "  - {name: scratch, emptyDir: {medium: Memory}}\n"
            "  - {name: conf, configMap: {name: conf}}\n"
            "  initContainers:\n" + busybox("setup", "echo ready > /scratch/flag", mount),
            restart="Always",
        )
        + b"---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: conf}\ndata: {k: v}\n"
    )


@pytest.mark.parametrize("step", STEPS)
async def test_fault_at_each_step_leaves_nothing(env: PodEnv, step: str) -> None:
    seen: list[str] = []

    def hook(current: str) -> None:
        seen.append(current)
        if current == step:
            raise BackendFailed(f"injected at {current}")

    runtime = env.native(fault_hook=hook)
    with pytest.raises(PodStartFailed) as caught:
        await runtime.run_pod(spec(_manifest(unique())))
    assert seen[: seen.index(step) + 1] == STEPS[: STEPS.index(step) + 1]
    kind, _, container = step.partition(":")
    assert caught.value.step == kind
    assert caught.value.container == (container or None)
    assert f"injected at {step}" in str(caught.value)
    assert isinstance(caught.value.__cause__, BackendFailed)
    assert env.leftovers() == {}
    assert await runtime.list_pods() == []


async def test_every_step_is_reached_on_success(env: PodEnv) -> None:
    seen: list[str] = []
    runtime = env.native(fault_hook=seen.append)
    handle = await runtime.run_pod(spec(_manifest(unique())))
    assert seen == STEPS
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}


async def test_cancelled_run_pod_unwinds_everything(env: PodEnv) -> None:
    task: asyncio.Task[object] | None = None

    def hook(current: str) -> None:
        if current == "start:b" and task is not None:
            task.cancel()

    runtime = env.native(fault_hook=hook)
    task = asyncio.ensure_future(runtime.run_pod(spec(_manifest(unique()))))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert env.leftovers() == {}
