"""Layer extraction: the one place that reads tar archives (containerd's "Applier").

Every byte of a layer is hostile input. ``tarfile`` only parses the stream; every entry
is created with ``*at`` calls relative to a directory fd, walking each path component with
``O_NOFOLLOW | O_DIRECTORY``, so no link an archive made is ever followed, and an existing
path is replaced (unlinked, then created with ``O_EXCL``), never written through.

Two modes:

``flatten``
    layers are applied one after the other onto one tree; whiteouts delete from it.
``snapshot``
    each layer goes into its own empty directory and whiteouts are converted to overlayfs'
    format (a 0/0 character device, ``trusted.overlay.opaque=y``), as containerd's overlay
    snapshotter does. The snapshots of the layers below are consulted read-only so that an
    entry reached through a lower layer's symlink is rejected here too.

Example::

    budget = ExtractBudget()
    with open(blob_path, "rb") as blob:
        stats = apply_layer(blob, layer.media_type, root_fd, mode="flatten", budget=budget)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import queue
import shutil
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, NoReturn, cast

import zstandard

from ..errors import (
    DigestMismatch,
    ImageTooLarge,
    NotSupported,
    PathTraversal,
    SnapshotNotFound,
    StorageError,
    StorageFull,
    UnsafeLayer,
    UnsupportedMediaType,
)
from ..platform import (
    MAX_FILES_PER_LAYER,
    MAX_LAYER_SIZE,
    MAX_PATH_DEPTH,
    MAX_PATH_LEN,
    MAX_ROOTFS_SIZE,
)
from ._mediatypes import ARCHIVE_LAYERS
from ._model import Layer

if TYPE_CHECKING:
    from ..storage import SnapshotStore

__all__ = ["ExtractBudget", "LayerStats", "apply_layer", "unpack_layer", "unpack_layers"]

_CHUNK = 1 << 20
_TAR_BUFFER = 64 << 10
"""tarfile's stream buffer: it copies what is buffered on every header read, so keep it
well below _CHUNK."""
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_USER_OPAQUE_XATTR = "user.overlay.opaque"
"""What overlayfs reads instead when mounted with ``userxattr`` (rootless, in a user
namespace); unprivileged snapshots use it, as trusted.* needs CAP_SYS_ADMIN."""
_PAX_XATTR = "SCHILY.xattr."
_MAX_CACHED_DIRS = 256
_QUEUED_CHUNKS = 4
_ENTRY_OVERHEAD = 4096
"""Stream bytes allowed per entry besides its content: headers, PAX records, padding."""

Mode = Literal["snapshot", "flatten"]
_Parts = tuple[str, ...]


@dataclass(slots=True)
class ExtractBudget:
    """Size and count limits for one image's layers; share one budget across its layers.

    Thread-safe: layers of one image may be extracted in parallel.
    """

    max_rootfs_bytes: int = MAX_ROOTFS_SIZE
    """Uncompressed bytes of all layers together."""
    max_layer_bytes: int = MAX_LAYER_SIZE
    """Compressed bytes of one layer blob."""
    max_files_per_layer: int = MAX_FILES_PER_LAYER
    """Entries in one layer archive."""
    used_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def refund(self, size: int) -> None:
        """Give back what a discarded attempt at a layer charged."""
        with self._lock:
            self.used_bytes -= size

    def charge(self, size: int, entry: str) -> None:
        with self._lock:
            if self.used_bytes + size > self.max_rootfs_bytes:
                raise ImageTooLarge(
                    f"extracting {entry!r} would take the image over {self.max_rootfs_bytes} "
                    "uncompressed bytes",
                    entry=entry,
                    limit=self.max_rootfs_bytes,
                )
            self.used_bytes += size


@dataclass(frozen=True, slots=True)
class LayerStats:
    """What one applied layer was."""

    diff_id: str
    """``sha256:`` of the uncompressed tar stream, as an image config's ``rootfs.diff_ids``."""
    entries: int
    bytes: int
    """Bytes of regular-file content written."""


