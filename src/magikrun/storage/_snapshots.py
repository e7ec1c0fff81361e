"""Unpacked layers (snapshots) and the root filesystems stacked from them.

containerd's vocabulary: a snapshot is one layer unpacked into its own directory, with
whiteouts in overlayfs' format; a container's root filesystem is an overlay mount of its
image's snapshots with a private upper dir, or a copy where overlayfs is unavailable.
Storage never parses tar: ``magikrun.image.unpack_layer`` fills snapshots through
``SnapshotStore.extract``.

On disk::

    snapshots/sha256/<hex>/        one committed snapshot per diff_id
    snapshots/tmp/<hex>.<random>/  an extraction in progress, renamed into place on success
    snapshots/locks/<hex>          fcntl lock: one extraction per diff_id, across processes
    run/rootfs/<key>/state.json    written before anything is mounted, so a crash is found
    run/rootfs/<key>/{upper,work,merged}/
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._threads import finish_in_thread
from ..errors import (
    ImageTooLarge,
    InvalidArgument,
    NotSupported,
    RootfsExists,
    SnapshotInUse,
    SnapshotNotFound,
    StorageError,
)
from ..platform import MAX_LAYERS, Paths
from ._blobs import validate_digest

__all__ = ["Rootfs", "SnapshotStore"]

_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HEX = re.compile(r"[a-f0-9]{64}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_MS_RDONLY = 1
_STATE = "state.json"

RootfsKind = Literal["overlay", "copy"]
Method = Literal["auto", "overlay", "copy"]


@contextlib.asynccontextmanager
async def _flock(path: Path) -> AsyncIterator[None]:
    """An exclusive lock shared by tasks, threads and processes: each holder opens its own
    file description, and ``flock`` excludes across descriptions. Polled, so waiting never
    ties up an executor thread."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount_overlay(
    target: Path, lowers: Sequence[Path], upper: Path, work: Path, readonly: bool
) -> None:
    """Mount overlayfs naming each directory as ``/proc/self/fd/N``: the option string
    must fit in one page, and 128 long snapshot paths would not."""
    fds: list[int] = []
    try:
        for path in (*lowers, upper, work):
            fds.append(os.open(path, _DIR_FLAGS))
        *lower_fds, upper_fd, work_fd = fds
        data = (
            "lowerdir="
            + ":".join(f"/proc/self/fd/{fd}" for fd in lower_fds)
            + f",upperdir=/proc/self/fd/{upper_fd},workdir=/proc/self/fd/{work_fd}"
        )
        if len(data) >= os.sysconf("SC_PAGE_SIZE"):
            raise ImageTooLarge(
                f"{len(lowers)} layers do not fit in one overlay mount", limit=MAX_LAYERS
            )
        _check(
            _libc().mount(
                b"overlay",
                os.fsencode(target),
                b"overlay",
                ctypes.c_ulong(_MS_RDONLY if readonly else 0),
                data.encode(),
            ),
            f"mount overlay on {target}",
        )
    finally:
        for fd in fds:
            os.close(fd)


