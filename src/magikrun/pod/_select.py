"""Choosing a pod runtime, and finding a pod by name or id.

The choice goes: an explicit ``runtime`` (``--runtime``) > the spec's
``runtimeClassName`` > wasm when every image of the pod is a wasm image in the local
store > native. Names are ``native``, ``wasm``, ``microvm`` or the runtime classes
``magikrun-native``, ``magikrun-wasm``, ``magikrun-microvm``.
"""

from __future__ import annotations

import importlib

from ..errors import ImageNotFound, InvalidArgument, RuntimeUnavailable
from ..image import ImageService
from ..platform._paths import Paths
from ._spec import PodSpec
from ._state import PodStore
from ._types import PodRuntime
from ._undo import recover_pods

__all__ = ["RUNTIME_CLASSES", "find_pod", "open_pod_runtime", "recover_pods", "runtime_name"]

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
    paths: Paths, runtime: str | None = None, spec: PodSpec | None = None
) -> PodRuntime:
    """The pod runtime for ``runtime`` (a name or runtime class) or for ``spec``.

    ``InvalidArgument`` lists the valid names for an unknown one; ``RuntimeUnavailable``
    when the chosen runtime is not built into this magikrun.
    """
    name = runtime_name(paths, runtime, spec)
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
    result: PodRuntime = module.MicroVmPodRuntime(paths)
    return result


def find_pod(paths: Paths, name_or_id: str, namespace: str = "default") -> str:
    """The id of a pod given its name (in ``namespace``) or its id; ``PodNotFound`` if none."""
    return PodStore(paths).find(name_or_id, namespace)
