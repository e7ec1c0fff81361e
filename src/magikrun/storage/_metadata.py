"""The image index and reference counts, in SQLite at ``<root>/metadata.db``.

Each image record names the blobs (manifest, config, layers) and snapshots
(unpacked layers, by diff_id) it uses; a blob or snapshot no record names is
garbage. The database runs in WAL mode with a busy timeout so that several
magikrun processes share it, and every thread gets its own connection.

Schemas evolve by migrations: the image index's own steps are counted in
``PRAGMA user_version``; another part of magikrun (pods, say) keeps its tables
with ``MetadataStore.migrate("pods", steps)``, counted per component in the
``schema_versions`` table. Steps are append-only lists of SQL scripts.

Pulls and imports hold a shared *lease* while they write blobs not yet recorded;
garbage collection takes the lease exclusively, so it never frees content a
pull is about to record.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from ..errors import StorageError
from ..platform import Paths

__all__ = ["ImageRecord", "MetadataStore"]

_BUSY_TIMEOUT_MS = 10_000
_LEASE_POLL = 0.02

_IMAGE_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE images (
        reference       TEXT PRIMARY KEY,
        manifest_digest TEXT NOT NULL,
        config_digest   TEXT NOT NULL,
        platform        TEXT NOT NULL,
        kind            TEXT NOT NULL,
        size            INTEGER NOT NULL,
        created         TEXT,
        pulled          REAL NOT NULL,
        document        TEXT NOT NULL
    );
    CREATE TABLE image_blobs (
        reference TEXT NOT NULL REFERENCES images(reference) ON DELETE CASCADE,
        digest    TEXT NOT NULL,
        PRIMARY KEY (reference, digest)
    );
    CREATE INDEX image_blobs_digest ON image_blobs(digest);
    CREATE TABLE image_snapshots (
        reference TEXT NOT NULL REFERENCES images(reference) ON DELETE CASCADE,
        snapshot  TEXT NOT NULL,
        PRIMARY KEY (reference, snapshot)
    );
    CREATE INDEX image_snapshots_snapshot ON image_snapshots(snapshot);
    CREATE TABLE schema_versions (
        component TEXT PRIMARY KEY,
        version   INTEGER NOT NULL
    );
    """,
)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One entry of the image index."""

    reference: str
    """Normalized reference (``host/repo:tag`` or ``host/repo@sha256:…``)."""
    manifest_digest: str
    config_digest: str
    platform: str
    kind: str
    size: int
    """Bytes of the image's blobs as stored."""
    created: str | None
    """The image config's ``created`` time, as written there."""
    pulled: float
    """When it was pulled or imported (seconds since the epoch)."""
    document: str
    """The image as JSON; written and read by the image package, opaque here."""
    blobs: tuple[str, ...]
    """Every blob digest the image holds on to."""
    snapshots: tuple[str, ...]
    """Every snapshot key (layer diff_id) the image holds on to."""


