"""The host's end of a pod's infra channel: readiness handshake, events, port requests.

Natively the host connects to the infra program's unix socket (in a 0700 directory of the
pod, bind-mounted into the infra container). Any byte stream works: a microVM's host side
hands :class:`InfraLink` the streams its control channel relays.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    InfraExtensionFailed,
    InvalidPodSpec,
    MagikrunError,
    MagikrunTimeout,
    PodError,
)
from ..platform._limits import INFRA_MESSAGE_MAX, INFRA_READY_TIMEOUT
from ._channel import ChannelClosed, read_message, write_message
from ._events import Event, event_to_json
from ._extension import InfraExtension
from ._main import ENTRY_POINT_GROUP, instantiate

__all__ = [
    "CONFIG_ANNOTATION_PREFIX",
    "EXTENSIONS_ANNOTATION",
    "INFRA_PATH_ENV",
    "InfraLink",
    "PortHandler",
    "extension_failed",
    "infra_extensions",
    "infra_path",
    "load_extension",
    "resolve_extensions",
    "write_pod_config",
]

EXTENSIONS_ANNOTATION = "magikrun.io/infra-extensions"
CONFIG_ANNOTATION_PREFIX = "magikrun.io/infra-config."
INFRA_PATH_ENV = "MAGIKRUN_INFRA_PATH"
"""Extra ``sys.path`` entries (``:``-separated, absolute) where the infra program looks
for extension distributions besides the Python magikrun runs on."""
_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?")
_MAX_EXTENSIONS = 16
_CONNECT_POLL = 0.02

PortHandler = Callable[[str, int, int], Awaitable[None]]
"""``(protocol, host_port, container_port)``: opens the forward, or raises ``MagikrunError``."""


def infra_extensions(annotations: Mapping[str, str]) -> list[str]:
    """The extension names a pod asks for (``magikrun.io/infra-extensions: a,b``), checked."""
    raw = annotations.get(EXTENSIONS_ANNOTATION, "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if bad or len(names) > _MAX_EXTENSIONS or len(set(names)) != len(names):
        raise InvalidPodSpec(
            f"annotation {EXTENSIONS_ANNOTATION} = {raw!r} is not a list of distinct names",
            hint=f"use up to {_MAX_EXTENSIONS} comma-separated lowercase names, e.g. 'health'",
            field=f"metadata.annotations[{EXTENSIONS_ANNOTATION}]",
        )
    return names


def infra_path() -> list[str]:
    """``$MAGIKRUN_INFRA_PATH`` as absolute paths (relative ones are refused)."""
    entries = [p for p in os.environ.get(INFRA_PATH_ENV, "").split(":") if p]
    relative = [p for p in entries if not os.path.isabs(p)]
    if relative:
        raise PodError(
            f"{INFRA_PATH_ENV} holds relative paths: {relative}",
            hint="use absolute directories",
        )
    return entries


def resolve_extensions(pod_id: str, annotations: Mapping[str, str]) -> dict[str, str]:
    """The extensions the pod names (:func:`infra_extensions`), each with its entry point
    (``module:attr``) found here on the host in the ``magikrun.infra_extensions`` group of
    the distributions on ``sys.path`` and then :func:`infra_path` (the infra program's own
    search order). So an unknown name fails ``run_pod`` before anything of the pod exists,
    and the infra program imports each module directly: scanning the distributions'
    metadata would cost a microVM's boot seconds under TCG.
    """
    names = infra_extensions(annotations)
    if not names:
        return {}
    found = _entry_points(infra_path())
    for name in names:
        if name not in found:
            raise extension_failed(pod_id, name, _unknown(name, found))
    return {name: found[name] for name in names}


def load_extension(name: str) -> InfraExtension:
    """Instantiate the extension registered under ``name`` in ``magikrun.infra_extensions``
    on this Python's path (``LookupError`` when none is)."""
    found = _entry_points(())
    if name not in found:
        raise LookupError(_unknown(name, found))
    return instantiate(name, found[name])


