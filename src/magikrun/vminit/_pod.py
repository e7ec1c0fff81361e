"""Guest set-up before the pod's containers start: the pod's shares and the network.

The host shares each container's root filesystem, bundle and the pod's volumes over
9p at the same absolute paths as on the host, so the bundles' ``config.json`` files
(written by the host's ``BundleBuilder``) hold valid paths in the guest as well.
Run synchronously by PID 1 before it installs its SIGCHLD handling.
"""

from __future__ import annotations

import os

from ._init import PATH

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["READ_ONLY_OPTIONS", "SHARE_OPTIONS", "prepare"]

BUSYBOX = "/bin/busybox"
SHARE_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288"
"""Writable pod shares: no ``cache=loose``, the host writes into them as well."""
READ_ONLY_OPTIONS = SHARE_OPTIONS + ",cache=loose,ro"
"""Read-only host directories (a Python's site-packages): cached, as the guest's root is."""


def _run(argv: list[str]) -> None:
    pid = os.posix_spawn(argv[0], argv, {"PATH": PATH})
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OSError(f"guest set-up step {argv} exited with {code}")


def prepare(config: dict[str, Any]) -> None:
    """Mount ``config["mounts"]`` and ``config["read_only_mounts"]`` ((tag, path) pairs),
    then run each ``config["setup"]`` argv."""
    mounts = [(tag, path, SHARE_OPTIONS) for tag, path in config.get("mounts", [])]
    mounts += [(tag, path, READ_ONLY_OPTIONS) for tag, path in config.get("read_only_mounts", [])]
    if mounts:
        _run([BUSYBOX, "mount", "-o", "remount,rw", "/"])
        for tag, path, options in mounts:
            _run([BUSYBOX, "mkdir", "-p", str(path)])
            _run([BUSYBOX, "mount", "-t", "9p", "-o", options, str(tag), str(path)])
        _run([BUSYBOX, "mount", "-o", "remount,ro", "/"])
    for argv in config.get("setup", []):
        _run([str(arg) for arg in argv])
