"""The undo step of every kind of pod resource, shared by rollback, delete and recovery.

Each undo is idempotent and works from the recorded intent alone (kind, key, data), so
the same step undoes a resource that was fully made, half made or never made.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from .._threads import finish_in_thread
from ..errors import ContainerNotFound, MagikrunError, PodError
from ..platform._paths import Paths
from ..runtime import NativeRuntime, OciRuntime
from ..runtime._store import stop_pid_file
from ..storage import SnapshotStore
from ._netns import delete_netns
from ._network import PodNetwork
from ._state import PodRecord, PodStore, Resource
from ._volumes import remove_pod_dir

__all__ = ["container_runtime", "recover_pods", "undo_resource"]

_INDEPENDENT = frozenset({"container", "rootfs", "bundle"})


async def undo_resource(paths: Paths, resource: Resource) -> None:
    """Undo one resource; a missing resource is fine."""
    kind, data = resource.kind, resource.data
    if kind == "container":
        runtime = container_runtime(paths, str(data["backend"]))
        try:
            await runtime.delete(resource.key, force=True)
        except ContainerNotFound:
            pass
    elif kind == "rootfs":
        rootfs = SnapshotStore(paths).rootfs(resource.key)
        if rootfs is not None:
            await rootfs.remove()
    elif kind == "poddir":
        await finish_in_thread(remove_pod_dir, Path(data["path"]))
    elif kind == "bundle":
        await finish_in_thread(_remove_tree, Path(data["path"]))
    elif kind == "netns":
        await finish_in_thread(delete_netns, Path(data["path"]))
    elif kind == "network":
        network = PodNetwork(paths, bridge=str(data["bridge"]), subnet=str(data["subnet"]))
        await network.delete(resource.pod_id, Path(data["netns"]))
    elif kind == "supervisor":
        await stop_pid_file(Path(data["pid_file"]))
    else:
        raise PodError(
            f"pod {resource.pod_id} has a resource of unknown kind {kind!r}",
            hint="this root was used by a newer magikrun; use that version to remove the pod",
            pod_id=resource.pod_id,
        )


def _remove_tree(path: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


def container_runtime(paths: Paths, backend: str) -> OciRuntime:
    """The single-container runtime of a pod backend (wasmtime imported only for wasm)."""
    if backend == "wasm":
        from ..runtime._wasmtime import WasmtimeRuntime

        return WasmtimeRuntime(paths)
    return NativeRuntime(paths)


async def undo_all(paths: Paths, store: PodStore, record: PodRecord) -> list[str]:
    """Undo every recorded resource of a pod in reverse; the errors, as text.

    Neighbouring resources of one kind that do not depend on each other (containers,
    root filesystems, bundles) are undone concurrently.
    """
    errors: list[str] = []
    groups: list[list[Resource]] = []
    for resource in reversed(store.resources(record.id)):
        if groups and resource.kind in _INDEPENDENT and groups[-1][0].kind == resource.kind:
            groups[-1].append(resource)
        else:
            groups.append([resource])

    async def undo(resource: Resource) -> None:
        try:
            await undo_resource(paths, resource)
        except (MagikrunError, OSError) as exc:
            errors.append(f"{resource.kind} {resource.key}: {exc}")
        else:
            store.forget(resource)

    for group in groups:
        async with asyncio.TaskGroup() as tasks:
            for resource in group:
                tasks.create_task(undo(resource))
    return errors


async def recover_pods(paths: Paths, store: PodStore | None = None) -> list[str]:
    """Roll back half-made pods whose creator is gone; the ids of the pods removed.

    Pods that were fully started are left alone. Called by every pod runtime on first
    use and by ``magikrun system gc``.
    """
    store = store or PodStore(paths)
    recovered = []
    for record in store.list():
        abandoned = record.state == "creating" and not record.owner_alive()
        if not (abandoned or (record.state == "failed" and not record.owner_alive())):
            continue
        if not store.claim(record, "failed"):
            continue
        if not await undo_all(paths, store, record):
            store.remove(record.id)
            recovered.append(record.id)
    return recovered
