"""Paths inside a root filesystem, resolved as the container will see them.

A root filesystem comes from an image or a bundle: hostile. Its symlinks must resolve
inside it (an absolute target starts at its root), and nothing may lead out of it.
``resolve_in_root`` walks the path one component at a time from a directory fd, reading
links itself with a budget of ``MAX_SYMLINK_DEPTH``; it refuses a ``..`` that climbs above
the root rather than clamping it (a path that needs it is malformed or hostile) and takes
components past the first missing one literally, so it also answers for paths not made
yet. ``open_in_root`` opens an existing file with ``openat2(RESOLVE_IN_ROOT)`` where the
kernel has it (Linux 5.6+), which leaves the whole walk to the kernel, and with that
walk and ``O_NOFOLLOW`` opens elsewhere.

Example::

    resolved = resolve_in_root(root_fd, "/srv/app")  # RootPath(parts=("data", "app"), ...)
    fd = open_in_root(root_fd, "/etc/passwd", os.O_RDONLY | os.O_CLOEXEC)
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from .errors import UnsafeRootfsPath
from .platform._limits import MAX_SYMLINK_DEPTH

__all__ = ["RootPath", "open_in_root", "open_resolved", "resolve_in_root"]

Kind = Literal["dir", "file", "other", "missing"]

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_openat2_missing = False
"""Set once the kernel answered ENOSYS: the walk serves from then on."""


@dataclass(frozen=True, slots=True)
class RootPath:
    """Where a path leads inside a root: its real components and what is there."""

    parts: tuple[str, ...]
    kind: Kind
    """``missing`` once a component does not exist (those after it are taken literally);
    ``other`` for a device, fifo or socket."""

    @property
    def path(self) -> str:
        return "/" + "/".join(self.parts)


def resolve_in_root(root_fd: int, path: str) -> RootPath:
    """Resolve ``path`` as the container will, with the directory ``root_fd`` as ``/``.

    Raises ``UnsafeRootfsPath`` when the path or a link climbs above the root, when more
    than ``MAX_SYMLINK_DEPTH`` links are followed, or when a component lies under a
    non-directory.
    """
    todo = list(reversed(PurePosixPath("/" + path).parts[1:]))
    parts: list[str] = []
    fds: list[int] = []
    links = 0
    kind: Kind = "dir"
    try:
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if kind in ("file", "other"):
                raise UnsafeRootfsPath(
                    f"{path!r}: /{'/'.join(parts)} is not a directory",
                    hint="use a path of directories",
                    path=path,
                    reason="notdir",
                )
            if part == "..":
                if not parts:
                    raise UnsafeRootfsPath(
                        f"{path!r} resolves outside the root filesystem",
                        hint="the path or a link in the root filesystem climbs above its root; "
                        "use a path inside it",
                        path=path,
                        reason="escape",
                    )
                if len(fds) == len(parts):
                    os.close(fds.pop())
                parts.pop()
                kind = "dir" if len(fds) == len(parts) else "missing"
                continue
            if kind == "missing":
                parts.append(part)
                continue
            here = fds[-1] if fds else root_fd
            try:
                st = os.stat(part, dir_fd=here, follow_symlinks=False)
            except FileNotFoundError:
                parts.append(part)
                kind = "missing"
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINK_DEPTH:
                    raise UnsafeRootfsPath(
                        f"{path!r} has too many levels of symbolic links",
                        hint=f"the root filesystem's links loop or nest over {MAX_SYMLINK_DEPTH} "
                        "deep; the image is malformed or hostile",
                        path=path,
                        reason="links",
                    )
                target = os.readlink(part, dir_fd=here)
                if target.startswith("/"):
                    while fds:
                        os.close(fds.pop())
                    parts.clear()
                todo.extend(reversed(target.split("/")))
            elif stat.S_ISDIR(st.st_mode):
                fds.append(os.open(part, _DIR_FLAGS, dir_fd=here))
                parts.append(part)
            else:
                parts.append(part)
                kind = "file" if stat.S_ISREG(st.st_mode) else "other"
    finally:
        for fd in fds:
            os.close(fd)
    return RootPath(tuple(parts), kind)


def open_resolved(root_fd: int, resolved: RootPath, flags: int) -> int:
    """Open what ``resolve_in_root`` found, following no link on the way (one swapped in
    since fails with ELOOP or ENOTDIR); FileNotFoundError when it was missing."""
    if resolved.kind == "missing":
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), resolved.path)
    if not resolved.parts:
        return os.open(".", flags, dir_fd=root_fd)
    fds: list[int] = []
    try:
        for part in resolved.parts[:-1]:
            fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1] if fds else root_fd))
        return os.open(
            resolved.parts[-1], flags | os.O_NOFOLLOW, dir_fd=fds[-1] if fds else root_fd
        )
    finally:
        for fd in fds:
            os.close(fd)


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """Open the existing ``path`` with ``flags`` as if ``root_fd`` were ``/``.

    With ``openat2`` a ``..`` above the root stays at the root, as in a chroot; the walk
    refuses it with ``UnsafeRootfsPath``. Either way nothing outside the root is opened.
    Raises ``OSError`` as the open does.
    """
    global _openat2_missing
    if not _openat2_missing:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        how = _OpenHow(flags=flags, mode=0, resolve=_RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        fd: int = libc.syscall(
            _SYS_OPENAT2, root_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _openat2_missing = True
    return open_resolved(root_fd, resolve_in_root(root_fd, path), flags)