def _umount(target: Path) -> None:
    """Unmount ``target`` if something is mounted there."""
    if _libc().umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise StorageError(
                f"cannot unmount {target}: {os.strerror(err)}",
                hint="stop the processes using the root filesystem, then remove it again",
                path=str(target),
            )


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` (the link itself, never its target) if it is there."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _is_opaque(fd: int) -> bool:
    """Whether a snapshot directory is opaque: ``trusted.overlay.opaque`` as root makes
    it, ``user.overlay.opaque`` as an unprivileged extraction does."""
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, name) == b"y":
                return True
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return False


def _copy_meta(st: os.stat_result, name: str | int, dir_fd: int | None, owner: bool) -> None:
    nofollow = dir_fd is not None
    if owner:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=not nofollow)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd, follow_symlinks=not nofollow)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=not nofollow)


def _apply_snapshot(src: int, dst: int, owner: bool) -> None:
    """Copy one overlay-format snapshot onto a tree the way overlayfs would show it:
    whiteout devices delete, opaque directories replace, files replace, dirs merge."""
    with os.scandir(src) as entries:
        for entry in entries:
            name = entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _apply_dir(src, dst, name, st, owner)
                continue
            _remove_at(dst, name)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue
            if stat.S_ISREG(st.st_mode):
                _copy_file(src, dst, name, st, owner)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
                _copy_meta(st, name, dst, owner)
            else:
                os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dst)
                _copy_meta(st, name, dst, owner)


def _apply_dir(src: int, dst: int, name: str, st: os.stat_result, owner: bool) -> None:
    sfd = os.open(name, _DIR_FLAGS, dir_fd=src)
    try:
        try:
            dfd = os.open(name, _DIR_FLAGS, dir_fd=dst)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise
            _remove_at(dst, name)
            os.mkdir(name, 0o700, dir_fd=dst)
            dfd = os.open(name, _DIR_FLAGS, dir_fd=dst)
        else:
            if _is_opaque(sfd):
                _clear(dfd)
        try:
            _apply_snapshot(sfd, dfd, owner)
            _copy_meta(st, dfd, None, owner)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_file(src: int, dst: int, name: str, st: os.stat_result, owner: bool) -> None:
    sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
    try:
        dfd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dst,
        )
        try:
            offset = 0
            while offset < st.st_size:
                sent = os.sendfile(dfd, sfd, offset, st.st_size - offset)
                if sent == 0:
                    break
                offset += sent
            _copy_meta(st, dfd, None, owner)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _clear(dir_fd: int) -> None:
    for name in os.listdir(dir_fd):
        _remove_at(dir_fd, name)


@dataclass(frozen=True, slots=True)
class Rootfs:
    """A container's root filesystem, prepared by ``SnapshotStore.prepare_rootfs``."""

    key: str
    path: Path
    """The directory to hand to the runtime (``root.path``)."""
    kind: RootfsKind
    """``overlay`` (shared lower snapshots) or ``copy`` (the fallback)."""
    diff_ids: tuple[str, ...]
    """The layers, bottom to top."""
    readonly: bool

    async def remove(self) -> None:
        """Unmount and delete the private upper dir (or the copy). Idempotent."""
        await finish_in_thread(_remove_rootfs, self.path.parent)


def _remove_rootfs(base: Path) -> None:
    merged = base / "merged"
    if not os.path.lexists(base):
        return
    _umount(merged)
    if os.path.lexists(merged) and os.lstat(merged).st_dev != os.lstat(base).st_dev:
        raise StorageError(
            f"{merged} is still mounted after unmounting it",
            hint="stop the processes using the root filesystem, then remove it again",
            path=str(merged),
        )
    shutil.rmtree(base)


def _validate_key(key: str) -> str:
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise InvalidArgument(
            f"invalid root filesystem key {str(key)[:140]!r}",
            hint="use 1-128 characters from letters, digits, '_', '.' and '-', "
            "not starting with '.' or '-'",
            key=str(key)[:140],
        )
    return key


class SnapshotStore:
    """Unpacked layers keyed by diff_id, and root filesystems stacked from them.

    Example::

        store = SnapshotStore(paths)
        await unpack_layer(store, layer, opener, budget=budget)   # magikrun.image
        rootfs = await store.prepare_rootfs("ctr1", image_diff_ids)
        ...
        await rootfs.remove()
    """

    def __init__(self, paths: Paths) -> None:
        self._paths = paths
        self._committed = paths.snapshots / "sha256"
        self._tmp = paths.snapshots / "tmp"
        self._locks = paths.snapshots / "locks"
        self._rootfs = paths.run / "rootfs"
        for directory in (self._committed, self._tmp, self._locks, self._rootfs):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- snapshots -----------------------------------------------------------------------

    def location(self, diff_id: str) -> Path:
        """Where the snapshot of ``diff_id`` is, or will be once unpacked."""
        return self._committed / validate_digest(diff_id).removeprefix("sha256:")

    def has(self, diff_id: str) -> bool:
        return stat.S_ISDIR(_lstat_mode(self.location(diff_id)))

    def path(self, diff_id: str) -> Path:
        """The snapshot directory of ``diff_id``; SnapshotNotFound if it is not unpacked."""
        path = self.location(diff_id)
        if not stat.S_ISDIR(_lstat_mode(path)):
            raise SnapshotNotFound(f"layer {diff_id} is not unpacked", diff_id=diff_id)
        return path

    def list(self) -> builtins.list[str]:
        return sorted(
            "sha256:" + name for name in os.listdir(self._committed) if _HEX.fullmatch(name)
        )

    async def extract(self, diff_id: str, fill: Callable[[int], object]) -> Path:
        """Create the snapshot of ``diff_id`` with ``fill(dir_fd)`` unless it exists.

        ``fill`` runs in a thread on a fresh directory, which becomes the snapshot only
        when it returns; if it raises, the directory is deleted and the error propagates.
        Concurrent calls for one diff_id, in any task, thread or process, fill it once.
        """
        final = self.location(diff_id)
        hexd = final.name
        async with _flock(self._locks / hexd):
            if self.has(diff_id):
                return final
            await finish_in_thread(self._clear_stale, hexd)
            tmp = Path(tempfile.mkdtemp(prefix=f"{hexd}.", dir=self._tmp))
            try:
                await finish_in_thread(_fill_and_commit, tmp, final, fill)
            except BaseException as exc:
                try:
                    await finish_in_thread(_remove_tree, tmp)
                except Exception as cleanup:  # noqa: BLE001 - attached to the original error
                    exc.add_note(f"removing the partial snapshot {tmp} failed: {cleanup!r}")
                raise
        return final

    def _clear_stale(self, hexd: str) -> None:
        """Remove what a crashed extraction of this diff_id left (we hold its lock)."""
        for name in os.listdir(self._tmp):
            if name.startswith(hexd + "."):
                shutil.rmtree(self._tmp / name)

    async def remove(self, diff_id: str) -> None:
        """Delete a snapshot. Idempotent; SnapshotInUse while a root filesystem stacks it."""
        final = self.location(diff_id)
        users = [r.key for r in self.list_rootfs() if diff_id in r.diff_ids]
        if users:
            raise SnapshotInUse(
                f"layer {diff_id} is used by root filesystem(s) {', '.join(users)}",
                diff_id=diff_id,
                keys=users,
            )
        async with _flock(self._locks / final.name):
            if not self.has(diff_id):
                return
            doomed = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=self._tmp))
            os.rename(final, doomed / "snapshot")
            await finish_in_thread(shutil.rmtree, doomed)

    # -- root filesystems ----------------------------------------------------------------

    async def prepare_rootfs(
        self,
        key: str,
        diff_ids: Sequence[str],
        *,
        readonly: bool = False,
        method: Method = "auto",
    ) -> Rootfs:
        """Stack the snapshots of ``diff_ids`` (bottom to top) into a root filesystem.

        ``method="auto"`` mounts overlayfs with a private upper dir and copies the
        snapshots where overlayfs cannot be mounted (no overlay, or not privileged). The
        record is on disk before the mount, so ``rootfs(key)`` finds it after a crash. If
        preparing fails, nothing of it is left. RootfsExists if ``key`` is taken.
        """
        _validate_key(key)
        if not diff_ids:
            raise InvalidArgument("a root filesystem needs at least one layer", key=key)
        if len(diff_ids) > MAX_LAYERS:
            raise ImageTooLarge(
                f"{len(diff_ids)} layers is over the limit of {MAX_LAYERS}", limit=MAX_LAYERS
            )
        lowers = [self.path(diff_id) for diff_id in reversed(diff_ids)]
        base = self._rootfs / key
        state = {
            "key": key,
            "diff_ids": list(diff_ids),
            "readonly": readonly,
            "kind": "copy" if method == "copy" else "overlay",
        }
        await finish_in_thread(self._reserve, base, state)
        try:
            kind = await finish_in_thread(_assemble, base, lowers, readonly, method)
        except BaseException as exc:
            try:
                await finish_in_thread(_remove_rootfs, base)
            except Exception as cleanup:  # noqa: BLE001 - attached to the original error
                exc.add_note(f"removing the partial root filesystem {base} failed: {cleanup!r}")
            raise
        return Rootfs(key, base / "merged", kind, tuple(diff_ids), readonly)

    def _reserve(self, base: Path, state: dict[str, Any]) -> None:
        """Create ``base`` with its record in one rename, so a key dir always has one."""
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self._rootfs))
        _write_state(tmp, state)
        try:
            os.rename(tmp, base)
        except OSError as exc:
            shutil.rmtree(tmp)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise RootfsExists(
                    f"root filesystem {state['key']!r} exists", key=state["key"]
                ) from exc
            raise

    def rootfs(self, key: str) -> Rootfs | None:
        """The root filesystem recorded under ``key`` (e.g. after a crash), or None."""
        base = self._rootfs / _validate_key(key)
        try:
            state = json.loads((base / _STATE).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StorageError(
                f"the record of root filesystem {key!r} is corrupt",
                hint=f"unmount {base / 'merged'} if mounted and delete {base}",
                key=key,
            ) from exc
        return Rootfs(
            key, base / "merged", state["kind"], tuple(state["diff_ids"]), state["readonly"]
        )

    def list_rootfs(self) -> builtins.list[Rootfs]:
        names = sorted(n for n in os.listdir(self._rootfs) if _KEY.fullmatch(n))
        return [rootfs for rootfs in map(self.rootfs, names) if rootfs is not None]


def _write_state(base: Path, state: dict[str, Any]) -> None:
    """Replace the record atomically: a crash leaves the old one or the new one."""
    tmp = base / f".{_STATE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, base / _STATE)


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def _fill_and_commit(tmp: Path, final: Path, fill: Callable[[int], object]) -> None:
    fd = os.open(tmp, _DIR_FLAGS)
    try:
        fill(fd)
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    os.rename(tmp, final)


def _remove_tree(path: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


def _assemble(base: Path, lowers: Sequence[Path], readonly: bool, method: Method) -> RootfsKind:
    """Build the root filesystem under ``base``; returns how it was built."""
    merged, upper, work = base / "merged", base / "upper", base / "work"
    merged.mkdir(mode=0o755)
    if method != "copy":
        upper.mkdir(mode=0o755)
        work.mkdir(mode=0o700)
        try:
            _mount_overlay(merged, lowers, upper, work, readonly)
            return "overlay"
        except OSError as exc:
            # Not privileged, no overlayfs, or a run dir overlayfs cannot put an upper dir
            # on (itself an overlay, say): copy instead; Rootfs.kind records it.
            if method == "overlay" or exc.errno not in (errno.EPERM, errno.ENODEV, errno.EINVAL):
                raise NotSupported(
                    f"cannot mount overlayfs: {exc.strerror}",
                    hint="run as root on a kernel with overlayfs, or use method='copy'",
                ) from exc
        upper.rmdir()
        work.rmdir()
        state = json.loads((base / _STATE).read_text())
        state["kind"] = "copy"
        _write_state(base, state)
    owner = os.geteuid() == 0
    dst = os.open(merged, _DIR_FLAGS)
    try:
        for lower in reversed(lowers):
            src = os.open(lower, _DIR_FLAGS)
            try:
                if _is_opaque(src):
                    _clear(dst)
                _apply_snapshot(src, dst, owner)
            finally:
                os.close(src)
    finally:
        os.close(dst)
    return "copy"