class MetadataStore:
    """The metadata database of one magikrun root.

    ```python
    meta = MetadataStore(paths)
    meta.put_image(record)
    meta.referenced_blobs()      # what gc must keep
    ```
    """

    def __init__(self, paths: Paths) -> None:
        self._path = paths.metadata_db
        self._lease_path = paths.data / "lease.lock"
        self._local = threading.local()

    # -- connection and schema -------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            with _transaction(conn):
                version: int = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > len(_IMAGE_MIGRATIONS):
                    raise StorageError(
                        f"metadata database {self._path} has schema version {version}, newer "
                        f"than this magikrun understands ({len(_IMAGE_MIGRATIONS)})",
                        hint="upgrade magikrun, or use another --root",
                        path=str(self._path),
                    )
                for step in _IMAGE_MIGRATIONS[version:]:
                    _run_script(conn, step)
                conn.execute(f"PRAGMA user_version = {len(_IMAGE_MIGRATIONS)}")
        except sqlite3.DatabaseError as exc:
            raise StorageError(
                f"cannot open metadata database {self._path}: {exc}",
                hint="check the file's permissions and the disk; a corrupt database can be "
                "moved away (images must then be pulled again)",
                path=str(self._path),
            ) from exc
        return conn

    def migrate(self, component: str, steps: Sequence[str]) -> None:
        """Bring ``component``'s tables up to ``len(steps)`` by running the steps it lacks.

        Steps are SQL scripts, append-only: never edit one that has shipped.
        """
        conn = self._db
        with _transaction(conn):
            row = conn.execute(
                "SELECT version FROM schema_versions WHERE component = ?", (component,)
            ).fetchone()
            version = row[0] if row else 0
            if version > len(steps):
                raise StorageError(
                    f"metadata for {component!r} has schema version {version}, newer than "
                    f"this magikrun understands ({len(steps)})",
                    hint="upgrade magikrun, or use another --root",
                    component=component,
                )
            for number, step in enumerate(steps[version:], start=version + 1):
                try:
                    _run_script(conn, step)
                except sqlite3.DatabaseError as exc:
                    raise StorageError(
                        f"migration {number} of {component!r} failed: {exc}",
                        hint="this is a bug in magikrun; the database was left unchanged",
                        component=component,
                    ) from exc
            conn.execute(
                "INSERT INTO schema_versions(component, version) VALUES (?, ?) "
                "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, len(steps)),
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside ``BEGIN IMMEDIATE`` … ``COMMIT``: for the tables
        other components add with :meth:`migrate`."""
        conn = self._db
        with _transaction(conn):
            yield conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- images ----------------------------------------------------------------

    def put_image(self, record: ImageRecord) -> None:
        """Add or replace the entry for ``record.reference`` with its blobs and snapshots."""
        conn = self._db
        with _transaction(conn):
            conn.execute("DELETE FROM images WHERE reference = ?", (record.reference,))
            conn.execute(
                "INSERT INTO images(reference, manifest_digest, config_digest, platform, kind, "
                "size, created, pulled, document) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.reference,
                    record.manifest_digest,
                    record.config_digest,
                    record.platform,
                    record.kind,
                    record.size,
                    record.created,
                    record.pulled,
                    record.document,
                ),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO image_blobs(reference, digest) VALUES (?, ?)",
                [(record.reference, d) for d in record.blobs],
            )
            conn.executemany(
                "INSERT OR IGNORE INTO image_snapshots(reference, snapshot) VALUES (?, ?)",
                [(record.reference, s) for s in record.snapshots],
            )

    def get_image(self, reference: str) -> ImageRecord | None:
        conn = self._db
        row = conn.execute(f"{_SELECT_IMAGE} WHERE reference = ?", (reference,)).fetchone()
        return None if row is None else self._record(conn, row)

    def find_by_digest(self, manifest_digest: str) -> list[ImageRecord]:
        """Entries whose manifest is ``manifest_digest`` (an image known under several names)."""
        conn = self._db
        rows = conn.execute(
            f"{_SELECT_IMAGE} WHERE manifest_digest = ? ORDER BY reference", (manifest_digest,)
        ).fetchall()
        return [self._record(conn, row) for row in rows]

    def list_images(self) -> list[ImageRecord]:
        conn = self._db
        rows = conn.execute(f"{_SELECT_IMAGE} ORDER BY reference").fetchall()
        return [self._record(conn, row) for row in rows]

    def remove_image(self, reference: str) -> ImageRecord | None:
        """Drop the entry; its blobs and snapshots stay until gc finds them unreferenced."""
        conn = self._db
        with _transaction(conn):
            row = conn.execute(f"{_SELECT_IMAGE} WHERE reference = ?", (reference,)).fetchone()
            if row is None:
                return None
            record = self._record(conn, row)
            conn.execute("DELETE FROM images WHERE reference = ?", (reference,))
        return record

    def blob_refcount(self, digest: str) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM image_blobs WHERE digest = ?", (digest,)
        ).fetchone()
        return int(row[0])

    def snapshot_refcount(self, key: str) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM image_snapshots WHERE snapshot = ?", (key,)
        ).fetchone()
        return int(row[0])

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT digest FROM image_blobs")}

    def referenced_snapshots(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT snapshot FROM image_snapshots")}

    def _record(self, conn: sqlite3.Connection, row: tuple[object, ...]) -> ImageRecord:
        reference = str(row[0])
        blobs = _column(conn, "SELECT digest FROM image_blobs WHERE reference = ?", reference)
        snaps = _column(conn, "SELECT snapshot FROM image_snapshots WHERE reference = ?", reference)
        return ImageRecord(
            reference=reference,
            manifest_digest=str(row[1]),
            config_digest=str(row[2]),
            platform=str(row[3]),
            kind=str(row[4]),
            size=int(str(row[5])),
            created=None if row[6] is None else str(row[6]),
            pulled=float(str(row[7])),
            document=str(row[8]),
            blobs=blobs,
            snapshots=snaps,
        )

    # -- leases ----------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, *, exclusive: bool = False) -> AsyncIterator[None]:
        """Hold the root's lease: shared while writing content not yet recorded,
        exclusive while collecting garbage. Works across processes (flock)."""
        self._lease_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lease_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LEASE_POLL)
            yield
        finally:
            os.close(fd)


_SELECT_IMAGE = (
    "SELECT reference, manifest_digest, config_digest, platform, kind, size, created, pulled, "
    "document FROM images"
)


def _column(conn: sqlite3.Connection, sql: str, key: str) -> tuple[str, ...]:
    return tuple(sorted(str(r[0]) for r in conn.execute(sql, (key,))))


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run a migration step statement by statement (``executescript`` would commit)."""
    for statement in _statements(script):
        conn.execute(statement)


def _statements(script: str) -> Iterable[str]:
    buffer = ""
    for char in script:
        buffer += char
        if char == ";" and sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: writers queue on the busy timeout, not fail."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
