"""A pod's volumes on the host, and the bind mounts that put them into its containers.

Everything a pod owns lives under its own directory (``run/pods/<id>``), so undoing
it is one :func:`remove_pod_dir`: unmount whatever is mounted beneath (tmpfs volumes),
deepest first, then delete the tree. Files are written relative to directory fds
without following links, and a ``subPath`` is walked component by component,
refusing symbolic links, so a container cannot redirect a mount onto the host.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidPodSpec, PodError
from ..image import Mount
from ._spec import (
    ConfigMapVolume,
    Container,
    EmptyDirVolume,
    HostPathType,
    HostPathVolume,
    PodSpec,
    ProjectedFile,
    SecretVolume,
)

__all__ = ["container_mounts", "prepare_volumes", "remove_pod_dir", "unmount_under"]

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2
_MS_NOSUID = 2
_MS_NODEV = 4
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def prepare_volumes(spec: PodSpec, pod_dir: Path) -> dict[str, Path]:
    """Make every volume of ``spec``; the host directory (or file) of each by name."""
    base = pod_dir / "volumes"
    base.mkdir(mode=0o711, parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for volume in spec.volumes:
        source = volume.source
        target = base / volume.name
        if isinstance(source, HostPathVolume):
            result[volume.name] = _host_path(volume.name, source)
            continue
        target.mkdir(mode=0o755)
        if isinstance(source, EmptyDirVolume):
            os.chmod(target, 0o777)  # noqa: S103 - any runAsUser of the pod may write, as kubelet
            if source.medium == "Memory":
                size = f",size={source.size_limit_bytes}" if source.size_limit_bytes else ""
                _mount_tmpfs(target, f"mode=0777{size}")
        elif isinstance(source, SecretVolume):
            _mount_tmpfs(target, "mode=0755")
            _write_files(target, source.files)
        elif isinstance(source, ConfigMapVolume):
            _write_files(target, source.files)
        result[volume.name] = target
    return result


def container_mounts(
    container: Container, spec: PodSpec, volumes: Mapping[str, Path]
) -> list[Mount]:
    """The bind mounts of ``container``'s volumeMounts (``readOnly`` and ``subPath`` honoured)."""
    mounts = []
    for mount in container.volume_mounts:
        source = volumes[mount.name]
        if mount.sub_path:
            source = _sub_path(source, mount.sub_path, f"{container.name}.volumeMounts")
        read_only = mount.read_only or isinstance(
            spec.volume(mount.name).source, ConfigMapVolume | SecretVolume
        )
        mounts.append(
            Mount(
                destination=mount.mount_path,
                source=str(source),
                options=("rbind", "ro" if read_only else "rw", "nosuid", "nodev"),
            )
        )
    return mounts


def _host_path(name: str, volume: HostPathVolume) -> Path:
    path = Path(volume.path)
    kind = volume.type
    if kind is HostPathType.DIRECTORY_OR_CREATE:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    elif kind is HostPathType.FILE_OR_CREATE:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    wanted = {
        HostPathType.DIRECTORY: stat.S_ISDIR,
        HostPathType.DIRECTORY_OR_CREATE: stat.S_ISDIR,
        HostPathType.FILE: stat.S_ISREG,
        HostPathType.FILE_OR_CREATE: stat.S_ISREG,
        HostPathType.SOCKET: stat.S_ISSOCK,
        HostPathType.CHAR_DEVICE: stat.S_ISCHR,
        HostPathType.BLOCK_DEVICE: stat.S_ISBLK,
    }.get(kind)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InvalidPodSpec(
            f"hostPath volume {name!r}: {path}: {exc.strerror}",
            hint="create the host path first, or set type: DirectoryOrCreate",
            field=f"spec.volumes[{name}].hostPath.path",
        ) from exc
    if wanted is not None and not wanted(mode):
        raise InvalidPodSpec(
            f"hostPath volume {name!r}: {path} is not of type {kind.value}",
            hint="point it at the right kind of file or fix the type",
            field=f"spec.volumes[{name}].hostPath.type",
        )
    return path


