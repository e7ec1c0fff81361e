"""Pods: the ``PodSpec`` model of Kubernetes Pod manifests, pod networking and pod runtimes."""

import typing

from .. import _lazy

if typing.TYPE_CHECKING:
    from ._hostfiles import etc_hostname as etc_hostname
    from ._hostfiles import etc_hosts as etc_hosts
    from ._hostfiles import etc_resolv_conf as etc_resolv_conf
    from ._hostfiles import write_etc_files as write_etc_files
    from ._native import NativePodRuntime as NativePodRuntime
    from ._network import DEFAULT_BRIDGE as DEFAULT_BRIDGE
    from ._network import DEFAULT_SUBNET as DEFAULT_SUBNET
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
    from ._select import list_all_pods as list_all_pods
    from ._select import open_pod_runtime as open_pod_runtime
    from ._select import recover_pods as recover_pods
    from ._select import runtime_for_pod as runtime_for_pod
    from ._spec import Capabilities as Capabilities
    from ._spec import ConfigMap as ConfigMap
    from ._spec import ConfigMapVolume as ConfigMapVolume
    from ._spec import Container as Container
    from ._spec import ContainerPort as ContainerPort
    from ._spec import DnsConfig as DnsConfig
    from ._spec import DnsOption as DnsOption
    from ._spec import DnsPolicy as DnsPolicy
    from ._spec import EmptyDirVolume as EmptyDirVolume
    from ._spec import EnvVar as EnvVar
    from ._spec import HostAlias as HostAlias
    from ._spec import HostPathType as HostPathType
    from ._spec import HostPathVolume as HostPathVolume
    from ._spec import KeyToPath as KeyToPath
    from ._spec import ObjectMeta as ObjectMeta
    from ._spec import PodSpec as PodSpec
    from ._spec import ProjectedFile as ProjectedFile
    from ._spec import Protocol as Protocol
    from ._spec import PullPolicy as PullPolicy
    from ._spec import ResourceList as ResourceList
    from ._spec import Resources as Resources
    from ._spec import RestartPolicy as RestartPolicy
    from ._spec import RuntimeFields as RuntimeFields
    from ._spec import Secret as Secret
    from ._spec import SecretVolume as SecretVolume
    from ._spec import SecurityContext as SecurityContext
    from ._spec import Volume as Volume
    from ._spec import VolumeMount as VolumeMount
    from ._spec import VolumeSource as VolumeSource
    from ._spec import pod_id as pod_id
    from ._spec import resolve_env as resolve_env
    from ._types import ContainerInfo as ContainerInfo
    from ._types import LogLine as LogLine
    from ._types import PodHandle as PodHandle
    from ._types import PodPhase as PodPhase
    from ._types import PodRuntime as PodRuntime
    from ._types import PodStatus as PodStatus
    from ._wasm import WasmPodRuntime as WasmPodRuntime

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
    "RUNTIME_CLASSES",
    "Capabilities",
    "ConfigMap",
    "ConfigMapVolume",
    "Container",
    "ContainerInfo",
    "ContainerPort",
    "DnsConfig",
    "DnsOption",
    "DnsPolicy",
    "EmptyDirVolume",
    "EnvVar",
    "HostAlias",
    "HostPathType",
    "HostPathVolume",
    "KeyToPath",
    "LogLine",
    "NativePodRuntime",
    "NetworkStatus",
    "ObjectMeta",
    "PodHandle",
    "PodNetwork",
    "PodPhase",
    "PodRuntime",
    "PodSpec",
    "PodStatus",
    "PortMapping",
    "ProjectedFile",
    "Protocol",
    "PullPolicy",
    "ResourceList",
    "Resources",
    "RestartPolicy",
    "Rollback",
    "RuntimeFields",
    "Secret",
    "SecretVolume",
    "SecurityContext",
    "Volume",
    "VolumeMount",
    "VolumeSource",
    "WasmPodRuntime",
    "cpu_millicores",
    "create_netns",
    "delete_netns",
    "etc_hostname",
    "etc_hosts",
    "etc_resolv_conf",
    "find_pod",
    "list_all_pods",
    "memory_bytes",
    "open_pod_runtime",
    "parse_quantity",
    "pod_id",
    "recover_pods",
    "resolve_env",
    "runtime_for_pod",
    "write_etc_files",
]

__getattr__, __dir__ = _lazy.attach(
    __name__,
    {
        "._hostfiles": (
            "etc_hostname",
            "etc_hosts",
            "etc_resolv_conf",
            "write_etc_files",
        ),
        "._native": ("NativePodRuntime",),
        "._network": (
            "DEFAULT_BRIDGE",
            "DEFAULT_SUBNET",
            "NetworkStatus",
            "PodNetwork",
            "PortMapping",
            "create_netns",
            "delete_netns",
        ),
        "._quantity": (
            "cpu_millicores",
            "memory_bytes",
            "parse_quantity",
        ),
        "._rollback": ("Rollback",),
        "._select": (
            "RUNTIME_CLASSES",
            "find_pod",
            "list_all_pods",
            "open_pod_runtime",
            "recover_pods",
            "runtime_for_pod",
        ),
        "._spec": (
            "Capabilities",
            "ConfigMap",
            "ConfigMapVolume",
            "Container",
            "ContainerPort",
            "DnsConfig",
            "DnsOption",
            "DnsPolicy",
            "EmptyDirVolume",
            "EnvVar",
            "HostAlias",
            "HostPathType",
            "HostPathVolume",
            "KeyToPath",
            "ObjectMeta",
            "PodSpec",
            "ProjectedFile",
            "Protocol",
            "PullPolicy",
            "ResourceList",
            "Resources",
            "RestartPolicy",
            "RuntimeFields",
            "Secret",
            "SecretVolume",
            "SecurityContext",
            "Volume",
            "VolumeMount",
            "VolumeSource",
            "pod_id",
            "resolve_env",
        ),
        "._types": (
            "ContainerInfo",
            "LogLine",
            "PodHandle",
            "PodPhase",
            "PodRuntime",
            "PodStatus",
        ),
        "._wasm": ("WasmPodRuntime",),
    },
)
