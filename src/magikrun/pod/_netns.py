"""Network namespaces kept alive by a bind mount, as ``ip netns add`` does.

A pod's namespace is a file under the magikrun run dir with ``/proc/self/ns/net`` of a fresh
namespace bind-mounted on it, so it outlives any process and the infra container joins it by
path. It is made in-process: ``unshare(CLONE_NEWNET)`` moves only the calling thread, which
then binds the new namespace and returns to its old one with ``setns`` before any other code
runs, so no helper process or thread is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import PodNetworkError

__all__ = ["create_netns", "delete_netns", "is_netns"]

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
NSFS_MAGIC = 0x6E736673

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_lock = threading.Lock()


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def _oserror(call: str, path: Path) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}", str(path))


def is_netns(path: Path) -> bool:
    """True when ``path`` is a live network namespace mount (nsfs), not a leftover file."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return bool(buf.f_type == NSFS_MAGIC)


def create_netns(path: Path) -> Path:
    """Create a network namespace and bind it at ``path`` (a new file; its parent must exist).

    Raises ``PodNetworkError`` (nothing left behind) when the namespace cannot be made.
    """
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444
        )
    except FileExistsError as exc:
        raise PodNetworkError(
            f"network namespace {path} already exists",
            hint="delete the pod that owns it first",
            path=path,
        ) from exc
    os.close(fd)
    try:
        _bind_new_netns(path)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise PodNetworkError(
            f"cannot create network namespace {path}: {exc.strerror}",
            hint="network namespaces need root (CAP_SYS_ADMIN)",
            path=path,
        ) from exc
    return path


@contextlib.contextmanager
def _returning(path: Path) -> Iterator[None]:
    """Run the block in whatever namespace it enters, then return to this thread's own."""
    with _lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield
        finally:
            try:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    # The thread is stranded in the pod's namespace: nothing sane can go on.
                    raise SystemExit(f"magikrun: cannot return to the host network from {path}")
            finally:
                os.close(own)


def _bind_new_netns(path: Path) -> None:
    with _returning(path):
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise _oserror("unshare", path)
        if _libc.mount(b"/proc/thread-self/ns/net", os.fsencode(path), None, MS_BIND, None) != 0:
            raise _oserror("mount", path)


def delete_netns(path: Path) -> None:
    """Unmount and remove a namespace made by :func:`create_netns`; a missing one is fine."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            raise PodNetworkError(
                f"cannot unmount network namespace {path}: {os.strerror(code)}", path=path
            )
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PodNetworkError(
            f"cannot remove network namespace file {path}: {exc.strerror}", path=path
        ) from exc
