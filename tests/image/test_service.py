"""ImageService against real parts: docker-registry, the content and snapshot stores."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from magikrun.errors import ImageNotFound, ImagePullFailed, InvalidArgument
from magikrun.image import (
    BUSYBOX_DEMO_REF,
    ImageService,
    LayerEntry,
    LayoutWriter,
    RegistryClient,
    build_demo_images,
    build_layer,
)
from magikrun.image._mediatypes import OCI_LAYER_GZIP
from magikrun.platform import Paths
from magikrun.storage import SnapshotStore, sha256_digest
from tests._registry import (
    RegistryServer,
    TestImage,
    busybox_layer,
    file_layer,
    make_image,
    push_image,
    unique_repo,
)
from tests.conftest import requires_root


def _stored_blobs(paths: Paths) -> set[str]:
    return {"sha256:" + p.name for p in (paths.blobs / "sha256").rglob("*") if p.is_file()}


async def _push(server: RegistryServer, image: TestImage, tag: str = "1") -> str:
    repo = unique_repo("svc")
    async with RegistryClient(server.host) as client:
        await push_image(client, repo, tag, image)
    return f"{server.host}/{repo}:{tag}"


@pytest.fixture
def own_registry() -> Iterator[RegistryServer]:
    """A registry this test may stop."""
    server = RegistryServer().start()
    try:
        yield server
    finally:
        server.stop()


def _two_images_sharing_a_layer(root: Path) -> tuple[str, str, str]:
    shared, shared_diff = build_layer([LayerEntry("shared.txt", data=b"shared")])
    own_a, diff_a = build_layer([LayerEntry("a.txt", data=b"a")])
    own_b, diff_b = build_layer([LayerEntry("b.txt", data=b"b")])
    writer = LayoutWriter(root)
    for name, blob, diff in (("a", own_a, diff_a), ("b", own_b, diff_b)):
        writer.add_image(
            ref_name=f"example.local/{name}:1",
            config={
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [shared_diff, diff]},
            },
            layers=[(OCI_LAYER_GZIP, shared), (OCI_LAYER_GZIP, blob)],
        )
    writer.write_index()
    return sha256_digest(shared), shared_diff, diff_a


async def test_remove_frees_only_what_no_other_image_uses(paths: Paths, short_tmp: Path) -> None:
    shared, shared_diff, diff_a = _two_images_sharing_a_layer(short_tmp / "layout")
    service = ImageService(paths)
    a, b = await service.import_(short_tmp / "layout")
    only_a = {a.manifest_digest, a.config_digest, a.layers[1].digest}

    freed = await service.remove("example.local/a:1")
    assert set(freed.blobs) == only_a
    assert freed.snapshots == (diff_a,)
    assert freed.bytes_freed > 0
    assert service.content.has(shared) and service.snapshots.has(shared_diff)
    assert not service.snapshots.has(diff_a)
    assert service.get("example.local/b:1") == b
    with pytest.raises(ImageNotFound, match="not in the local store") as info:
        service.get("example.local/a:1")
    assert "image ls" in info.value.hint

    await service.remove(b.manifest_digest)
    assert _stored_blobs(paths) == set()
    assert service.snapshots.list() == []
    assert service.list() == []
    with pytest.raises(ImageNotFound):
        await service.remove("example.local/b:1")


async def test_gc_frees_unreferenced_content_and_stale_ingests(
    paths: Paths, short_tmp: Path
) -> None:
    _two_images_sharing_a_layer(short_tmp / "layout")
    service = ImageService(paths)
    a, b = await service.import_(short_tmp / "layout")
    stray = service.content.put(b"nobody references me")
    paths.ingest.mkdir(parents=True, exist_ok=True)
    stale, fresh = paths.ingest / ("1" * 64), paths.ingest / ("2" * 64)
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 10)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    service.metadata.remove_image(a.reference)  # as a crash between unindex and free would

    result = await service.gc()
    assert stray in result.blobs
    assert a.manifest_digest in result.blobs and a.layers[1].digest in result.blobs
    assert result.snapshots == (a.layers[1].diff_id,)
    assert result.ingests == ("1" * 64,)
    assert not stale.exists() and fresh.exists()
    assert _stored_blobs(paths) == set(service.metadata.get_image(b.reference).blobs)  # type: ignore[union-attr]
    assert await service.gc() == type(result)()


async def test_pull_indexes_unpacks_and_then_serves_from_cache_offline(
    paths: Paths, own_registry: RegistryServer
) -> None:
    test_image = make_image([busybox_layer(), file_layer({"etc/hello": b"hi\n"})])
    ref = await _push(own_registry, test_image)
    service = ImageService(paths)
    events: list[str] = []
    image = await service.pull(ref, progress=lambda e: events.append(e.digest))
    assert image.manifest_digest == test_image.digest
    assert set(test_image.layer_digests) <= set(events)
    assert all(service.snapshots.has(layer.diff_id) for layer in image.layers)
    record = service.metadata.get_image(image.reference)
    assert record is not None and image.manifest_digest in record.blobs

    own_registry.stop()
    again = await ImageService(paths).pull(ref)
    assert again == image
    assert await ImageService(paths).pull(ref, policy="Never") == image
    with pytest.raises(ImagePullFailed):
        await service.pull(ref, policy="Always")


async def test_pull_policies_and_unknown_images(paths: Paths, registry: RegistryServer) -> None:
    service = ImageService(paths)
    missing = f"{registry.host}/{unique_repo('none')}:1"
    with pytest.raises(ImageNotFound, match="pull policy is Never"):
        await service.pull(missing, policy="Never")
    with pytest.raises(ImageNotFound):
        await service.pull(missing)
    with pytest.raises(InvalidArgument, match="invalid pull policy"):
        await service.pull(missing, policy="Sometimes")  # type: ignore[arg-type]
    assert service.list() == [] and _stored_blobs(paths) == set()


@pytest.fixture
def count_fills(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count how often each snapshot is really filled (extracted), in this process.

    An attempt that stops early because a lower layer is not unpacked yet (see
    ``unpack_layers``) leaves nothing and is retried; only completed fills count.
    """
    fills: Counter[str] = Counter()
    real = SnapshotStore.extract

    async def counting(self: SnapshotStore, diff_id: str, fill: Callable[[int], object]) -> Path:
        def counted(fd: int) -> object:
            result = fill(fd)
            fills[diff_id] += 1
            return result

        return await real(self, diff_id, counted)

    monkeypatch.setattr(SnapshotStore, "extract", counting)
    return fills