def _entry_points(path: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import distributions  # its imports are heavy; host only

    found: dict[str, str] = {}
    for distribution in distributions(path=[*sys.path, *path]):
        for entry in distribution.entry_points.select(group=ENTRY_POINT_GROUP):
            found.setdefault(entry.name, entry.value)
    return found


def _unknown(name: str, found: Mapping[str, str]) -> str:
    return f"no infra extension named {name!r} (installed: {', '.join(sorted(found)) or 'none'})"


def write_pod_config(
    directory: Path,
    *,
    name: str,
    namespace: str,
    uid: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    pod_ip: str | None,
    placement: str,
    grace: float,
    extensions: Mapping[str, str],
    path: Sequence[str],
) -> None:
    """``pod.json``, what the infra program reads at start (written before it starts):
    ``extensions`` maps each name to its entry point (:func:`resolve_extensions`)."""
    config = {
        n: annotations[CONFIG_ANNOTATION_PREFIX + n]
        for n in extensions
        if CONFIG_ANNOTATION_PREFIX + n in annotations
    }
    document = {
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "labels": dict(labels),
        "annotations": dict(annotations),
        "pod_ip": pod_ip,
        "placement": placement,
        "grace": grace,
        "extensions": list(extensions),
        "targets": dict(extensions),
        "config": config,
        "path": list(path),
    }
    tmp = directory / "pod.json.tmp"
    tmp.write_text(json.dumps(document))
    tmp.replace(directory / "pod.json")


def extension_failed(pod_id: str, name: str, error: str) -> InfraExtensionFailed:
    """The error for extension ``name`` failing (or missing) at start, in either placement."""
    return InfraExtensionFailed(
        f"infra extension {name!r} of pod {pod_id} failed to start: {error}",
        extension=name,
        pod_id=pod_id,
    )


class InfraLink:
    """One connection to a pod's infra program (it serves one at a time; others wait).

    ```python
    link = await InfraLink.connect_unix(pod_dir / "infra", on_port=forward)
    await link.wait_ready()
    await link.send(ContainerStarted(name="app", pid=1234))
    await link.aclose()
    ```
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_port: PortHandler | None,
        pod_id: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_port = on_port
        self.pod_id = pod_id

    @classmethod
    async def connect_unix(
        cls,
        directory: Path,
        *,
        on_port: PortHandler | None,
        pod_id: str,
        timeout: float = INFRA_READY_TIMEOUT,
    ) -> InfraLink:
        """Connect to ``directory/infra.sock``, waiting for the program to create it.

        The socket is reached through ``/proc/self/fd`` of the opened directory so a long
        state path does not hit the 108-byte limit of socket addresses.
        """
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        reader, writer = await asyncio.open_unix_connection(
                            f"/proc/self/fd/{fd}/infra.sock", limit=INFRA_MESSAGE_MAX
                        )
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        await asyncio.sleep(_CONNECT_POLL)
        except TimeoutError as exc:
            raise MagikrunTimeout(
                f"the infra program of pod {pod_id} did not open its socket in {timeout:g} s",
                hint="see the infra container's log",
                pod_id=pod_id,
            ) from exc
        finally:
            os.close(fd)
        return cls(reader, writer, on_port=on_port, pod_id=pod_id)

    async def wait_ready(self, timeout: float = INFRA_READY_TIMEOUT) -> None:
        """Until every extension started (answering port requests meanwhile).

        Raises ``InfraExtensionFailed`` naming the extension that failed or is unknown.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self._receive()
                    if message.get("type") == "ready":
                        return
                    if message.get("type") == "failed":
                        raise extension_failed(
                            self.pod_id, str(message.get("extension")), str(message.get("error"))
                        )
                    await self._answer(message)
        except TimeoutError as exc:
            raise MagikrunTimeout(
                f"the infra extensions of pod {self.pod_id} did not start in {timeout:g} s",
                hint="see the infra container's log",
                pod_id=self.pod_id,
            ) from exc

    async def serve(self) -> None:
        """Answer port requests until the infra program closes the channel.

        A channel that closes while a forward is being added ends the loop quietly: the
        forward was recorded before it was made, so the pod's removal undoes it.
        """
        while True:
            try:
                message = await read_message(self._reader)
                await self._answer(message)
            except (ChannelClosed, ConnectionError):
                return

    async def send(self, event: Event) -> None:
        """Deliver one event (the infra program queues it per extension)."""
        await write_message(self._writer, {"type": "event", "event": event_to_json(event)})

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def _receive(self) -> dict[str, Any]:
        try:
            return await read_message(self._reader)
        except ChannelClosed as exc:
            raise PodError(
                f"the infra program of pod {self.pod_id} closed its channel: {exc}",
                hint="see the infra container's log",
                pod_id=self.pod_id,
            ) from exc

    async def _answer(self, message: dict[str, Any]) -> None:
        if message.get("type") != "port":
            raise PodError(
                f"unexpected message from the infra program of pod {self.pod_id}: "
                f"{message.get('type')!r}",
                pod_id=self.pod_id,
            )
        error: str | None = None
        try:
            protocol = str(message["protocol"])
            host_port, container_port = int(message["host_port"]), int(message["container_port"])
            if protocol not in ("tcp", "udp") or not (
                0 < host_port < 65536 and 0 < container_port < 65536
            ):
                raise ValueError(f"bad port request {message!r}")
            if self._on_port is None:
                raise ValueError("this placement offers no host port forwards")
            await self._on_port(protocol, host_port, container_port)
        except (KeyError, ValueError, MagikrunError) as exc:
            error = str(exc)
        await write_message(
            self._writer, {"type": "port-result", "id": message.get("id"), "error": error}
        )
