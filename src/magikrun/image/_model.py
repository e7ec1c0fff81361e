"""The image data magikrun works with once a manifest and config are parsed and checked."""

from __future__ import annotations

import platform as _stdlib_platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidArgument

__all__ = [
    "Descriptor",
    "Image",
    "ImageConfig",
    "Layer",
    "PlatformSpec",
    "ProgressCallback",
    "ProgressEvent",
]

_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


@dataclass(frozen=True, slots=True)
class PlatformSpec:
    """An OCI platform: ``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> PlatformSpec:
        parts = text.strip().split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise InvalidArgument(
                f"invalid platform {text!r}", hint="use OS/ARCH[/VARIANT], e.g. linux/arm64/v8"
            )
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> PlatformSpec:
        machine = _stdlib_platform.machine()
        arch = _ARCH_ALIASES.get(machine, machine)
        return cls("linux", arch, "v8" if arch == "arm64" else None)

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor, validated."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    platform: PlatformSpec | None = None


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of an image: the blob as stored, and the digest of its uncompressed tar."""

    digest: str
    media_type: str
    size: int
    diff_id: str
    """For archive layers, the sha256 of the uncompressed tar (the config's rootfs.diff_ids);
    for a wasm module layer, the blob digest itself."""


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config that decide how a container runs. Untrusted input:
    validated when parsed, and again by whoever builds a bundle from it."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: tuple[str, ...] = ()
    stop_signal: str = ""


@dataclass(frozen=True, slots=True)
class Image:
    """A pulled or imported image as the local store knows it."""

    reference: str
    """The normalized reference it was stored under (``host/repo:tag``)."""
    manifest_digest: str
    config_digest: str
    platform: PlatformSpec
    config: ImageConfig
    layers: tuple[Layer, ...]
    kind: Literal["oci", "wasm"] = "oci"
    """``wasm`` when the image's module layers are WebAssembly (artifact or marked)."""
    annotations: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Progress of one blob: ``done`` of ``total`` bytes; ``finished`` once stored."""

    digest: str
    total: int
    done: int
    finished: bool


ProgressCallback = Callable[[ProgressEvent], None]
