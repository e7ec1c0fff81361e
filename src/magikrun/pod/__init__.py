"""Pods: the ``PodSpec`` model of Kubernetes Pod manifests, pod networking and pod runtimes."""

from ._hostfiles import (
    etc_hostname as etc_hostname,
)
from ._hostfiles import (
    etc_hosts as etc_hosts,
)
from ._hostfiles import (
    etc_resolv_conf as etc_resolv_conf,
)
from ._hostfiles import (
    write_etc_files as write_etc_files,
)
from ._native import NativePodRuntime as NativePodRuntime
from ._network import (
    DEFAULT_BRIDGE as DEFAULT_BRIDGE,
)
from ._network import (
    DEFAULT_SUBNET as DEFAULT_SUBNET,
)
from ._network import NetworkStatus as NetworkStatus
from ._network import PodNetwork as PodNetwork
from ._network import PortMapping as PortMapping
from ._network import create_netns as create_netns
from ._network import delete_netns as delete_netns
from ._quantity import cpu_millicores as cpu_millicores
from ._quantity import memory_bytes as memory_bytes
from ._quantity import parse_quantity as parse_quantity
from ._rollback import Rollback as Rollback
from ._select import RUNTIME_CLASSES as RUNTIME_CLASSES
from ._select import find_pod as find_pod
from ._select import open_pod_runtime as open_pod_runtime
from ._select import recover_pods as recover_pods
from ._spec import *  # noqa: F403
from ._spec import __all__ as _spec_all
from ._types import ContainerInfo as ContainerInfo
from ._types import LogLine as LogLine
from ._types import PodHandle as PodHandle
from ._types import PodPhase as PodPhase
from ._types import PodRuntime as PodRuntime
from ._types import PodStatus as PodStatus
from ._wasm import WasmPodRuntime as WasmPodRuntime

__all__ = sorted(
    [
        *_spec_all,
        "ContainerInfo",
        "DEFAULT_BRIDGE",
        "DEFAULT_SUBNET",
        "LogLine",
        "NativePodRuntime",
        "NetworkStatus",
        "PodHandle",
        "PodNetwork",
        "PodPhase",
        "PodRuntime",
        "PodStatus",
        "RUNTIME_CLASSES",
        "Rollback",
        "WasmPodRuntime",
        "PortMapping",
        "cpu_millicores",
        "create_netns",
        "delete_netns",
        "etc_hostname",
        "etc_hosts",
        "etc_resolv_conf",
        "find_pod",
        "memory_bytes",
        "open_pod_runtime",
        "parse_quantity",
        "recover_pods",
        "write_etc_files",
    ]
)
