"""The embedded demo images, built offline from what this machine has.

- ``magikrun.local/busybox:demo``: Debian's static busybox at ``/bin/busybox`` with a
  symlink per applet it lists, ``/etc/passwd``, ``/etc/group`` and ``/tmp``; runs ``sh``.
- ``magikrun.local/hello-wasm:demo``: a WASI hello-world module compiled from the WAT
  below, packaged as an OCI artifact (layer ``application/vnd.wasm.content.layer.v1+wasm``,
  config ``application/vnd.wasm.config.v0+json``).

Both are deterministic (fixed times, sorted entries, canonical JSON): building twice on
one machine gives the same digests.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..platform import Paths
from ._layout import LayerEntry, LayoutWriter, build_layer
from ._mediatypes import OCI_LAYER_GZIP, WASM_CONFIG, WASM_LAYER
from ._model import Image, PlatformSpec

__all__ = [
    "BUSYBOX_DEMO_REF",
    "HELLO_WASM_DEMO_REF",
    "HELLO_WAT",
    "build_demo_images",
    "write_demo_layout",
]

BUSYBOX_DEMO_REF = "magikrun.local/busybox:demo"
HELLO_WASM_DEMO_REF = "magikrun.local/hello-wasm:demo"
BUSYBOX_BINARY = Path("/bin/busybox")
_CREATED = "2000-01-01T00:00:00Z"
_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

HELLO_WAT = """\
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello from magikrun on WebAssembly!\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 36))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def _busybox_layer(binary: Path) -> tuple[bytes, str]:
    try:
        data = binary.read_bytes()
        listing = subprocess.run(
            [str(binary), "--list"], check=True, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(
            f"cannot use {binary} to build the busybox demo image: {exc}",
            hint="install Debian's busybox-static (scripts/setup.sh does)",
            path=str(binary),
        ) from exc
    applets = sorted({a for a in listing.split() if a and "/" not in a and a != "busybox"})
    entries = [
        LayerEntry("bin", "dir", mode=0o755),
        LayerEntry("etc", "dir", mode=0o755),
        LayerEntry("tmp", "dir", mode=0o1777),
        LayerEntry("root", "dir", mode=0o700),
        LayerEntry("bin/busybox", data=data, mode=0o755),
        LayerEntry("etc/passwd", data=_PASSWD),
        LayerEntry("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n"),
        *(LayerEntry(f"bin/{a}", "symlink", mode=0o777, target="busybox") for a in applets),
    ]
    return build_layer(entries)


def _busybox_config(diff_id: str, platform: PlatformSpec) -> dict[str, Any]:
    return {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": _CREATED,
        "config": {"Cmd": ["sh"], "Env": [_PATH_ENV], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": _CREATED, "created_by": "magikrun image demo"}],
    }


def _hello_module() -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(HELLO_WAT))


def write_demo_layout(dest: Path, *, busybox: Path = BUSYBOX_BINARY) -> list[str]:
    """Write both demo images into an OCI layout at ``dest``; returns their manifest digests."""
    platform = PlatformSpec.host()
    writer = LayoutWriter(dest)
    blob, diff_id = _busybox_layer(busybox)
    digests = [
        writer.add_image(
            ref_name=BUSYBOX_DEMO_REF,
            config=_busybox_config(diff_id, platform),
            layers=[(OCI_LAYER_GZIP, blob)],
            platform=platform,
        )
    ]
    module = _hello_module()
    wasm_config = {
        "architecture": "wasm",
        "os": "wasip1",
        "created": _CREATED,
        "config": {"Entrypoint": ["/hello.wasm"]},
    }
    digests.append(
        writer.add_image(
            ref_name=HELLO_WASM_DEMO_REF,
            config=wasm_config,
            config_media_type=WASM_CONFIG,
            layers=[(WASM_LAYER, module)],
            artifact_type=WASM_CONFIG,
        )
    )
    writer.write_index()
    return digests


async def build_demo_images(paths: Paths) -> list[Image]:
    """Build the demo images and import them into the store at ``paths`` (idempotent)."""
    from ._service import ImageService

    service = ImageService(paths)
    with tempfile.TemporaryDirectory(prefix="magikrun-demo-") as tmp:
        write_demo_layout(Path(tmp))
        return await service.import_(tmp)
