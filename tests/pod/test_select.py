"""Which runtime owns a pod, and every pod of a root whatever its runtime."""

from __future__ import annotations

import pytest

from magikrun.errors import PodNotFound, RuntimeUnavailable
from magikrun.pod import PodPhase, list_all_pods, runtime_for_pod
from magikrun.pod._state import PodStore
from tests.pod._podkit import HELLO, PodEnv, busybox, pod_yaml, spec, unique


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
    owner = runtime_for_pod(env.paths, handle.id)
    assert owner.name == "wasm"
    assert [(s.id, s.runtime) for s in await list_all_pods(env.paths)] == [(handle.id, "wasm")]
    await owner.delete_pod(handle.id, force=True)
    assert await list_all_pods(env.paths) == []
    assert env.leftovers() == {}


async def test_a_pod_of_a_runtime_unknown_here_is_listed_and_left_alone(env: PodEnv) -> None:
    store = PodStore(env.paths)
    record = store.create(spec(pod_yaml(unique(), busybox("app", "true"))), "gvisor")
    store.update(record.id, state="ready")
    try:
        [listed] = await list_all_pods(env.paths)
        assert (listed.id, listed.runtime, listed.phase) == (record.id, "gvisor", PodPhase.UNKNOWN)
        assert listed.message is not None and "'gvisor' is unknown" in listed.message
        assert [(c.name, c.state, c.reason) for c in listed.containers] == [
            ("app", "waiting", "Unknown")
        ]
        with pytest.raises(RuntimeUnavailable, match=f"pod default/{record.name} cannot be"):
            runtime_for_pod(env.paths, record.id)
        assert store.get(record.id).state == "ready"
    finally:
        store.remove(record.id)
    with pytest.raises(PodNotFound):
        runtime_for_pod(env.paths, record.id)
    assert env.leftovers() == {}
