"""Platform facts: limits, paths, and what this machine can run."""

import typing

from .. import _lazy
from ._limits import *  # noqa: F403
from ._limits import __all__ as _limits_all

if typing.TYPE_CHECKING:
    from ._detect import NAMESPACES as NAMESPACES
    from ._detect import Capability as Capability
    from ._detect import CgroupHierarchy as CgroupHierarchy
    from ._detect import CgroupMembership as CgroupMembership
    from ._detect import CgroupMode as CgroupMode
    from ._detect import Cgroups as Cgroups
    from ._detect import Hypervisor as Hypervisor
    from ._detect import HypervisorKind as HypervisorKind
    from ._detect import Mount as Mount
    from ._detect import Platform as Platform
    from ._detect import Tool as Tool
    from ._detect import find_tools as find_tools
    from ._detect import hypervisor_status as hypervisor_status
    from ._detect import parse_cgroups as parse_cgroups
    from ._detect import parse_filesystems as parse_filesystems
    from ._detect import parse_mounts as parse_mounts
    from ._detect import parse_proc_cgroup as parse_proc_cgroup
    from ._paths import ENV_ROOT as ENV_ROOT
    from ._paths import Paths as Paths

__all__ = sorted(
    [
        *_limits_all,
        "Capability",
        "CgroupHierarchy",
        "CgroupMembership",
        "CgroupMode",
        "Cgroups",
        "ENV_ROOT",
        "Hypervisor",
        "HypervisorKind",
        "Mount",
        "NAMESPACES",
        "Paths",
        "Platform",
        "Tool",
        "find_tools",
        "hypervisor_status",
        "parse_cgroups",
        "parse_filesystems",
        "parse_mounts",
        "parse_proc_cgroup",
    ]
)

__getattr__, __dir__ = _lazy.attach(
    __name__,
    {
        "._detect": (
            "NAMESPACES",
            "Capability",
            "CgroupHierarchy",
            "CgroupMembership",
            "CgroupMode",
            "Cgroups",
            "Hypervisor",
            "HypervisorKind",
            "Mount",
            "Platform",
            "Tool",
            "find_tools",
            "hypervisor_status",
            "parse_cgroups",
            "parse_filesystems",
            "parse_mounts",
            "parse_proc_cgroup",
        ),
        "._paths": (
            "ENV_ROOT",
            "Paths",
        ),
    },
)
