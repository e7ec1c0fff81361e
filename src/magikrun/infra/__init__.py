"""The pod's infra program and the ``InfraExtension`` framework.

The infra container runs ``python -I -m magikrun.infra POD_ID [DIR]``: it holds the pod's
namespaces and runs the extensions the pod names in its ``magikrun.io/infra-extensions``
annotation, found through the entry-point group ``magikrun.infra_extensions``. The program
(everything but ``_host``) imports only the standard library, so it runs unchanged in a
microVM's guest.
"""

from ._events import ContainerCreated as ContainerCreated
from ._events import ContainerExited as ContainerExited
from ._events import ContainerRestarted as ContainerRestarted
from ._events import ContainerStarted as ContainerStarted
from ._events import Event as Event
from ._events import EventsDropped as EventsDropped
from ._events import PodStopping as PodStopping
from ._extension import InfraContext as InfraContext
from ._extension import InfraExtension as InfraExtension
from ._extension import Placement as Placement
from ._health import HealthExtension as HealthExtension
from ._host import CONFIG_ANNOTATION_PREFIX as CONFIG_ANNOTATION_PREFIX
from ._host import EXTENSIONS_ANNOTATION as EXTENSIONS_ANNOTATION
from ._host import INFRA_PATH_ENV as INFRA_PATH_ENV
from ._host import InfraLink as InfraLink
from ._host import load_extension as load_extension
from ._main import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
from ._main import main as main

__all__ = [
    "CONFIG_ANNOTATION_PREFIX",
    "ENTRY_POINT_GROUP",
    "EXTENSIONS_ANNOTATION",
    "INFRA_PATH_ENV",
    "ContainerCreated",
    "ContainerExited",
    "ContainerRestarted",
    "ContainerStarted",
    "Event",
    "EventsDropped",
    "HealthExtension",
    "InfraContext",
    "InfraExtension",
    "InfraLink",
    "Placement",
    "PodStopping",
    "load_extension",
    "main",
]