def _mount_tmpfs(target: Path, options: str) -> None:
    flags = _MS_NOSUID | _MS_NODEV
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", flags, options.encode()) != 0:
        code = ctypes.get_errno()
        raise PodError(
            f"cannot mount a tmpfs on {target}: {os.strerror(code)}",
            hint="memory-backed volumes and secrets need root (CAP_SYS_ADMIN)",
            path=str(target),
        )


def _write_files(directory: Path, files: tuple[ProjectedFile, ...]) -> None:
    """Write projected files below ``directory`` without following any link."""
    root_fd = os.open(directory, _DIR_FLAGS)
    try:
        for item in files:
            *parents, name = item.path.split("/")
            fd = _walk(root_fd, parents, create=True, what=item.path)
            try:
                out = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    item.mode,
                    dir_fd=fd,
                )
                with open(out, "wb") as file:
                    file.write(item.data)
                    os.fchmod(file.fileno(), item.mode)
            finally:
                if fd != root_fd:
                    os.close(fd)
    finally:
        os.close(root_fd)


def _walk(root_fd: int, parts: list[str], *, create: bool, what: str) -> int:
    """Open ``parts`` below ``root_fd`` as directories, refusing links; a new fd (or root_fd)."""
    fd = root_fd
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidPodSpec(f"path {what!r} has a {part!r} component", field="path")
        if create:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
        try:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if fd != root_fd:
                os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise InvalidPodSpec(
                    f"path {what!r} goes through a symbolic link or a file",
                    hint="a volume path must be a plain directory path inside the volume",
                    field="subPath",
                ) from exc
            raise
        if fd != root_fd:
            os.close(fd)
        fd = next_fd
    return fd


def _sub_path(volume: Path, sub_path: str, where: str) -> Path:
    """``volume/sub_path`` once no component of it is a link (missing ones are made dirs)."""
    if not volume.is_dir():
        raise InvalidPodSpec(
            f"{where}: subPath {sub_path!r} needs a directory volume", field="subPath"
        )
    parts = sub_path.strip("/").split("/")
    root_fd = os.open(volume, _DIR_FLAGS)
    try:
        *parents, last = parts
        fd = _walk(root_fd, parents, create=True, what=sub_path)
        try:
            try:
                mode = os.stat(last, dir_fd=fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                os.mkdir(last, 0o755, dir_fd=fd)
                mode = stat.S_IFDIR
            if stat.S_ISLNK(mode):
                raise InvalidPodSpec(
                    f"{where}: subPath {sub_path!r} is a symbolic link",
                    hint="a subPath must name a file or directory inside the volume",
                    field="subPath",
                )
        finally:
            if fd != root_fd:
                os.close(fd)
    finally:
        os.close(root_fd)
    return volume.joinpath(*parts)


def unmount_under(path: Path) -> None:
    """Unmount every mount at or below ``path``, deepest first (lazily if busy)."""
    prefix = os.fsencode(path)
    targets = []
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            point = _unescape(line.split(b" ")[4])
            if point == prefix or point.startswith(prefix + b"/"):
                targets.append(point)
    for point in sorted(targets, key=len, reverse=True):
        if _libc.umount2(point, _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):
                raise PodError(
                    f"cannot unmount {os.fsdecode(point)}: {os.strerror(code)}",
                    hint="stop what uses it, then delete the pod again",
                    path=os.fsdecode(point),
                )


def remove_pod_dir(path: Path) -> None:
    """Undo a pod directory: unmount its volumes, then delete it. Idempotent."""
    if not os.path.lexists(path):
        return
    unmount_under(path)
    shutil.rmtree(path)


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    out = bytearray()
    index = 0
    while index < len(field):
        if field[index : index + 1] == b"\\" and field[index + 1 : index + 4].isdigit():
            out.append(int(field[index + 1 : index + 4], 8))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return bytes(out)
