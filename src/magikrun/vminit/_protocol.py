"""The control protocol between the host and a microVM's init: framing and names.

One JSON object per line (UTF-8, ``\\n``-terminated, at most ``max_frame`` bytes, which
the host bakes into the guest's configuration). The host sends requests
``{"id": N, "op": ..., ...}``; the guest answers each with ``{"id": N, "ok": true,
"result": ...}`` or ``{"id": N, "ok": false, "error": ...}``, streams ``{"id": N,
"item": ...}`` before the answer where an op yields many things (``logs`` with
``follow``), and announces ``{"event": "ready", ...}`` unasked. The first request must
be ``hello`` with the VM's token; the guest refuses everything before it.

``boot`` answers how far the pod got (``stage``: ``infra``, ``init`` or ``apps``), what
stopped it (``failure``: ``{"kind": "init", "name", "exit_code"}``, or the infra
program's ``{"extension", "error"}``) and the infra program's state with the number of
events it could not be sent (``infra``: ``{"state", "dropped_events"}`` or null).
``hold`` with a ``grace`` also tells the infra extensions the pod is stopping.

Where the pod runs infra extensions, the guest forwards their port requests unasked as
``{"event": "port", "request": N, "protocol": "tcp"|"udp", "host_port", "container_port"}``
(at any time, not only while the pod starts); the host answers each with the request
``{"op": "port-result", "request": N, "error": null or TEXT}``.

The channel is a virtio-serial port (or vsock) that only the host process holding
QEMU's end can reach: no network listener exists in the guest. This module is
imported by the guest's PID 1, so it uses nothing beyond ``json``: under TCG every
imported module costs the boot tens of milliseconds.
"""

from __future__ import annotations

import json

__all__ = ["OPS", "PORT_NAME", "decode", "encode"]

PORT_NAME = "org.magikrun.control"
"""Name of the virtio-serial port the guest finds under /sys/class/virtio-ports."""
OPS = (
    "hello",
    "ping",
    "exec",
    "logs",
    "status",
    "boot",
    "started",
    "hold",
    "stop",
    "port-result",
)
"""Requests the guest serves."""


def encode(message: dict[str, object], max_frame: int) -> bytes:
    """One frame; ``ValueError`` if it is over ``max_frame`` bytes."""
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > max_frame:
        raise ValueError(f"message of {len(data)} bytes is over {max_frame}")
    return data


def decode(line: bytes) -> dict[str, object]:
    """The JSON object in one frame; ``ValueError`` for anything else."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a frame must hold a JSON object")
    return message
