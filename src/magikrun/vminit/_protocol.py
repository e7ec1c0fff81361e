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
imported by the guest's PID 1, so it uses nothing beyond ``_json``, the C half of
``json``: importing ``json`` itself brings in ``re`` and ``enum``, which cost the boot
about half a second under TCG.
"""

from __future__ import annotations

import _json

__all__ = ["OPS", "PORT_NAME", "decode", "dumps", "encode", "loads"]

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


_WHITESPACE = " \t\n\r"


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps(value: object) -> str:
    """``json.dumps(value, separators=(",", ":"))`` (ASCII, no NaN check) on ``_json`` alone."""
    encoder = _json.make_encoder(
        {}, _unserializable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return "".join(encoder(value, 0))


class _Context:
    """What ``_json``'s scanner reads from a ``json.JSONDecoder``: its default settings."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity and -Infinity, as json.loads reads them


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # typeshed: a make_scanner


def loads(text: str | bytes) -> object:
    """``json.loads(text)`` on ``_json`` alone; ``ValueError`` for what is not one JSON value.

    ``_json`` raises ``json.JSONDecodeError`` (a ``ValueError``) for malformed text,
    importing ``json.decoder`` then: the error path alone pays for it.
    """
    if isinstance(text, bytes):
        text = text.decode()
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: char {exc.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def encode(message: dict[str, object], max_frame: int) -> bytes:
    """One frame; ``ValueError`` if it is over ``max_frame`` bytes."""
    data = dumps(message).encode() + b"\n"
    if len(data) > max_frame:
        raise ValueError(f"message of {len(data)} bytes is over {max_frame}")
    return data


def decode(line: bytes) -> dict[str, object]:
    """The JSON object in one frame; ``ValueError`` for anything else."""
    message = loads(line)
    if not isinstance(message, dict):
        raise ValueError("a frame must hold a JSON object")
    return message
