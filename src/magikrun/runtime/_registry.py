"""Which backends this machine can run, and which one a bundle goes to.

Backends are found by name and imported on first use (anyio's backend loading),
so choosing the native runtime never imports wasmtime.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import InvalidArgument, InvalidBundle, RuntimeUnavailable
from ..platform._limits import MAX_CONTAINERS
from ..platform._paths import Paths
from ._store import ContainerStore
from ._types import OciRuntime

__all__ = ["BACKENDS", "RuntimeRegistry"]

BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "native": ("magikrun.runtime._crun", "NativeRuntime", ("crun", "runc", "oci", "linux")),
    "wasm": ("magikrun.runtime._wasmtime", "WasmtimeRuntime", ("wasmtime", "wasi", "wasm32-wasi")),
    "microvm": ("magikrun.runtime._microvm", "MicroVmRuntime", ("qemu", "vm", "krun")),
}
"""name -> (module, class, aliases). A backend class takes ``(paths, *, store=...)``."""

HANDLER_ANNOTATION = "run.oci.handler"
WASM_VARIANT_ANNOTATION = "module.wasm.image/variant"
_WASM_VARIANTS = ("compat", "compat-smart")
_WASM_SUFFIXES = (".wasm", ".wat")


class RuntimeRegistry:
    """The backends of one magikrun root, loaded lazily and sharing one container store.

    **Parameters:**

    * `paths` - the magikrun root.
    * `oci_binary` - passed to the native backend (``crun``/``runc``).
    * `max_containers` - the container limit of the shared store.
    """

    def __init__(
        self,
        paths: Paths,
        *,
        oci_binary: str | None = None,
        max_containers: int = MAX_CONTAINERS,
    ) -> None:
        self.paths = paths
        self.store = ContainerStore(paths, max_containers=max_containers)
        self.oci_binary = oci_binary
        self._loaded: dict[str, OciRuntime] = {}
        self._load_errors: dict[str, str] = {}

    @staticmethod
    def names() -> list[str]:
        return list(BACKENDS)

    @staticmethod
    def canonical(name: str) -> str:
        """The backend name for a name or alias; `InvalidArgument` if none has it."""
        wanted = name.strip().lower()
        for canonical, (_module, _cls, aliases) in BACKENDS.items():
            if wanted == canonical or wanted in aliases:
                return canonical
        raise InvalidArgument(
            f"unknown runtime {name!r}",
            hint=f"choose one of {', '.join(BACKENDS)}",
            runtime=name,
        )

    def backend(self, name: str) -> OciRuntime:
        """The backend called ``name`` (or an alias), imported and built on first use."""
        canonical = self.canonical(name)
        if canonical in self._loaded:
            return self._loaded[canonical]
        module_name, class_name, _aliases = BACKENDS[canonical]
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError as exc:
            self._load_errors[canonical] = f"cannot import {module_name}: {exc}"
            raise RuntimeUnavailable(
                f"the {canonical} runtime cannot be loaded: {exc}",
                hint="reinstall magikrun with its dependencies (pip install magikrun)",
                runtime=canonical,
            ) from exc
        kwargs: dict[str, Any] = {"store": self.store}
        if canonical == "native":
            kwargs["oci_binary"] = self.oci_binary
        runtime: OciRuntime = cls(self.paths, **kwargs)
        self._loaded[canonical] = runtime
        return runtime

    def available(self) -> dict[str, str | None]:
        """Each backend's reason for being unavailable here (``None`` when it can run)."""
        reasons: dict[str, str | None] = {}
        for name in BACKENDS:
            try:
                reasons[name] = self.backend(name).unavailable_reason()
            except RuntimeUnavailable as exc:
                reasons[name] = exc.message
        return reasons

    def for_container(self, id: str) -> OciRuntime:
        """The backend that created container ``id``."""
        return self.backend(self.store.load(id).backend)

    def select_backend(
        self, spec: Mapping[str, Any], explicit: str | Iterable[str] | None = None
    ) -> str:
        """The backend name for a bundle's ``config.json``.

        Order: explicit choice (``--runtime``, a pod's ``runtimeClassName``) > the
        ``run.oci.handler`` annotation or ``module.wasm.image/variant: compat`` >
        ``process.args[0]`` ending in ``.wasm``/``.wat`` > native. Explicit choices
        that disagree with each other are an error, as are annotations that do.
        """
        choices = [explicit] if isinstance(explicit, str) else list(explicit or ())
        chosen = {self.canonical(c) for c in choices if c}
        if len(chosen) > 1:
            raise InvalidArgument(
                f"conflicting runtime choices: {', '.join(sorted(chosen))}",
                hint="ask for one runtime only",
                runtimes=",".join(sorted(chosen)),
            )
        if chosen:
            return chosen.pop()
        annotations = spec.get("annotations") or {}
        hinted: set[str] = set()
        handler = annotations.get(HANDLER_ANNOTATION)
        if isinstance(handler, str) and handler:
            try:
                hinted.add(self.canonical(handler))
            except InvalidArgument as exc:
                raise InvalidBundle(
                    f"annotation {HANDLER_ANNOTATION}={handler!r} names no runtime magikrun has",
                    hint=f"use one of {', '.join(BACKENDS)}",
                    handler=handler,
                ) from exc
        if annotations.get(WASM_VARIANT_ANNOTATION) in _WASM_VARIANTS:
            hinted.add("wasm")
        if len(hinted) > 1:
            raise InvalidBundle(
                f"the bundle's annotations ask for different runtimes: {', '.join(sorted(hinted))}",
                hint=f"keep {HANDLER_ANNOTATION} and {WASM_VARIANT_ANNOTATION} consistent",
            )
        if hinted:
            return hinted.pop()
        process = spec.get("process") or {}
        args = process.get("args") if isinstance(process, dict) else None
        if isinstance(args, list) and args and str(args[0]).endswith(_WASM_SUFFIXES):
            return "wasm"
        return "native"
