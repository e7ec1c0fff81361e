"""WasmPodRuntime with real wasmtime workers and wasm images in the store."""

from __future__ import annotations

import pytest

from magikrun.errors import NotSupported, PodStartFailed
from magikrun.image import ImageService
from magikrun.pod import PodPhase, open_pod_runtime
from tests.pod._podkit import (
    HELLO,
    PodEnv,
    check_init_failure,
    import_wasm_image,
    spec,
    unique,
    wait_for,
)


def _module(name: str, image: str, extra: str = "") -> str:
    return f"  - name: {name}\n    image: {image}\n    imagePullPolicy: Never\n{extra}"


def _pod(name: str, containers: str, extra: str = "") -> bytes:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n"
        f"  restartPolicy: Never\n{extra}  containers:\n{containers}"
    ).encode()


async def test_hello_module_pod_runs_and_is_removed(env: PodEnv) -> None:
    manifest = spec(_pod(unique(), _module("hello", HELLO)))
    runtime = open_pod_runtime(env.paths, spec=manifest)
    assert runtime.name == "wasm"
    handle = await runtime.run_pod(manifest)
    assert (handle.runtime, handle.ip) == ("wasm", None)

    async def done() -> bool:
        return (await runtime.pod_status(handle.id)).phase is PodPhase.SUCCEEDED

    await wait_for(done)
    lines = [line.text async for line in runtime.logs(handle.id)]
    assert lines == ["Hello from magikrun on WebAssembly!"]
    with pytest.raises(NotSupported, match="cannot exec"):
        await runtime.exec(handle.id, None, ["sh"])
    await runtime.delete_pod(handle.id)
    assert env.leftovers() == {}


async def test_modules_share_an_emptydir_preopen(env: PodEnv) -> None:
    await import_wasm_image(env.paths, "magikrun.local/share:test", "share")
    image = "magikrun.local/share:test"
    mount = "    volumeMounts: [{name: shared, mountPath: /data}]\n"
    manifest = _pod(
        unique(),
        _module("third", image, mount),
        "  volumes: [{name: shared, emptyDir: {}}]\n  initContainers:\n"
        + _module("first", image, mount)
        + _module("second", image, mount),
    )
    runtime = env.wasm()
    handle = await runtime.run_pod(spec(manifest))

    async def done() -> bool:
        return (await runtime.pod_status(handle.id)).phase is PodPhase.SUCCEEDED

    await wait_for(done)
    lines = [line.text async for line in runtime.logs(handle.id, "third")]
    assert lines == ["x", "x", "x"]
    await runtime.delete_pod(handle.id)
    assert env.leftovers() == {}


async def test_a_bad_module_fails_the_whole_pod_with_nothing_left(env: PodEnv) -> None:
    await import_wasm_image(env.paths, "magikrun.local/share:test", "share")
    images = ImageService(env.paths)
    assert images.get("magikrun.local/share:test").kind == "wasm"
    manifest = _pod(
        unique(),
        _module("good", HELLO) + _module("bad", "magikrun.local/busybox:demo"),
    )
    runtime = env.wasm()
    with pytest.raises(PodStartFailed) as caught:
        await runtime.run_pod(spec(manifest))
    assert caught.value.container == "bad"
    assert env.leftovers() == {}
    assert await runtime.list_pods() == []


async def test_failing_init_module_fails_the_pod_with_its_output_and_nothing_left(
    env: PodEnv,
) -> None:
    await import_wasm_image(env.paths, "magikrun.local/fail:test", "fail")
    manifest = _pod(
        unique(),
        _module("hello", HELLO),
        "  initContainers:\n" + _module("setup", "magikrun.local/fail:test"),
    )
    runtime = env.wasm()
    with pytest.raises(PodStartFailed) as caught:
        await runtime.run_pod(spec(manifest))
    check_init_failure(caught.value)
    assert env.leftovers() == {}
    assert await runtime.list_pods() == []


async def test_infra_extensions_are_refused_before_anything_is_made(env: PodEnv) -> None:
    manifest = spec(
        (
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {unique()}\n  annotations:\n"
            "    magikrun.io/infra-extensions: health\nspec:\n  restartPolicy: Never\n"
            "  containers:\n" + _module("hello", HELLO)
        ).encode()
    )
    runtime = env.wasm()
    with pytest.raises(NotSupported, match="asks for infra extensions") as caught:
        await runtime.run_pod(manifest)
    assert "magikrun-native" in caught.value.hint
    assert await runtime.list_pods() == []
    assert env.leftovers() == {}
