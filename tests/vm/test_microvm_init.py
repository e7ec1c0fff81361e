"""Init containers in microVM pods: run by vminit in order, to completion, before the apps."""

from __future__ import annotations

import pytest

from magikrun.errors import PodError, PodStartFailed
from magikrun.image import build_demo_images
from magikrun.platform import Paths
from magikrun.pod import PodPhase, PodSpec
from magikrun.pod._microvm import MicroVmPodRuntime, vm_size

from ..pod._podkit import FAILING_INIT, busybox, check_init_failure, pod_yaml, unique
from .conftest import needs_vm
from .test_microvm_pod import _leftovers

SHARED = "    volumeMounts: [{name: shared, mountPath: /data}]\n"


def _spec(name: str, inits: str, app: str) -> PodSpec:
    extra = f"  volumes: [{{name: shared, emptyDir: {{}}}}]\n  initContainers:\n{inits}"
    return PodSpec.from_yaml(pod_yaml(name, app, extra))


@pytest.mark.slow
@needs_vm
async def test_init_containers_run_in_order_before_the_app(paths: Paths) -> None:
    await build_demo_images(paths)
    inits = busybox("first", "echo one > /data/order; echo first done", SHARED) + busybox(
        "second", "cat /data/order > /data/seen; echo two >> /data/seen; echo second done", SHARED
    )
    spec = _spec(unique("vm"), inits, busybox("app", "cat /data/seen; sleep 1000", SHARED))
    runtime = MicroVmPodRuntime(paths)
    handle = await runtime.run_pod(spec)
    try:
        seen = await runtime.exec(handle.id, "app", ["cat", "/data/seen"])
        assert (seen.exit_code, seen.stdout) == (0, b"one\ntwo\n")
        status = await runtime.pod_status(handle.id)
        assert status.phase is PodPhase.RUNNING
        shape = [(c.name, c.init, c.state, c.exit_code, c.reason) for c in status.containers]
        assert shape == [
            ("first", True, "terminated", 0, "Completed"),
            ("second", True, "terminated", 0, "Completed"),
            ("app", False, "running", None, None),
        ]
        assert [x.text async for x in runtime.logs(handle.id, "first")] == ["first done"]
        assert [x.text async for x in runtime.logs(handle.id)] == ["one", "two"]
        await runtime.stop_pod(handle.id, grace=0)
        kept = [(x.container, x.text) async for x in runtime.logs(handle.id, "second")]
        assert kept == [("second", "second done")]
        stopped = await runtime.pod_status(handle.id)
        assert [(c.name, c.exit_code) for c in stopped.containers if c.init] == [
            ("first", 0),
            ("second", 0),
        ]
    finally:
        await runtime.delete_pod(handle.id, force=True)
    assert _leftovers(paths) == {}


@pytest.mark.slow
@needs_vm
async def test_failing_init_container_rolls_the_pod_back(paths: Paths) -> None:
    await build_demo_images(paths)
    inits = busybox("setup", FAILING_INIT) + busybox("never", "true")
    spec = _spec(unique("vm"), inits, busybox("app", "sleep 1000"))
    runtime = MicroVmPodRuntime(paths)
    with pytest.raises(PodStartFailed) as caught:
        await runtime.run_pod(spec)
    assert isinstance(caught.value, PodError)
    check_init_failure(caught.value)
    assert _leftovers(paths) == {}
    assert not (paths.run / "pods" / spec.id).exists()
    assert await runtime.list_pods() == []


def test_vm_size_counts_the_largest_init_container_running_alone() -> None:
    big = "    resources: {limits: {cpu: '2500m', memory: 900Mi}}\n"
    small = "    resources: {limits: {cpu: '500m', memory: 100Mi}}\n"
    spec = _spec("size", busybox("prep", "true", big), busybox("a", "true", small))
    assert vm_size(spec) == (3, 900 + 256)
    apps = _spec("apps", busybox("prep", "true", small), busybox("a", "true", big))
    assert vm_size(apps) == (3, 900 + 256)