class _LayerStream(io.RawIOBase):
    """The uncompressed tar stream of a blob, hashed and bounded as it is read.

    The compression is sniffed from the first bytes rather than trusted from the media
    type: registries mislabel layers. Decompressing and hashing run in a thread of their
    own (zlib, zstd and sha256 release the GIL), overlapping with the tar parsing and file
    writes of the reading thread. Close it to stop that thread.
    """

    def __init__(self, blob: BinaryIO, budget: ExtractBudget) -> None:
        super().__init__()
        self._blob = blob
        self._budget = budget
        self._compressed = 0
        self._total = 0
        self._hash = hashlib.sha256()
        # Content is charged per entry; this bounds what a bomb can make us read besides.
        self._stream_limit = budget.max_rootfs_bytes + budget.max_files_per_layer * _ENTRY_OVERHEAD
        head = b""
        while len(head) < len(_ZSTD_MAGIC):
            more = self._raw(len(_ZSTD_MAGIC) - len(head))
            if not more:
                break
            head += more
        self._head = head
        self._gzip: zlib._Decompress | None = None
        self._zstd: zstandard.ZstdDecompressionReader | None = None
        if head.startswith(_GZIP_MAGIC):
            self._gzip = zlib.decompressobj(wbits=31)
        elif head.startswith(_ZSTD_MAGIC):
            self._zstd = zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, _RawView(self)), read_size=_CHUNK, read_across_frames=True
            )
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._stop = threading.Event()
        self._current = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._produce, name="magikrun-layer", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _raw(self, size: int = _CHUNK) -> bytes:
        data = self._blob.read(size)
        self._compressed += len(data)
        if self._compressed > self._budget.max_layer_bytes:
            raise ImageTooLarge(
                f"layer blob is over {self._budget.max_layer_bytes} bytes",
                limit=self._budget.max_layer_bytes,
            )
        return data

    def raw_read(self, size: int) -> bytes:
        """Compressed bytes, the sniffed head first."""
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._raw(min(size, _CHUNK))

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._next_chunk()
                self._chunks.put(data)
                if not data:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self._chunks.put(exc)

    def _next_chunk(self) -> bytes:
        if self._gzip is not None:
            data = self._read_gzip(_CHUNK)
        elif self._zstd is not None:
            try:
                data = self._zstd.read(_CHUNK)
            except zstandard.ZstdError as exc:
                raise UnsafeLayer(f"layer is not valid zstd: {exc}") from exc
        else:
            data = self.raw_read(_CHUNK)
        self._total += len(data)
        if self._total > self._stream_limit:
            raise ImageTooLarge(
                f"layer decompresses to over {self._stream_limit} bytes",
                limit=self._stream_limit,
            )
        self._hash.update(data)
        return data

    def read(self, size: int = -1, /) -> bytes:
        size = _CHUNK if size is None or size < 0 else size
        if not self._current:
            if self._eof:
                return b""
            item = self._chunks.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            self._eof = not item
            self._current = memoryview(item)
        data = bytes(self._current[:size])
        self._current = self._current[size:]
        return data

    def _read_gzip(self, size: int) -> bytes:
        while True:
            gz = self._gzip
            assert gz is not None
            if gz.eof:
                # A gzip stream may be several members back to back.
                data = gz.unused_data or self.raw_read(_CHUNK)
                if not data:
                    return b""
                gz = self._gzip = zlib.decompressobj(wbits=31)
            else:
                data = gz.unconsumed_tail or self.raw_read(_CHUNK)
                if not data:
                    raise UnsafeLayer("layer's gzip stream is truncated")
            try:
                out = gz.decompress(data, size)
            except zlib.error as exc:
                raise UnsafeLayer(f"layer is not valid gzip: {exc}") from exc
            if out:
                return out

    def drain(self) -> None:
        """Read to the end: the diff_id covers the tar's padding and anything after it."""
        while self.read(_CHUNK):
            pass

    def close(self) -> None:
        """Stop the decompressing thread and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._chunks.get_nowait()
            self._thread.join(0.01)
        super().close()

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _RawView:
    """The compressed side of a ``_LayerStream``, as a file for zstandard."""

    def __init__(self, stream: _LayerStream) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        return self._stream.raw_read(_CHUNK if size < 0 else size)


class _LowerNotReady(SnapshotNotFound):
    """A lower snapshot is needed but not there (yet: ``unpack_layers`` retries)."""


def _split(name: str, entry: str, what: str = "entry") -> _Parts:
    """Path components of an archive name, refusing anything that could leave the root."""
    if "\x00" in name:
        raise PathTraversal(f"{what} {entry!r} has a NUL byte in its path", entry=entry)
    if name.startswith("/"):
        raise PathTraversal(f"{what} {entry!r} has an absolute path {name!r}", entry=entry)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise PathTraversal(f"{what} {entry!r} has a '..' component in {name!r}", entry=entry)
    if len(parts) > MAX_PATH_DEPTH or len(os.fsencode(name)) > MAX_PATH_LEN:
        raise UnsafeLayer(
            f"{what} {entry[:200]!r} has a path over {MAX_PATH_LEN} bytes or "
            f"{MAX_PATH_DEPTH} components",
            entry=entry,
            limit=MAX_PATH_DEPTH,
        )
    return parts


def _show(parts: _Parts) -> str:
    return "/".join(parts) or "."


class _Tree:
    """One layer being applied under ``root`` (a directory fd the caller owns)."""

    def __init__(
        self, root: int, mode: Mode, lowers: Sequence[int | Path], privileged: bool
    ) -> None:
        self.root = root
        self.mode = mode
        self.lower_sources = lowers
        self.lower_fds: list[int] | None = None
        self.privileged = privileged
        self.mode_mask = 0o7777 if privileged else 0o1777
        # Which opaque marker works depends on what we are, not on what we keep.
        self.is_root = os.geteuid() == 0
        self.dirs: dict[_Parts, int] = {}
        self.dir_meta: dict[_Parts, tuple[int, int]] = {}
        self.created: set[_Parts] = set()
        self.holds_created: set[_Parts] = set()
        self.symlinks: set[_Parts] = set()

    def _trim_cache(self) -> None:
        """Bound the open directory fds; only between entries, when none is in use."""
        if len(self.dirs) > _MAX_CACHED_DIRS:
            self.close()

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()

    def release(self) -> None:
        self.close()
        for fd in self.lower_fds or ():
            os.close(fd)
        self.lower_fds = None

    def _lowers(self) -> list[int]:
        """The lower snapshots' fds, opened on first need: most layers list every parent
        directory and never need them."""
        if self.lower_fds is None:
            self.lower_fds = []
            for lower in self.lower_sources:
                if isinstance(lower, int):
                    self.lower_fds.append(os.dup(lower))
                    continue
                try:
                    self.lower_fds.append(os.open(lower, _DIR_FLAGS))
                except FileNotFoundError as exc:
                    raise _LowerNotReady(
                        f"lower snapshot {lower} does not exist", path=str(lower)
                    ) from exc
        return self.lower_fds

    # -- walking -------------------------------------------------------------------------

    def dir_fd(self, parts: _Parts, entry: str, *, create: bool) -> int | None:
        """The fd of directory ``parts``; missing parents are made when ``create``."""
        if not parts:
            return self.root
        cached = self.dirs.get(parts)
        if cached is not None:
            return cached
        parent = self.dir_fd(parts[:-1], entry, create=create)
        if parent is None:
            return None
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
            if self.mode == "snapshot":
                self._check_lowers(parts, entry)
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            self._refuse_parent(parent, parts, entry)
        self.dirs[parts] = fd
        return fd

    def _refuse_parent(self, parent: int, parts: _Parts, entry: str) -> NoReturn:
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise PathTraversal(
                f"entry {entry!r} is reached through the symlink {_show(parts)!r}", entry=entry
            )
        raise UnsafeLayer(
            f"entry {entry!r} is under {_show(parts)!r}, which is not a directory", entry=entry
        )

    def _check_lowers(self, parts: _Parts, entry: str) -> None:
        """Refuse to create a directory where the layers below show a symlink."""
        for lower in self._lowers():
            found = _lower_lookup(lower, parts)
            if found is None:
                continue
            if stat.S_ISLNK(found):
                raise PathTraversal(
                    f"entry {entry!r} is reached through the symlink {_show(parts)!r} "
                    "of a lower layer",
                    entry=entry,
                )
            return

    def forget(self, parts: _Parts) -> None:
        """Drop cached fds and pending metadata of a removed directory and its children."""
        n = len(parts)
        for key in [k for k in self.dirs if k[:n] == parts]:
            os.close(self.dirs.pop(key))
        for key in [k for k in self.dir_meta if k[:n] == parts]:
            del self.dir_meta[key]

    def remove(self, parent: int, parts: _Parts) -> None:
        """Remove ``parts`` if it is there: the link itself, never its target."""
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget(parts)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)

    def make(self, parent: int, parts: _Parts, create: Callable[[], int | None]) -> int | None:
        """Run ``create``; if the name is taken, replace what is there and run it again."""
        try:
            return create()
        except FileExistsError:
            self.remove(parent, parts)
            return create()

    # -- entries -------------------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile, budget: ExtractBudget) -> int:
        """Create one entry; returns the regular-file bytes written."""
        self._trim_cache()
        entry = member.name
        parts = _split(entry, entry)
        if not parts:
            if member.isdir():
                return 0
            raise UnsafeLayer(f"entry {entry!r} names the root but is not a directory", entry=entry)
        base = parts[-1]
        if base.startswith(_WHITEOUT):
            self._whiteout(parts, entry)
            return 0
        if parts in self.symlinks:
            raise PathTraversal(
                f"entry {entry!r} replaces a symlink made earlier in the same layer", entry=entry
            )
        parent = self.dir_fd(parts[:-1], entry, create=True)
        assert parent is not None
        written = 0
        if member.isreg():
            budget.charge(member.size, entry)
            self._file(parent, parts, member, tar)
            written = member.size
        elif member.isdir():
            self._dir(parent, parts, member)
        elif member.issym():
            self._symlink(parent, parts, member)
        elif member.islnk():
            self._hardlink(parent, parts, member)
        elif member.ischr() or member.isblk() or member.isfifo():
            self._node(parent, parts, member)
        else:
            raise UnsafeLayer(
                f"entry {entry!r} has unsupported tar type {member.type!r}", entry=entry
            )
        self.created.add(parts)
        self.holds_created.update(parts[:i] for i in range(len(parts)))
        return written

    def _file(
        self, parent: int, parts: _Parts, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        name = parts[-1]
        mode = member.mode & self.mode_mask
        fd = self.make(
            parent, parts, lambda: os.open(name, _FILE_FLAGS, mode & 0o777, dir_fd=parent)
        )
        assert fd is not None
        try:
            if member.size:
                src = tar.extractfile(member)
                assert src is not None
                remaining = member.size
                while remaining > 0:
                    chunk = src.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise UnsafeLayer(f"entry {member.name!r} is truncated", entry=member.name)
                    remaining -= len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            # Owner and mode usually come out right at creation (root:root, no umask
            # bits): a cheap fstat spares two journalled inode updates per file.
            st = os.fstat(fd)
            if self.privileged:
                if (st.st_uid, st.st_gid) != (member.uid, member.gid):
                    os.fchown(fd, member.uid, member.gid)
                _set_xattrs(fd, member)
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
            os.utime(fd, ns=_times(member))
        finally:
            os.close(fd)

    def _dir(self, parent: int, parts: _Parts, member: tarfile.TarInfo) -> None:
        name = parts[-1]
        opaque = False
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                # Replace the file or link; if it is this layer's whiteout, the new directory
                # must also hide the lower one's contents: overlay calls that opaque.
                opaque = self.mode == "snapshot" and _is_whiteout(st)
                os.unlink(name, dir_fd=parent)
                os.mkdir(name, 0o700, dir_fd=parent)
        fd = self.dir_fd(parts, member.name, create=False)
        assert fd is not None
        if opaque:
            self._mark_opaque(fd)
        if self.privileged:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (member.uid, member.gid):
                os.fchown(fd, member.uid, member.gid)
            _set_xattrs(fd, member)
        # Mode and times go on at the end: children would change the mtime, and a
        # read-only mode would stop an unprivileged extraction from filling it.
        self.dir_meta[parts] = (member.mode & self.mode_mask, _times(member)[0])

    def _symlink(self, parent: int, parts: _Parts, member: tarfile.TarInfo) -> None:
        if "\x00" in member.linkname:
            raise PathTraversal(
                f"symlink {member.name!r} has a NUL byte in its target", entry=member.name
            )
        name = parts[-1]
        self.make(parent, parts, lambda: os.symlink(member.linkname, name, dir_fd=parent))
        self.symlinks.add(parts)
        if self.privileged:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if (st.st_uid, st.st_gid) != (member.uid, member.gid):
                os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        os.utime(name, ns=_times(member), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, parent: int, parts: _Parts, member: tarfile.TarInfo) -> None:
        entry = member.name
        target = _split(member.linkname, entry, "hardlink")

        def refuse(why: str) -> UnsafeLayer:
            return UnsafeLayer(
                f"hardlink {entry!r} points at {member.linkname!r}, which {why}", entry=entry
            )

        if not target or target == parts:
            raise refuse("is not a file")
        missing = "does not exist" + (" in this layer" if self.mode == "snapshot" else "")
        src_dir = self.dir_fd(target[:-1], entry, create=False)
        if src_dir is None:
            raise refuse(missing)
        name = parts[-1]
        try:
            self.make(
                parent,
                parts,
                lambda: os.link(
                    target[-1], name, src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False
                ),
            )
        except FileNotFoundError as exc:
            raise refuse(missing) from exc
        except PermissionError as exc:
            raise refuse("is a directory") from exc

    def _node(self, parent: int, parts: _Parts, member: tarfile.TarInfo) -> None:
        entry = member.name
        name = parts[-1]
        if member.isfifo():
            kind, device = stat.S_IFIFO, 0
        elif not self.privileged:
            raise UnsafeLayer(
                f"entry {entry!r} is a device node, which only root may create",
                hint="extract as root, or use an image without device nodes",
                entry=entry,
            )
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
        self.make(parent, parts, lambda: os.mknod(name, kind | 0o600, device, dir_fd=parent))
        if self.privileged:
            os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(name, member.mode & self.mode_mask, dir_fd=parent, follow_symlinks=False)
        os.utime(name, ns=_times(member), dir_fd=parent, follow_symlinks=False)

    # -- whiteouts -----------------------------------------------------------------------

    def _whiteout(self, parts: _Parts, entry: str) -> None:
        base = parts[-1]
        if base == _OPAQUE:
            self._opaque(parts[:-1], entry)
            return
        if base.startswith(_WHITEOUT + _WHITEOUT):
            return  # aufs metadata (.wh..wh.plnk and the like), meaningless to overlay
        victim = (*parts[:-1], base[len(_WHITEOUT) :])
        if victim[-1] in ("", ".", ".."):
            raise PathTraversal(f"whiteout {entry!r} names no file", entry=entry)
        if victim in self.created or victim in self.holds_created:
            return  # a whiteout hides only the layers below, never its own layer's entries
        if self.mode == "flatten":
            parent = self.dir_fd(victim[:-1], entry, create=False)
            if parent is not None:
                self.remove(parent, victim)
            return
        parent = self.dir_fd(victim[:-1], entry, create=True)
        assert parent is not None
        try:
            # Whatever is there was made by this layer for other whiteouts: replace it.
            self.make(parent, victim, lambda: os.mknod(victim[-1], stat.S_IFCHR, 0, dir_fd=parent))
        except PermissionError as exc:
            raise NotSupported(
                f"whiteout {entry!r} needs root in snapshot mode on this kernel (before "
                "Linux 5.8 only root may create overlay whiteout devices)",
                hint="extract as root, or apply the layers in flatten mode",
                entry=entry,
            ) from exc

    def _opaque(self, parts: _Parts, entry: str) -> None:
        fd = self.dir_fd(parts, entry, create=True)
        assert fd is not None
        if self.mode == "snapshot":
            self._mark_opaque(fd)
        else:
            self._clear_lower(fd, parts)

    def _mark_opaque(self, fd: int) -> None:
        os.setxattr(fd, _OPAQUE_XATTR if self.is_root else _USER_OPAQUE_XATTR, b"y")

    def _clear_lower(self, fd: int, parts: _Parts) -> None:
        """Empty a directory of everything this layer did not put there."""
        for name in os.listdir(fd):
            child = (*parts, name)
            if child in self.created or child in self.holds_created:
                # This layer's directory hides the lower one's contents, not its own.
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    sub = self.dir_fd(child, _show(child), create=False)
                    assert sub is not None
                    self._clear_lower(sub, child)
            else:
                self.remove(fd, child)

    def finish(self) -> None:
        """Set directory modes and times, children first."""
        for parts, (mode, mtime) in reversed(self.dir_meta.items()):
            self._trim_cache()
            fd = self.dir_fd(parts, _show(parts), create=False)
            assert fd is not None
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))


def _set_xattrs(fd: int, member: tarfile.TarInfo) -> None:
    """Apply the entry's PAX xattrs in the namespaces an image may set: file capabilities
    and ``user.*``. Never overlayfs' own markers (``trusted.*``, ``user.overlay.*``): an
    archive must not forge them. Nor LSM labels: the runtime assigns those."""
    for key, value in member.pax_headers.items():
        if not key.startswith(_PAX_XATTR):
            continue
        name = key[len(_PAX_XATTR) :]
        if name == "security.capability" or (
            name.startswith("user.") and not name.startswith("user.overlay.")
        ):
            os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    ns = int(member.mtime * 1e9)
    return ns, ns


def _lower_lookup(lower: int, parts: _Parts) -> int | None:
    """``st_mode`` of ``parts`` in one lower snapshot; None if absent or whited out."""
    fd = lower
    opened: list[int] = []
    try:
        for name in parts[:-1]:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return None
            opened.append(fd)
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return None if _is_whiteout(st) else st.st_mode
    finally:
        for opened_fd in opened:
            os.close(opened_fd)


def _os_error(exc: OSError, entry: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"disk full while extracting {entry!r}", entry=entry)
    if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EOVERFLOW, errno.EMLINK):
        return UnsafeLayer(f"cannot create entry {entry!r}: {exc.strerror}", entry=entry)
    return StorageError(
        f"cannot create entry {entry!r}: {exc.strerror}",
        hint="check the disk and the permissions of the magikrun root",
        entry=entry,
    )


def apply_layer(
    blob: BinaryIO,
    media_type: str,
    target_fd: int,
    *,
    mode: Mode,
    lowers: Sequence[int | Path] = (),
    privileged: bool | None = None,
    budget: ExtractBudget,
) -> LayerStats:
    """Apply one layer archive onto the directory ``target_fd``.

    Parameters:

    * **blob** - the layer blob as stored (gzip, zstd or plain tar), read to its end.
    * **media_type** - the descriptor's media type; the compression is sniffed regardless.
    * **target_fd** - the directory to extract into; the caller keeps ownership.
    * **mode** - ``"snapshot"`` (empty dir, overlay-format whiteouts) or ``"flatten"``.
    * **lowers** - snapshot mode: the layers below, top first, consulted read-only.
    * **privileged** - keep owners, setuid/setgid bits and device nodes; default: running
      as root.
    * **budget** - the limits, shared across one image's layers.

    On error the target holds part of the layer: discard it (``SnapshotStore.extract``
    does). Raises ``PathTraversal``, ``UnsafeLayer``, ``ImageTooLarge`` naming the entry.
    """
    if media_type not in ARCHIVE_LAYERS:
        raise UnsupportedMediaType(
            f"layer media type {media_type!r} is not a tar archive",
            hint="only OCI/Docker tar layers (plain, gzip, zstd) can be extracted",
            media_type=media_type,
        )
    is_privileged = os.geteuid() == 0 if privileged is None else privileged
    tree = _Tree(target_fd, mode, lowers, is_privileged)
    stream: _LayerStream | None = None
    entries = written = 0
    entry = ""
    try:
        stream = _LayerStream(blob, budget)
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFFER) as tar:
            for member in tar:
                entry = member.name
                entries += 1
                if entries > budget.max_files_per_layer:
                    raise ImageTooLarge(
                        f"layer has more than {budget.max_files_per_layer} entries (at {entry!r})",
                        entry=entry,
                        limit=budget.max_files_per_layer,
                    )
                written += tree.add(member, tar, budget)
        entry = ""
        stream.drain()
        tree.finish()
        return LayerStats(diff_id=stream.diff_id, entries=entries, bytes=written)
    except _LowerNotReady:
        budget.refund(written)
        raise
    except tarfile.TarError as exc:
        raise UnsafeLayer(f"layer is not a valid tar archive: {exc}") from exc
    except (OverflowError, ValueError) as exc:
        raise UnsafeLayer(f"entry {entry!r} has an invalid field: {exc}", entry=entry) from exc
    except OSError as exc:
        raise _os_error(exc, entry) from exc
    finally:
        if stream is not None:
            stream.close()
        tree.release()


@dataclass(frozen=True, slots=True)
class LayerFile:
    """The topmost entry at a path in an image's layers, as ``open_layer_file`` found it."""

    layer: Layer
    file: BinaryIO | None
    """The entry's content, readable while ``open_layer_file`` is open; None when the
    entry is not a regular file (a link, directory or device)."""


