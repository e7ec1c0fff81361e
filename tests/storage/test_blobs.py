"""Content store: verification before visibility, single-flight ingest, resume, limits."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from magikrun.errors import BlobNotFound, DigestMismatch, ImageTooLarge, InvalidDigest
from magikrun.platform import Paths
from magikrun.storage import ContentStore, sha256_digest, validate_digest


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:../../../../etc/passwd",
        "sha512:" + "a" * 64,
        "sha256:" + "a" * 64 + "/x",
        "sha256:" + "a" * 64 + "\n",
        "",
    ],
)
def test_invalid_digests_are_rejected_before_touching_paths(paths: Paths, bad: str) -> None:
    store = ContentStore(paths)
    with pytest.raises(InvalidDigest, match="invalid digest"):
        store.path(bad)
    with pytest.raises(InvalidDigest):
        validate_digest(bad)


def test_put_lays_out_blobs_by_prefix_and_dedups(paths: Paths) -> None:
    store = ContentStore(paths)
    digest = store.put(b"hello")
    assert digest == _digest(b"hello")
    hexpart = digest[7:]
    assert store.path(digest) == paths.blobs / "sha256" / hexpart[:2] / hexpart
    assert store.put(b"hello") == digest
    assert list(store.list()) == [digest]
    assert store.read(digest, max_size=5) == b"hello"
    with pytest.raises(ImageTooLarge, match="over the 4-byte limit"):
        store.read(digest, max_size=4)


def test_put_with_wrong_expected_digest_stores_nothing(paths: Paths) -> None:
    store = ContentStore(paths)
    with pytest.raises(DigestMismatch, match="hashed to"):
        store.put(b"evil", expected=_digest(b"good"))
    assert list(store.list()) == []


async def test_ingest_commits_only_verified_content(paths: Paths) -> None:
    store = ContentStore(paths)
    want = _digest(b"good data")
    async with store.ingest(want, size=9, max_size=100) as writer:
        assert writer is not None
        writer.write(b"bad data!")
        with pytest.raises(DigestMismatch):
            writer.commit()
    assert not store.has(want)
    assert store.ingest_offset(want) == 0
    assert os.listdir(paths.ingest) == []  # no empty ingest file left behind


async def test_ingest_refuses_growth_past_announced_size(paths: Paths) -> None:
    store = ContentStore(paths)
    want = _digest(b"abc")
    async with store.ingest(want, size=3, max_size=100) as writer:
        assert writer is not None
        with pytest.raises(DigestMismatch, match="larger than its announced 3 bytes"):
            writer.write(b"abcd")
    assert os.listdir(paths.ingest) == []
    with pytest.raises(ImageTooLarge, match="over the 2-byte limit"):
        async with store.ingest(want, size=3, max_size=2):
            pass


async def test_interrupted_ingest_resumes_from_its_offset(paths: Paths) -> None:
    store = ContentStore(paths)
    data = b"0123456789" * 1000
    want = _digest(data)
    async with store.ingest(want, size=len(data), max_size=len(data)) as writer:
        assert writer is not None
        writer.write(data[:4000])
    assert store.ingest_offset(want) == 4000
    async with store.ingest(want, size=len(data), max_size=len(data)) as writer:
        assert writer is not None
        assert writer.offset == 4000
        writer.write(data[4000:])
        writer.commit()
    assert store.has(want)
    assert store.ingest_offset(want) == 0


async def test_concurrent_ingests_of_one_digest_write_once(paths: Paths) -> None:
    store = ContentStore(paths)
    data = b"x" * 10000
    want = _digest(data)
    writes = 0

    async def fetch() -> None:
        nonlocal writes
        async with store.ingest(want, size=len(data), max_size=len(data)) as writer:
            if writer is None:
                return
            writes += 1
            await asyncio.sleep(0.05)
            writer.write(data)
            writer.commit()

    await asyncio.gather(*(fetch() for _ in range(8)))
    assert writes == 1
    assert store.has(want)


def test_verify_removes_a_corrupted_blob(paths: Paths) -> None:
    store = ContentStore(paths)
    digest = store.put(b"payload")
    assert store.verify(digest)
    store.path(digest).write_bytes(b"tampered")
    assert not store.verify(digest)
    assert not store.has(digest)
    with pytest.raises(BlobNotFound, match="not in the store"):
        store.open(digest)


def test_sha256_digest() -> None:
    assert sha256_digest(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
