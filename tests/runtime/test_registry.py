"""Backend selection and availability."""

from __future__ import annotations

from typing import Any

import pytest

from magikrun.errors import InvalidArgument, InvalidBundle
from magikrun.platform import Paths
from magikrun.runtime import NativeRuntime, RuntimeRegistry


def _spec(args: list[str] | None = None, **annotations: str) -> dict[str, Any]:
    return {
        "process": {"args": args or ["/bin/true"]},
        "root": {"path": "rootfs"},
        "annotations": annotations,
    }


@pytest.fixture
def registry(paths: Paths) -> RuntimeRegistry:
    return RuntimeRegistry(paths)


@pytest.mark.parametrize(
    ("spec", "explicit", "expected"),
    [
        (_spec(), None, "native"),
        (_spec(["/app.wasm"]), None, "wasm"),
        (_spec(["/app.wat", "x"]), None, "wasm"),
        (_spec(**{"run.oci.handler": "wasm"}), None, "wasm"),
        (_spec(**{"run.oci.handler": "wasmtime"}), None, "wasm"),
        (_spec(**{"module.wasm.image/variant": "compat"}), None, "wasm"),
        (_spec(["/app.wasm"], **{"run.oci.handler": "crun"}), None, "native"),
        (_spec(["/app.wasm"]), "native", "native"),
        (_spec(**{"run.oci.handler": "wasm"}), "runc", "native"),
        (_spec(), "wasm", "wasm"),
        (_spec(), ["wasm", "wasmtime"], "wasm"),
    ],
)
def test_select_backend_order(
    registry: RuntimeRegistry, spec: dict[str, Any], explicit: Any, expected: str
):
    assert registry.select_backend(spec, explicit) == expected


def test_conflicting_explicit_choices(registry: RuntimeRegistry):
    with pytest.raises(InvalidArgument, match="conflicting runtime choices: native, wasm"):
        registry.select_backend(_spec(), ["native", "wasm"])


def test_conflicting_annotations(registry: RuntimeRegistry):
    spec = _spec(**{"run.oci.handler": "crun", "module.wasm.image/variant": "compat"})
    with pytest.raises(InvalidBundle, match="different runtimes"):
        registry.select_backend(spec)


def test_unknown_handler_and_runtime(registry: RuntimeRegistry):
    with pytest.raises(InvalidBundle, match="names no runtime"):
        registry.select_backend(_spec(**{"run.oci.handler": "krun9"}))
    with pytest.raises(InvalidArgument, match="unknown runtime 'qemu9'"):
        registry.select_backend(_spec(), "qemu9")


def test_native_aliases_match_registry():
    from magikrun.runtime._registry import BACKENDS

    assert BACKENDS["native"][2] == NativeRuntime.aliases


def test_available_reports_each_backend(registry: RuntimeRegistry):
    reasons = registry.available()
    assert set(reasons) == set(registry.names())
    assert all(r is None or (isinstance(r, str) and r) for r in reasons.values())
    assert registry.backend("crun") is registry.backend("native")


def test_native_unavailable_reason_names_the_binary(paths: Paths):
    runtime = NativeRuntime(paths, oci_binary="/nonexistent/crun")
    assert "not installed" in (runtime.unavailable_reason() or "") or not runtime.is_available()