@contextlib.contextmanager
def open_layer_file(
    layers: Sequence[Layer],
    open_blob: Callable[[str], BinaryIO],
    path: str,
    *,
    budget: ExtractBudget,
) -> Iterator[LayerFile | None]:
    """Find the entry at ``path`` (relative to the image's root) in ``layers`` (bottom
    first), searching the topmost layer first and honouring whiteouts, without extracting.

    Yields None when no layer has it or a whiteout hides it. Layers that are not tar
    archives are skipped, entries whose names could leave the root never match. Raises
    ``PathTraversal`` for a ``path`` that climbs out, ``ImageTooLarge`` over the budget's
    entry and size limits, ``UnsafeLayer`` for corrupt data, also met while the yielded file
    is read.

    Example::

        with open_layer_file(image.layers, content.open, "app/hello.wasm",
                             budget=ExtractBudget()) as found:
            data = found.file.read() if found and found.file else None
    """
    target = _split(path.lstrip("/"), path, "path")
    if not target:
        raise PathTraversal(f"path {path!r} names the root, not a file", entry=path)
    for layer in reversed(layers):
        if layer.media_type not in ARCHIVE_LAYERS:
            continue
        hidden = False
        try:
            with contextlib.ExitStack() as stack:
                blob = stack.enter_context(open_blob(layer.digest))
                stream = _LayerStream(blob, budget)
                stack.callback(stream.close)
                tar = stack.enter_context(
                    tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFFER)
                )
                for count, member in enumerate(tar, 1):
                    if count > budget.max_files_per_layer:
                        raise ImageTooLarge(
                            f"layer {layer.digest} has over {budget.max_files_per_layer} entries",
                            digest=layer.digest,
                            limit=budget.max_files_per_layer,
                        )
                    try:
                        parts = _split(member.name, member.name)
                    except UnsafeLayer:
                        continue
                    if parts == target:
                        file = tar.extractfile(member) if member.isreg() else None
                        yield LayerFile(layer, cast(BinaryIO | None, file))
                        return
                    hidden = hidden or _hides(parts, target)
        except (tarfile.TarError, EOFError) as exc:
            raise UnsafeLayer(f"layer {layer.digest} is not a valid tar archive: {exc}") from exc
        if hidden:
            break
    yield None


