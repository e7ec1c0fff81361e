"""Helpers of the infra tests: health endpoint polling, free ports, pod manifests."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

from tests.pod._podkit import BUSYBOX

__all__ = ["free_port", "get_json", "infra_pod", "wait_for"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def get_json(host: str, port: int, path: str = "/") -> Any:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


async def wait_for(
    fetch: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 30.0
) -> Any:
    """Poll ``fetch`` until ``check`` holds (the last value is returned either way).

    Each try gets a few seconds: a connection whose first SYN went nowhere would otherwise
    sit in the kernel's SYN retries (two minutes) while a new one would get through.
    """
    value: Any = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            value = await asyncio.wait_for(fetch(), 5.0)
        except OSError as exc:
            value = exc
        if not isinstance(value, OSError) and check(value):
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached in {timeout} s; last: {value!r}")


def infra_pod(
    name: str,
    extensions: str,
    containers: dict[str, str],
    *,
    config: dict[str, str] | None = None,
    restart: str = "Never",
) -> bytes:
    """A Pod manifest whose busybox containers run ``sh -c COMMAND``, with extensions."""
    annotations = {"magikrun.io/infra-extensions": extensions}
    for ext, value in (config or {}).items():
        annotations[f"magikrun.io/infra-config.{ext}"] = value
    body = "".join(
        f"  - name: {c}\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n"
        f"    command: [sh, -c, {json.dumps(cmd)}]\n"
        for c, cmd in containers.items()
    )
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n"
        f"  annotations: {json.dumps(annotations)}\n"
        f"spec:\n  restartPolicy: {restart}\n  terminationGracePeriodSeconds: 2\n"
        f"  containers:\n{body}"
    ).encode()
