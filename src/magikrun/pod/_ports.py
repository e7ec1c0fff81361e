"""Host port forwards an infra extension asks for, opened by whoever holds its channel.

``run_pod`` answers the requests made while the extensions start; the pod's supervisor
answers the later ones (an extension reacting to an event). Both open the forward on the
pod's recorded CNI attachment, so the ``network`` resource's undo removes it with the rest.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PodError
from ..platform._paths import Paths
from ._network import PodNetwork, PortMapping
from ._state import PodStore

__all__ = ["forward_port"]


async def forward_port(
    paths: Paths, pod_id: str, protocol: str, host_port: int, container_port: int
) -> None:
    """Forward ``host_port`` on the host to ``container_port`` on the pod's IP (CNI portmap).

    Raises ``PodError`` for a pod on the host's network (there is nothing to forward) and
    ``PodNetworkError`` when the pod is not attached or already forwards ``host_port``.
    """
    store = PodStore(paths)
    if store.get(pod_id).spec.host_network:
        raise PodError(
            f"pod {pod_id} uses the host's network: its port {container_port} is the host's "
            f"port {container_port} already, no forward from {host_port} is made",
            hint="listen on the host port itself in a hostNetwork pod",
            pod_id=pod_id,
        )
    attached = [r for r in store.resources(pod_id) if r.kind == "network"]
    if not attached:
        raise PodError(f"pod {pod_id} has no network attachment to forward into", pod_id=pod_id)
    data = attached[-1].data
    network = PodNetwork(paths, bridge=str(data["bridge"]), subnet=str(data["subnet"]))
    mapping = PortMapping(host_port=host_port, container_port=container_port, protocol=protocol)
    await network.add_ports(pod_id, Path(data["netns"]), [mapping])