async def test_concurrent_pulls_extract_a_shared_layer_once(
    paths: Paths, registry: RegistryServer, count_fills: Counter[str]
) -> None:
    images = [
        make_image([busybox_layer(), file_layer({f"etc/n{i}": str(i).encode()})]) for i in range(4)
    ]
    refs = [await _push(registry, image) for image in images]
    services = [ImageService(paths) for _ in refs]
    pulled = await asyncio.gather(*(s.pull(r) for s, r in zip(services, refs, strict=True)))
    shared = pulled[0].layers[0].diff_id
    assert all(p.layers[0].diff_id == shared for p in pulled)
    assert count_fills[shared] == 1
    assert all(count == 1 for count in count_fills.values())
    assert len(count_fills) == 5
    assert os.listdir(paths.snapshots / "tmp") == []


async def test_verify_repairs_a_corrupt_blob_by_pulling_it_again(
    paths: Paths, registry: RegistryServer
) -> None:
    test_image = make_image([busybox_layer(), file_layer({"etc/v": b"v"})])
    ref = await _push(registry, test_image)
    service = ImageService(paths)
    image = await service.pull(ref)
    assert (await service.verify(ref)).healthy
    victim = image.layers[1].digest
    service.content.path(victim).write_bytes(b"corrupted")

    result = await service.verify(ref)
    assert result.repaired == (victim,)
    assert result.healthy and result.error is None
    assert service.content.verify(victim)


async def test_verify_reports_what_it_cannot_repair(paths: Paths) -> None:
    busybox, _ = await build_demo_images(paths)
    service = ImageService(paths)
    victim = busybox.layers[0].digest
    service.content.path(victim).write_bytes(b"corrupted")
    result = await service.verify(BUSYBOX_DEMO_REF)
    assert result.broken == (victim,)
    assert not result.healthy and result.error
    assert not service.content.has(victim)


@requires_root
async def test_prepare_rootfs_stacks_the_image_layers(paths: Paths) -> None:
    busybox, _ = await build_demo_images(paths)
    service = ImageService(paths)
    rootfs = await service.prepare_rootfs(busybox, "svc-test")
    try:
        assert os.readlink(rootfs.path / "bin" / "sh") == "busybox"
        (rootfs.path / "tmp" / "scratch").write_text("private")
    finally:
        await rootfs.remove()
    assert not (service.snapshots.path(busybox.layers[0].diff_id) / "tmp" / "scratch").exists()
    result = await service.remove(BUSYBOX_DEMO_REF)
    assert result.snapshots == (busybox.layers[0].diff_id,)