def _hides(entry: _Parts, target: _Parts) -> bool:
    """Whether whiteout ``entry`` deletes ``target`` or one of its directories from the
    layers below (OCI image spec whiteouts; aufs metadata hides nothing)."""
    if not entry:
        return False
    base, parent = entry[-1], entry[:-1]
    if base == _OPAQUE:
        return len(target) > len(parent) and target[: len(parent)] == parent
    if base.startswith(_WHITEOUT) and not base.startswith(_WHITEOUT + _WHITEOUT):
        removed = (*parent, base[len(_WHITEOUT) :])
        return target[: len(removed)] == removed
    return False


async def unpack_layer(
    snapshots: SnapshotStore,
    layer: Layer,
    open_blob: Callable[[], BinaryIO],
    *,
    lowers: Sequence[str] = (),
    budget: ExtractBudget,
    privileged: bool | None = None,
) -> Path:
    """Unpack one layer into its snapshot, once, and return the snapshot's path.

    The snapshot is keyed by ``layer.diff_id`` and the uncompressed stream must hash to it
    (``DigestMismatch`` otherwise, and no snapshot is left). ``open_blob`` is called only
    if the layer is not unpacked yet. ``lowers`` are the diff_ids of the layers below, top
    first, already unpacked.

    Example::

        await unpack_layer(snapshots, layer, lambda: content.open(layer.digest),
                           lowers=done[::-1], budget=budget)
    """
    lower_paths = [snapshots.path(diff_id) for diff_id in lowers]
    return await _unpack(snapshots, layer, open_blob, lower_paths, budget, privileged)


