"""Content-addressed blob store: ``blobs/sha256/ab/abcd…``, verified before it is visible.

Writers stream into ``ingest/<hex>`` while hashing; ``commit`` checks size and
digest, fsyncs and renames into place, so a blob path only ever holds verified
bytes. One writer per digest at a time across tasks and processes (an asyncio
lock plus an fcntl lock on the ingest file): concurrent pulls of one layer
download it once. A partial ingest survives an interrupted download, and its
length is where a resumed download (HTTP ``Range``) starts.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from ..errors import BlobNotFound, DigestMismatch, ImageTooLarge, InvalidDigest, StorageFull
from ..platform import Paths

__all__ = ["BlobWriter", "ContentStore", "sha256_digest", "validate_digest"]

_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_CHUNK = 1 << 20


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:`` + 64 lowercase hex, else raise InvalidDigest.

    Called before a digest string touches any path.
    """
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise InvalidDigest(f"invalid digest {str(digest)[:100]!r}", digest=str(digest)[:100])
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _raise_storage(exc: OSError, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull(f"disk full while writing {what}", path=what) from exc
    raise exc


class BlobWriter:
    """An open ingest for one digest. Obtain it from ``ContentStore.ingest``."""

    def __init__(self, store: ContentStore, digest: str, fd: int, size: int | None, max_size: int):
        self._store = store
        self.digest = digest
        self._fd = fd
        self.expected_size = size
        self.max_size = max_size
        self._hash = hashlib.sha256()
        self.offset = 0
        # A previous attempt's bytes are the resume point: re-hash them.
        while chunk := os.pread(fd, _CHUNK, self.offset):
            self._hash.update(chunk)
            self.offset += len(chunk)
        os.lseek(fd, self.offset, os.SEEK_SET)
        if self.offset > self._limit:
            self.reset()

    @property
    def _limit(self) -> int:
        return self.expected_size if self.expected_size is not None else self.max_size

    def reset(self) -> None:
        """Start over (the server ignored our Range request, or the partial data is bad)."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        """Append and hash ``chunk``; refuses to grow past the announced size or the limit."""
        if self.offset + len(chunk) > self._limit:
            self.reset()
            if self.expected_size is not None and self.expected_size <= self.max_size:
                raise DigestMismatch(
                    f"blob {self.digest} is larger than its announced {self.expected_size} bytes",
                    digest=self.digest,
                )
            raise ImageTooLarge(
                f"blob {self.digest} is over the {self.max_size}-byte limit", digest=self.digest
            )
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.reset()
            _raise_storage(exc, self.digest)
        self._hash.update(chunk)
        self.offset += len(chunk)

    def commit(self) -> Path:
        """Verify size and digest, fsync, and move the blob into place. On mismatch the
        ingest is discarded and DigestMismatch raised: nothing unverified is kept."""
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest or (
            self.expected_size is not None and self.offset != self.expected_size
        ):
            got = self.offset
            self.reset()
            raise DigestMismatch(
                f"content for {self.digest} hashed to {actual} ({got} bytes)",
                digest=self.digest,
                actual=actual,
            )
        target = self._store.path(self.digest)
        try:
            os.fsync(self._fd)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._store._ingest_path(self.digest), target)
            dirfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError as exc:
            _raise_storage(exc, self.digest)
        return target


class ContentStore:
    """Verified blobs of one magikrun root.

    ```python
    store = ContentStore(Paths.resolve(root))
    async with store.ingest(digest, size=n, max_size=MAX_LAYER_SIZE) as writer:
        if writer is not None:          # None: someone else already stored it
            for chunk in chunks(start=writer.offset):
                writer.write(chunk)
            writer.commit()
    ```
    """

    def __init__(self, paths: Paths) -> None:
        self._root = paths.blobs / "sha256"
        self._ingest = paths.ingest
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, digest: str) -> Path:
        hexpart = validate_digest(digest)[7:]
        return self._root / hexpart[:2] / hexpart

    def _ingest_path(self, digest: str) -> Path:
        return self._ingest / validate_digest(digest)[7:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the store", digest=digest) from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the store", digest=digest) from None

    def read(self, digest: str, *, max_size: int) -> bytes:
        """Read a small blob (manifest, config) whole, refusing one over ``max_size``."""
        with self.open(digest) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise ImageTooLarge(f"blob {digest} is over the {max_size}-byte limit", digest=digest)
        return data

    def put(self, data: bytes, *, expected: str | None = None) -> str:
        """Store bytes held in memory; verify them against ``expected`` when given."""
        digest = sha256_digest(data)
        if expected is not None and validate_digest(expected) != digest:
            raise DigestMismatch(
                f"content for {expected} hashed to {digest}", digest=expected, actual=digest
            )
        target = self.path(digest)
        if target.is_file():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except OSError as exc:
            with suppress(FileNotFoundError):
                tmp.unlink()
            _raise_storage(exc, digest)
        return digest

    @asynccontextmanager
    async def ingest(
        self, digest: str, *, size: int | None, max_size: int
    ) -> AsyncIterator[BlobWriter | None]:
        """Exclusive writer for ``digest``; ``None`` when the blob is (by now) stored.

        Waiters for a digest another task or process is downloading block here and
        then see the finished blob, so one download serves every concurrent pull.
        """
        validate_digest(digest)
        if size is not None and size > max_size:
            raise ImageTooLarge(
                f"blob {digest} is {size} bytes, over the {max_size}-byte limit", digest=digest
            )
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if self.has(digest):
                yield None
                return
            self._ingest.mkdir(parents=True, exist_ok=True)
            path = self._ingest_path(digest)
            fd = await _open_locked(path)
            try:
                if self.has(digest):
                    yield None
                    return
                yield BlobWriter(self, digest, fd, size, max_size)
            finally:
                try:
                    _drop_if_empty(fd, path)
                finally:
                    os.close(fd)

    def ingest_offset(self, digest: str) -> int:
        """Bytes of an interrupted download of ``digest`` kept for resuming."""
        try:
            return self._ingest_path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self) -> Iterator[str]:
        if not self._root.is_dir():
            return
        for prefix in sorted(self._root.iterdir()):
            for blob in sorted(prefix.iterdir()):
                digest = "sha256:" + blob.name
                if _DIGEST.fullmatch(digest) and blob.name.startswith(prefix.name):
                    yield digest

    def verify(self, digest: str) -> bool:
        """Re-hash a stored blob; a corrupt one is removed (so the next pull repairs it)."""
        h = hashlib.sha256()
        with self.open(digest) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        if "sha256:" + h.hexdigest() == digest:
            return True
        self.delete(digest)
        return False


async def _flock(fd: int) -> None:
    """Take an exclusive fcntl lock without blocking the event loop."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(0.02)


async def _open_locked(path: Path) -> int:
    """Open and lock the ingest file at ``path``. Retried when, while we waited for the
    lock, its holder committed or dropped that file (we would hold an orphan inode)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await _flock(fd)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _drop_if_empty(fd: int, path: Path) -> None:
    """Remove an ingest file with nothing to resume (a failed commit resets it to empty;
    or nothing came). We hold its lock, so no one else is writing it."""
    if os.fstat(fd).st_size == 0 and _same_file(fd, path):
        os.unlink(path)
