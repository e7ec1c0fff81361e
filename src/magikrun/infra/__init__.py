"""The pod's infra program: holds the pod's namespaces while its containers come and go.

Run as ``python -I -m magikrun.infra POD_ID`` inside the pod's infra container. It
imports only the standard library so that it starts fast, and ends with status 0 on
SIGTERM or SIGINT (the pod is being stopped).
"""

from ._main import main as main

__all__ = ["main"]