async def unpack_layers(
    snapshots: SnapshotStore,
    layers: Sequence[Layer],
    open_blob: Callable[[Layer], BinaryIO],
    *,
    budget: ExtractBudget,
    privileged: bool | None = None,
    created: list[str] | None = None,
) -> None:
    """Unpack an image's layers (bottom to top) into snapshots, several at a time.

    Each distinct diff_id is unpacked once, as ``unpack_layer`` would. Layers go in
    parallel: on filesystems where creating inodes is the cost, separate snapshot
    directories overlap it. A layer that must consult the layers below (it creates a
    directory its archive does not list) and meets one not unpacked yet is discarded and
    unpacked again once all the others are in. ``created``, if given, receives the
    diff_ids this call unpacked as each one commits, so a caller can undo them if another
    layer fails. On failure the other layers are cancelled and the error raised.

    Example::

        await unpack_layers(snapshots, image.layers, lambda l: content.open(l.digest),
                            budget=ExtractBudget())
    """
    order: dict[str, int] = {}
    for index, layer in enumerate(layers):
        order.setdefault(layer.diff_id, index)

    def lowers_of(index: int) -> list[str]:
        return list(dict.fromkeys(layer.diff_id for layer in reversed(layers[:index])))

    async def one(index: int, lower_paths: Sequence[Path]) -> None:
        layer = layers[index]
        existed = snapshots.has(layer.diff_id)
        try:
            await _unpack(
                snapshots, layer, lambda: open_blob(layer), lower_paths, budget, privileged
            )
        finally:
            # Also when cancelled because another layer failed: the thread may have
            # committed the snapshot before the cancellation reached this task.
            if not existed and created is not None and snapshots.has(layer.diff_id):
                created.append(layer.diff_id)

    postponed: list[int] = []

    async def first_pass(index: int) -> None:
        try:
            await one(index, [snapshots.location(d) for d in lowers_of(index)])
        except _LowerNotReady:
            postponed.append(index)

    try:
        async with asyncio.TaskGroup() as group:
            for index in order.values():
                group.create_task(first_pass(index))
    except ExceptionGroup as failed:
        # The first failure is the error; the group is only how tasks deliver it.
        first, *others = failed.exceptions
        for other in others:
            first.add_note(f"another layer failed too: {other!r}")
        raise first from None
    for index in sorted(postponed):
        await one(index, [snapshots.path(d) for d in lowers_of(index)])


async def _unpack(
    snapshots: SnapshotStore,
    layer: Layer,
    open_blob: Callable[[], BinaryIO],
    lower_paths: Sequence[Path],
    budget: ExtractBudget,
    privileged: bool | None,
) -> Path:
    def fill(target_fd: int) -> None:
        with open_blob() as blob:
            stats = apply_layer(
                blob,
                layer.media_type,
                target_fd,
                mode="snapshot",
                lowers=lower_paths,
                privileged=privileged,
                budget=budget,
            )
        if stats.diff_id != layer.diff_id:
            raise DigestMismatch(
                f"layer {layer.digest} unpacks to {stats.diff_id}, not the image config's "
                f"diff_id {layer.diff_id}",
                digest=layer.digest,
                expected=layer.diff_id,
                actual=stats.diff_id,
            )

    return await snapshots.extract(layer.diff_id, fill)
