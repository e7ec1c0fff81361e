"""Choosing a pod runtime, and finding a pod by name or id.

The choice goes: an explicit ``runtime`` (``--runtime``) > the spec's
``runtimeClassName`` > wasm when every image of the pod is a wasm image in the local
store > native. Names are ``native``, ``wasm``, ``microvm`` or the runtime classes
``magikrun-native``, ``magikrun-wasm``, ``magikrun-microvm``.
"""

from __future__ import annotations

import importlib

from ..errors import ImageNotFound, InvalidArgument, PodNotFound, RuntimeUnavailable
from ..image import ImageService
from ..platform._paths import Paths
from ._spec import PodSpec
from ._state import PodRecord, PodStore
from ._types import ContainerInfo, PodPhase, PodRuntime, PodStatus
from ._undo import recover_pods

__all__ = [
    "RUNTIME_CLASSES",
    "find_pod",
    "list_all_pods",
    "open_pod_runtime",
    "recover_pods",
    "runtime_for_pod",
    "runtime_name",
]

RUNTIME_CLASSES = {
    "native": "native",
    "magikrun-native": "native",
    "wasm": "wasm",
    "magikrun-wasm": "wasm",
    "microvm": "microvm",
    "magikrun-microvm": "microvm",
}
"""Every accepted runtime name (``--runtime`` or ``runtimeClassName``) to its runtime."""


def runtime_name(paths: Paths, runtime: str | None = None, spec: PodSpec | None = None) -> str:
    """``native``, ``wasm`` or ``microvm`` by the rules in the module docstring."""
    chosen = runtime or (spec.runtime_class_name if spec is not None else None)
    if chosen is not None:
        if chosen not in RUNTIME_CLASSES:
            raise InvalidArgument(
                f"unknown pod runtime {chosen!r}: use one of {', '.join(RUNTIME_CLASSES)}",
                hint="pick a runtime with --runtime or the Pod's runtimeClassName",
                runtime=chosen,
            )
        return RUNTIME_CLASSES[chosen]
    if spec is not None and _all_wasm(paths, spec):
        return "wasm"
    return "native"


def _all_wasm(paths: Paths, spec: PodSpec) -> bool:
    images = ImageService(paths)
    for container in (*spec.init_containers, *spec.containers):
        try:
            if images.get(container.image).kind != "wasm":
                return False
        except ImageNotFound:
            return False
    return True


def open_pod_runtime(
    paths: Paths,
    runtime: str | None = None,
    spec: PodSpec | None = None,
    *,
    vm_network: str | None = None,
) -> PodRuntime:
    """The pod runtime for ``runtime`` (a name or runtime class) or for ``spec``;
    ``vm_network`` (``"bridge"`` or ``"user"``) is a microVM pod's network.

    ``InvalidArgument`` lists the valid names for an unknown one, or refuses a
    ``vm_network`` for a pod that is no microVM's; ``RuntimeUnavailable`` when the
    chosen runtime is not built into this magikrun.
    """
    name = runtime_name(paths, runtime, spec)
    if vm_network is not None and name != "microvm":
        raise InvalidArgument(
            f"a VM network ({vm_network}) is for microVM pods, and this pod runs on {name}",
            hint="drop the VM network, or run the pod with runtime microvm",
            runtime=name,
        )
    if name == "native":
        from ._native import NativePodRuntime

        return NativePodRuntime(paths)
    if name == "wasm":
        from ._wasm import WasmPodRuntime

        return WasmPodRuntime(paths)
    try:
        module = importlib.import_module("magikrun.pod._microvm")
    except ModuleNotFoundError as exc:
        raise RuntimeUnavailable(
            "microVM pods are not available in this magikrun",
            hint="run the pod with runtime native or wasm",
            runtime=name,
        ) from exc
    result: PodRuntime = module.MicroVmPodRuntime(paths, network=vm_network)
    return result


def find_pod(paths: Paths, name_or_id: str, namespace: str = "default") -> str:
    """The id of a pod given its name (in ``namespace``) or its id; ``PodNotFound`` if none."""
    return PodStore(paths).find(name_or_id, namespace)


def runtime_for_pod(paths: Paths, pod_id: str) -> PodRuntime:
    """The runtime that made pod ``pod_id``, as its record says.

    ``PodNotFound`` if there is no such pod; ``RuntimeUnavailable`` naming the pod when
    its runtime cannot be opened by this magikrun (so nothing can be done to the pod here).
    """
    record = PodStore(paths).get(pod_id)
    try:
        return _open_named(paths, record.runtime)
    except RuntimeUnavailable as exc:
        raise RuntimeUnavailable(
            f"pod {record.namespace}/{record.name} cannot be handled here: {exc.message}",
            hint=f"use a magikrun with the {record.runtime} pod runtime on this root",
            pod_id=record.id,
            runtime=record.runtime,
        ) from exc


def _open_named(paths: Paths, runtime: str) -> PodRuntime:
    """The runtime a pod record names; `RuntimeUnavailable` also for a name unknown here
    (a record written by another magikrun)."""
    if runtime not in RUNTIME_CLASSES:
        raise RuntimeUnavailable(
            f"pod runtime {runtime!r} is unknown to this magikrun",
            hint=f"use a magikrun with the {runtime} pod runtime on this root",
            runtime=runtime,
        )
    return open_pod_runtime(paths, runtime)


async def list_all_pods(paths: Paths) -> list[PodStatus]:
    """Every pod of the root whatever its runtime, oldest first.

    The records are listed once; each pod is read by the runtime that made it. A pod
    whose runtime is unavailable here is still listed, with what its record tells.
    """
    runtimes: dict[str, PodRuntime | RuntimeUnavailable] = {}
    statuses = []
    for record in PodStore(paths).list():
        if record.runtime not in runtimes:
            try:
                runtimes[record.runtime] = _open_named(paths, record.runtime)
            except RuntimeUnavailable as exc:
                runtimes[record.runtime] = exc
        runtime = runtimes[record.runtime]
        if isinstance(runtime, RuntimeUnavailable):
            statuses.append(_uninspectable(record, runtime))
            continue
        try:
            statuses.append(await runtime.pod_status(record.id))
        except PodNotFound:
            continue  # removed meanwhile (or rolled back by recovery)
    return sorted(statuses, key=lambda s: (s.created_at, s.namespace, s.name))


def _uninspectable(record: PodRecord, why: RuntimeUnavailable) -> PodStatus:
    """A pod no runtime here can read: its phase from the record, else ``Unknown``."""
    if record.state == "creating" and record.owner_alive():
        phase = PodPhase.PENDING
    elif record.state == "failed":
        phase = PodPhase.FAILED
    else:
        phase = PodPhase.UNKNOWN
    spec = record.spec
    containers = tuple(
        ContainerInfo(c.name, c.image, "waiting", None, "Unknown", None, None, 0, init)
        for init, group in ((True, spec.init_containers), (False, spec.containers))
        for c in group
    )
    return record.status(phase, containers, f"its runtime cannot read it here: {why.message}")
