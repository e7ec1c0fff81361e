"""Image index: records, reference counts, schema migrations, leases, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from magikrun.errors import StorageError
from magikrun.platform import Paths
from magikrun.storage import ImageRecord, MetadataStore

A, B, C, D = ("sha256:" + c * 64 for c in "abcd")


def _record(ref: str, blobs: tuple[str, ...], snaps: tuple[str, ...] = ()) -> ImageRecord:
    return ImageRecord(
        reference=ref,
        manifest_digest=blobs[0],
        config_digest=blobs[1],
        platform="linux/amd64",
        kind="oci",
        size=10,
        created=None,
        pulled=1.0,
        document="{}",
        blobs=blobs,
        snapshots=snaps,
    )


def test_put_get_list_remove(paths: Paths) -> None:
    meta = MetadataStore(paths)
    meta.put_image(_record("x.local/a:1", (A, B, C), (C,)))
    meta.put_image(_record("x.local/b:1", (D, B, C), (C,)))
    got = meta.get_image("x.local/a:1")
    assert got is not None and got.blobs == (A, B, C) and got.snapshots == (C,)
    assert [r.reference for r in meta.list_images()] == ["x.local/a:1", "x.local/b:1"]
    assert [r.reference for r in meta.find_by_digest(D)] == ["x.local/b:1"]
    assert meta.blob_refcount(B) == 2 and meta.snapshot_refcount(C) == 2

    removed = meta.remove_image("x.local/a:1")
    assert removed is not None and removed.reference == "x.local/a:1"
    assert meta.get_image("x.local/a:1") is None
    assert meta.remove_image("x.local/a:1") is None
    assert meta.referenced_blobs() == {B, C, D}
    assert meta.blob_refcount(A) == 0 and meta.snapshot_refcount(C) == 1


def test_put_replaces_the_references_of_a_retagged_image(paths: Paths) -> None:
    meta = MetadataStore(paths)
    meta.put_image(_record("x.local/a:1", (A, B), (C,)))
    meta.put_image(_record("x.local/a:1", (D, B), ()))
    assert meta.referenced_blobs() == {B, D}
    assert meta.referenced_snapshots() == set()


def test_database_is_wal_and_survives_reopen(paths: Paths) -> None:
    MetadataStore(paths).put_image(_record("x.local/a:1", (A, B)))
    conn = sqlite3.connect(paths.metadata_db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()
    assert MetadataStore(paths).get_image("x.local/a:1") is not None


def test_component_migrations_run_once_and_in_order(paths: Paths) -> None:
    steps = [
        "CREATE TABLE pods (id TEXT PRIMARY KEY);",
        "ALTER TABLE pods ADD COLUMN state TEXT; CREATE INDEX pods_state ON pods(state);",
    ]
    meta = MetadataStore(paths)
    meta.migrate("pods", steps[:1])
    meta.migrate("pods", steps)
    meta.migrate("pods", steps)
    other = MetadataStore(paths)
    other.migrate("pods", steps)
    with pytest.raises(StorageError, match="newer than this magikrun understands"):
        other.migrate("pods", steps[:1])


def test_a_failing_migration_step_changes_nothing(paths: Paths) -> None:
    meta = MetadataStore(paths)
    with pytest.raises(StorageError, match="migration 1 of 'broken' failed"):
        meta.migrate("broken", ["CREATE TABLE t1 (x); CREATE TABLE t1 (y);"])
    meta.migrate("broken", ["CREATE TABLE t1 (x);"])


def test_a_newer_database_is_refused(paths: Paths) -> None:
    paths.data.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(paths.metadata_db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match="schema version 99") as info:
        MetadataStore(paths).list_images()
    assert "upgrade magikrun" in info.value.hint


def test_threads_get_their_own_connections(paths: Paths) -> None:
    meta = MetadataStore(paths)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                meta.put_image(_record(f"x.local/t{i}:{j}", (A, B)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(meta.list_images()) == 80
    assert meta.blob_refcount(A) == 80


async def test_exclusive_lease_waits_for_shared_holders(paths: Paths) -> None:
    meta = MetadataStore(paths)
    order: list[str] = []
    async with asyncio.TaskGroup() as tasks:
        async with meta.lease(), meta.lease():
            tasks.create_task(_collect(meta, order))
            await asyncio.sleep(0.1)
            order.append("pull done")
    assert order == ["pull done", "gc"]


async def _collect(meta: MetadataStore, order: list[str]) -> None:
    async with meta.lease(exclusive=True):
        order.append("gc")
