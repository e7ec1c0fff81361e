"""Which runtime owns a pod, and every pod of a root whatever its runtime."""

from __future__ import annotations

from tests.pod._podkit import HELLO, PodEnv, spec, unique


def _hello(name: str) -> bytes:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n"
        f"  restartPolicy: Never\n  containers:\n"
        f"  - name: hello\n    image: {HELLO}\n    imagePullPolicy: Never\n"
    ).encode()


async def test_status_names_the_runtime_that_made_the_pod(env: PodEnv) -> None:
    handle = await env.wasm().run_pod(spec(_hello(unique())))
    status = await env.native().pod_status(handle.id)
    assert status.runtime == "wasm"
    await env.wasm().delete_pod(handle.id, force=True)
    assert env.leftovers() == {}
