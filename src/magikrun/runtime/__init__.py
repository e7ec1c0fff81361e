"""Single-container OCI runtimes behind one lifecycle: create → start → state → kill → delete.

The native backend (crun/runc) is here; the wasm backend is imported only when
chosen, through :class:`RuntimeRegistry`.
"""

import typing

from .. import _lazy

if typing.TYPE_CHECKING:
    from ._crun import NativeRuntime as NativeRuntime
    from ._crun import ensure_cgroup_compat as ensure_cgroup_compat
    from ._crun import load_bundle_config as load_bundle_config
    from ._registry import RuntimeRegistry as RuntimeRegistry
    from ._store import ContainerRecord as ContainerRecord
    from ._store import ContainerStore as ContainerStore
    from ._store import validate_container_id as validate_container_id
    from ._types import OCI_VERSION as OCI_VERSION
    from ._types import ContainerState as ContainerState
    from ._types import ContainerStatus as ContainerStatus
    from ._types import ExecResult as ExecResult
    from ._types import OciRuntime as OciRuntime
    from ._types import parse_signal as parse_signal

__all__ = [
    "OCI_VERSION",
    "ContainerRecord",
    "ContainerState",
    "ContainerStatus",
    "ContainerStore",
    "ExecResult",
    "NativeRuntime",
    "OciRuntime",
    "RuntimeRegistry",
    "ensure_cgroup_compat",
    "load_bundle_config",
    "parse_signal",
    "validate_container_id",
]

__getattr__, __dir__ = _lazy.attach(
    __name__,
    {
        "._crun": (
            "NativeRuntime",
            "ensure_cgroup_compat",
            "load_bundle_config",
        ),
        "._registry": ("RuntimeRegistry",),
        "._store": (
            "ContainerRecord",
            "ContainerStore",
            "validate_container_id",
        ),
        "._types": (
            "OCI_VERSION",
            "ContainerState",
            "ContainerStatus",
            "ExecResult",
            "OciRuntime",
            "parse_signal",
        ),
    },
)
