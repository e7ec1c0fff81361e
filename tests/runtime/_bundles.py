"""Test bundles: a busybox-static rootfs and BundleBuilder's real config.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from magikrun.image import BundleBuilder, ContainerConfig
from magikrun.platform import Paths

BUSYBOX = Path("/bin/busybox")


def make_rootfs(rootfs: Path) -> Path:
    """A root filesystem holding only busybox-static (its applets through ``/bin/sh``…)."""
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("sh", "true", "sleep", "ls", "cat", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    for directory in ("proc", "dev", "sys", "tmp"):
        (rootfs / directory).mkdir()
    return rootfs


def native_bundle(
    paths: Paths,
    bundle_dir: Path,
    argv: Sequence[str],
    *,
    name: str,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **config: Any,
) -> Path:
    """A bundle for ``argv`` built by BundleBuilder; ``edit`` may then change config.json.

    ``name`` must be unique per test (it names the container's cgroup).
    """
    rootfs = make_rootfs(bundle_dir / "rootfs")
    BundleBuilder(paths).build_oci_bundle(
        None, ContainerConfig(name=name, command=list(argv), **config), rootfs, bundle_dir
    )
    if edit is not None:
        path = bundle_dir / "config.json"
        spec = json.loads(path.read_text())
        edit(spec)
        path.write_text(json.dumps(spec))
    return bundle_dir
