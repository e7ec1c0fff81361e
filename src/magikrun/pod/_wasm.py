"""WebAssembly pods: each container a WASI module in a wasmtime worker process of its own.

Every module is fetched and compiled (``WasmtimeRuntime.create`` compiles and
validates) before any runs; then init containers run in order and the app containers
start. emptyDir and hostPath volumes (configMap and secret ones too) are host
directories bind-mounted in the bundles, which the wasm backend preopens at their
mount paths: the pod's modules share them. There is no network namespace: WASI
preview 1 has no sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .._threads import finish_in_thread
from ..errors import NotSupported
from ..image import (
    BundleBuilder,
    ContainerConfig,
    Image,
    ImageService,
    ProgressCallback,
    open_wasm_module,
)
from ..infra._host import EXTENSIONS_ANNOTATION
from ..platform._limits import EXEC_TIMEOUT, RESTART_BACKOFF_BASE
from ..platform._paths import Paths
from ..runtime import ExecResult, OciRuntime
from ._base import (
    PodRuntimeBase,
    _Where,
    container_id,
    init_container_failed,
    kubernetes_annotations,
    log_tail,
    pod_dir,
    together,
)
from ._fault import FaultHook
from ._rollback import Rollback
from ._spec import Container, PodSpec, resolve_env
from ._types import PodHandle
from ._volumes import container_mounts, prepare_volumes

__all__ = ["WasmPodRuntime"]


class WasmPodRuntime(PodRuntimeBase):
    """Pods of WebAssembly modules run by wasmtime (WASI preview 1).

    Parameters:
        paths: the magikrun root.
        fault_hook: called with each step's name (tests); ``$MAGIKRUN_FAULT`` otherwise.
        restart_backoff: seconds before the first restart of a container (doubling, capped).
        progress: receives pull progress events.
    """

    name = "wasm"
    backend = "wasm"

    def __init__(
        self,
        paths: Paths,
        *,
        fault_hook: FaultHook | None = None,
        restart_backoff: float = RESTART_BACKOFF_BASE,
        progress: ProgressCallback | None = None,
    ) -> None:
        super().__init__(paths, fault_hook=fault_hook, restart_backoff=restart_backoff)
        from ..runtime._wasmtime import WasmtimeRuntime

        self.images = ImageService(paths)
        self.builder = BundleBuilder(paths)
        self.runtime = WasmtimeRuntime(paths, store=self.containers)
        self.progress = progress

    def _runtime(self) -> OciRuntime:
        return self.runtime

    async def run_pod(self, spec: PodSpec) -> PodHandle:
        """Start every module, or nothing: ``PodStartFailed`` names the step and container."""
        if EXTENSIONS_ANNOTATION in spec.metadata.annotations:
            raise NotSupported(
                f"pod {spec.metadata.name!r} asks for infra extensions, which wasm pods do not run",
                hint=f"drop the {EXTENSIONS_ANNOTATION} annotation or run the pod as "
                "runtimeClassName: magikrun-native",
                field=f"metadata.annotations[{EXTENSIONS_ANNOTATION}]",
            )
        await self._ready()
        record = self.store.create(spec, self.name)
        pod = record.id
        where = _Where()
        directory = pod_dir(self.paths, pod)
        everything = (*spec.init_containers, *spec.containers)
        async with self._rollback(spec, where) as rollback:
            rollback.push("record", lambda: self._drop_record(pod, rollback))
            self._at(where, "pull")
            images = await self._pull_all(spec, where)
            self._at(where, "bundle")
            await self._make(
                rollback,
                pod,
                "poddir",
                pod,
                {"path": str(directory)},
                lambda: finish_in_thread(directory.mkdir, 0o711, True),
            )
            volumes = await finish_in_thread(prepare_volumes, spec, directory)
            await together(
                [
                    self._bundle(rollback, spec, c, images[c.image], volumes, where)
                    for c in everything
                ]
            )
            await self._create_all(rollback, pod, everything, where)
            for init in spec.init_containers:
                self._at(where, "init", init.name)
                cid = container_id(pod, init.name)
                await self.runtime.start(cid)
                code = await self.runtime.wait(cid)
                if code != 0:
                    output = log_tail(self.containers.log_path(cid))
                    raise init_container_failed(pod, init.name, code, output)
            for c in spec.containers:
                self._at(where, "start", c.name)
                await self.runtime.start(container_id(pod, c.name))
            self._at(where, "supervisor")
            await self._start_supervisor(rollback, spec, directory)
            self.store.update(pod, state="ready")
            rollback.pop_all()
        return PodHandle(pod, spec.name, spec.namespace, self.backend, None)

    async def _bundle(
        self,
        rollback: Rollback,
        spec: PodSpec,
        c: Container,
        image: Image,
        volumes: dict[str, Path],
        where: _Where,
    ) -> None:
        cid = container_id(spec.id, c.name)
        config = ContainerConfig(
            name=cid,
            command=c.command,
            args=c.args,
            env=resolve_env(c, spec),
            working_dir=c.working_dir,
            mounts=container_mounts(c, spec, volumes),
            annotations=kubernetes_annotations(spec, c.name),
        )
        bundle_dir = self.paths.bundles / cid

        def build() -> None:
            with open_wasm_module(image, self.images.open_blob) as module:
                self.builder.build_wasm_bundle(image, config, module, bundle_dir)

        try:
            await self._make(
                rollback,
                spec.id,
                "bundle",
                cid,
                {"path": str(bundle_dir)},
                lambda: finish_in_thread(build),
            )
        except Exception:  # the first to fail is named (siblings are not cancelled)
            where.container = where.container or c.name
            raise

    async def exec(
        self,
        pod_id: str,
        container: str | None,
        argv: Sequence[str],
        *,
        timeout: float = EXEC_TIMEOUT,
    ) -> ExecResult:
        """Refused: a WASI module has no way to start a second process inside it."""
        await self._exec_checked(pod_id, container, argv)
        raise NotSupported(
            f"pod {pod_id} runs WebAssembly modules, which cannot exec a command",
            hint="read the module's output with 'magikrun pod logs' instead, or run a "
            "native pod (runtimeClassName: magikrun-native) for a shell",
            pod_id=pod_id,
        )
