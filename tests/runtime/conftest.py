"""Backends for the lifecycle conformance suite: adding a backend is one entry in BACKENDS.

A backend case builds a runtime for a magikrun root and bundles for three
workloads every backend can run: ``("exit", N)`` exits with N, ``("hello",)``
writes ``hello`` to stdout and exits 0, ``("sleep",)`` runs until it is killed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from magikrun.platform import Paths
from magikrun.runtime import NativeRuntime, OciRuntime
from magikrun.runtime._wasmtime import WasmtimeRuntime
from tests.runtime._bundles import native_bundle
from tests.runtime.test_wasm_runtime import conformance_bundle

Workload = tuple[str, ...] | tuple[str, int]


@dataclass(frozen=True)
class BackendCase:
    name: str
    make_runtime: Callable[[Paths], OciRuntime]
    make_bundle: Callable[[Paths, Path, Workload], Path]
    skip_reason: Callable[[], str | None] = lambda: None


def _native_workload(paths: Paths, bundle_dir: Path, workload: Workload) -> Path:
    if workload[0] == "exit":
        argv = ["/bin/sh", "-c", f"exit {workload[1]}"]
    elif workload[0] == "hello":
        argv = ["/bin/sh", "-c", "echo hello"]
    else:
        # A pid-namespace init ignores signals it has no handler for: trap them.
        traps = " ".join(f"trap 'exit {128 + n}' {n};" for n in (1, 2, 3, 10, 12, 15))
        argv = ["/bin/sh", "-c", f"{traps} while :; do sleep 0.05; done"]
    return native_bundle(paths, bundle_dir, argv, name=f"t-{uuid.uuid4().hex[:12]}")


def _needs(binary: str) -> Callable[[], str | None]:
    def reason() -> str | None:
        if os.geteuid() != 0:
            return "native containers need root"
        return None if shutil.which(binary) else f"{binary} is not installed"

    return reason


BACKENDS: list[BackendCase] = [
    BackendCase(
        "crun", lambda p: NativeRuntime(p, oci_binary="crun"), _native_workload, _needs("crun")
    ),
    BackendCase(
        "runc", lambda p: NativeRuntime(p, oci_binary="runc"), _native_workload, _needs("runc")
    ),
    BackendCase("wasm", WasmtimeRuntime, conformance_bundle),
]

_ids = itertools.count()


@pytest.fixture(params=BACKENDS, ids=lambda case: case.name)
def backend(request: pytest.FixtureRequest) -> BackendCase:
    case: BackendCase = request.param
    reason = case.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return case


@pytest.fixture
def runtime(backend: BackendCase, paths: Paths) -> OciRuntime:
    return backend.make_runtime(paths)


@pytest.fixture
def bundle(backend: BackendCase, paths: Paths, short_tmp: Path) -> Callable[..., Path]:
    """``bundle("exit", 3)`` → a bundle directory for that workload."""

    def make(*workload: str | int) -> Path:
        directory = short_tmp / f"bundle{next(_ids)}"
        return backend.make_bundle(paths, directory, workload)  # type: ignore[arg-type]

    return make


@pytest.fixture
def cid() -> str:
    """A container id unique across xdist workers."""
    return f"c-{uuid.uuid4().hex[:16]}"
