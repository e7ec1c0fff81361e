"""``image import``: OCI layouts (dir, tar) and docker-save archives; hostile archives."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from magikrun.errors import (
    DigestMismatch,
    ImageNotFound,
    ImageTooLarge,
    InvalidArgument,
    ManifestInvalid,
    PathTraversal,
)
from magikrun.image import ImageService, LayerEntry, LayoutWriter, PlatformSpec, build_layer
from magikrun.image._mediatypes import (
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    WASM_CONFIG,
    WASM_LAYER,
)
from magikrun.platform import Paths
from magikrun.storage import sha256_digest


def _layer(name: str, data: bytes) -> tuple[bytes, str]:
    return build_layer([LayerEntry("etc", "dir", mode=0o755), LayerEntry(name, data=data)])


def _config(diff_ids: list[str]) -> dict[str, object]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def _write_layout(root: Path, ref: str = "example.local/app:1") -> tuple[str, list[bytes]]:
    blob1, diff1 = _layer("etc/one", b"one\n")
    blob2, diff2 = _layer("etc/two", b"two\n")
    writer = LayoutWriter(root)
    digest = writer.add_image(
        ref_name=ref,
        config=_config([diff1, diff2]),
        layers=[(OCI_LAYER_GZIP, blob1), (OCI_LAYER_GZIP, blob2)],
    )
    writer.write_index()
    return digest, [blob1, blob2]


def _tar_dir(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for path in sorted(src.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(src)), recursive=False)
    return dest


def _stored(paths: Paths) -> list[str]:
    root = paths.blobs / "sha256"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _snapshots(paths: Paths) -> list[str]:
    root = paths.snapshots / "sha256"
    return sorted(os.listdir(root)) if root.exists() else []


def _assert_nothing_stored(paths: Paths, service: ImageService) -> None:
    assert _stored(paths) == []
    assert _snapshots(paths) == []
    assert service.list() == []


async def test_import_layout_directory(paths: Paths, short_tmp: Path) -> None:
    digest, blobs = _write_layout(short_tmp / "layout")
    service = ImageService(paths)
    (image,) = await service.import_(short_tmp / "layout")
    assert image.reference == "example.local/app:1"
    assert image.manifest_digest == digest
    assert [layer.digest for layer in image.layers] == [sha256_digest(b) for b in blobs]
    assert service.get("example.local/app:1") == image
    for layer in image.layers:
        assert service.snapshots.has(layer.diff_id)
    snapshot = service.snapshots.path(image.layers[1].diff_id)
    assert (snapshot / "etc" / "two").read_bytes() == b"two\n"
    assert not (snapshot / "etc" / "one").exists()


async def test_import_layout_tar_with_explicit_name(paths: Paths, short_tmp: Path) -> None:
    digest, _ = _write_layout(short_tmp / "layout", ref="v1")
    archive = _tar_dir(short_tmp / "layout", short_tmp / "layout.tar")
    service = ImageService(paths)
    with pytest.raises(InvalidArgument, match="does not name an image"):
        await service.import_(archive)
    _assert_nothing_stored(paths, service)
    (image,) = await service.import_(archive, reference="example.local/renamed:v1")
    assert image.reference == "example.local/renamed:v1"
    assert image.manifest_digest == digest
    assert service.content.has(digest)


def _docker_save(dest: Path, *, legacy: bool, tamper_diff_id: bool = False) -> Path:
    """A ``docker save`` archive: config + uncompressed layer tars + manifest.json."""
    raw1, diff1 = build_layer([LayerEntry("a.txt", data=b"a")], gzip_level=None)
    raw2, diff2 = build_layer([LayerEntry("b.txt", data=b"b")], gzip_level=None)
    diff_ids = [diff1, diff2 if not tamper_diff_id else sha256_digest(b"other")]
    config = json.dumps(_config(diff_ids)).encode()
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    if legacy:
        config_name = sha256_digest(config)[7:] + ".json"
        layer_names = ["1111/layer.tar", "2222/layer.tar", "3333/layer.tar"]
        files[layer_names[0]] = raw1
        files[layer_names[1]] = raw2
        links[layer_names[2]] = "../1111/layer.tar"  # docker links repeated layers
        layers = [raw1, raw2, raw1]
        diff_ids.append(diff1)
        config = json.dumps(_config(diff_ids)).encode()
        config_name = sha256_digest(config)[7:] + ".json"
    else:
        config_name = f"blobs/sha256/{sha256_digest(config)[7:]}"
        layer_names = [f"blobs/sha256/{sha256_digest(b)[7:]}" for b in (raw1, raw2)]
        layers = [raw1, raw2]
        for name, data in zip(layer_names, layers, strict=True):
            files[name] = data
    files[config_name] = config
    manifest = [
        {"Config": config_name, "RepoTags": ["example.local/saved:1"], "Layers": layer_names}
    ]
    files["manifest.json"] = json.dumps(manifest).encode()
    files["repositories"] = json.dumps({"example.local/saved": {"1": "1111"}}).encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return dest


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "oci-blobs"])
async def test_import_docker_save_archive(paths: Paths, short_tmp: Path, legacy: bool) -> None:
    archive = _docker_save(short_tmp / "saved.tar", legacy=legacy)
    service = ImageService(paths)
    (image,) = await service.import_(archive)
    assert image.reference == "example.local/saved:1"
    assert all(layer.digest == layer.diff_id for layer in image.layers)
    assert (service.snapshots.path(image.layers[1].diff_id) / "b.txt").read_bytes() == b"b"
    doc = service.inspect("example.local/saved:1")
    assert doc["manifest"]["mediaType"] == OCI_MANIFEST
    assert len(doc["layers"]) == (3 if legacy else 2)


async def test_docker_layer_not_matching_its_diff_id_stores_nothing(
    paths: Paths, short_tmp: Path
) -> None:
    archive = _docker_save(short_tmp / "saved.tar", legacy=False, tamper_diff_id=True)
    service = ImageService(paths)
    with pytest.raises(DigestMismatch, match="does not match its diff_id"):
        await service.import_(archive)
    _assert_nothing_stored(paths, service)


def _hostile_tar(
    dest: Path, members: dict[str, bytes], links: dict[str, str] | None = None
) -> Path:
    with tarfile.open(dest, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return dest


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"../evil": b"x", "index.json": b"{}"}, None, "outside the archive"),
        ({"/etc/evil": b"x", "index.json": b"{}"}, None, "outside the archive"),
        ({"blobs/../../evil": b"x"}, None, "outside the archive"),
        ({"index.json": b"{}"}, {"blobs/sha256/x": "/etc/passwd"}, "outside the archive"),
        ({"manifest.json": b"[]"}, {"a": "../../etc/passwd"}, "outside the archive"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "abs-symlink", "escaping-symlink"],
)
async def test_traversal_in_archive_names_is_refused(
    paths: Paths,
    short_tmp: Path,
    members: dict[str, bytes],
    links: dict[str, str] | None,
    message: str,
) -> None:
    archive = _hostile_tar(short_tmp / "evil.tar", members, links)
    service = ImageService(paths)
    with pytest.raises(PathTraversal, match=message):
        await service.import_(archive)
    _assert_nothing_stored(paths, service)
    assert not (short_tmp / "evil").exists()


async def test_docker_manifest_naming_a_path_outside_is_refused(
    paths: Paths, short_tmp: Path
) -> None:
    manifest = [{"Config": "../../etc/passwd", "RepoTags": ["x.local/a:1"], "Layers": []}]
    archive = _hostile_tar(short_tmp / "evil.tar", {"manifest.json": json.dumps(manifest).encode()})
    service = ImageService(paths)
    with pytest.raises(PathTraversal):
        await service.import_(archive)
    _assert_nothing_stored(paths, service)


async def test_blob_not_matching_its_digest_stores_nothing(paths: Paths, short_tmp: Path) -> None:
    _write_layout(short_tmp / "layout")
    blob_dir = short_tmp / "layout" / "blobs" / "sha256"
    index = json.loads((short_tmp / "layout" / "index.json").read_bytes())
    manifest = json.loads((blob_dir / index["manifests"][0]["digest"][7:]).read_bytes())
    victim = blob_dir / manifest["layers"][1]["digest"][7:]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    service = ImageService(paths)
    with pytest.raises(DigestMismatch):
        await service.import_(short_tmp / "layout")
    _assert_nothing_stored(paths, service)
    assert service.content.ingest_offset(manifest["layers"][1]["digest"]) == 0


async def test_tampered_manifest_is_refused(paths: Paths, short_tmp: Path) -> None:
    _write_layout(short_tmp / "layout")
    index = json.loads((short_tmp / "layout" / "index.json").read_bytes())
    path = short_tmp / "layout" / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":2 '))
    service = ImageService(paths)
    with pytest.raises(DigestMismatch, match="manifest"):
        await service.import_(short_tmp / "layout")
    _assert_nothing_stored(paths, service)


async def test_symlinked_blob_in_layout_directory_is_refused(paths: Paths, short_tmp: Path) -> None:
    _write_layout(short_tmp / "layout")
    index = json.loads((short_tmp / "layout" / "index.json").read_bytes())
    path = short_tmp / "layout" / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    secret = short_tmp / "secret"
    path.rename(secret)
    path.symlink_to(secret)
    service = ImageService(paths)
    with pytest.raises(PathTraversal, match="symbolic link"):
        await service.import_(short_tmp / "layout")
    _assert_nothing_stored(paths, service)


async def test_oversized_manifest_is_refused_before_reading(paths: Paths, short_tmp: Path) -> None:
    digest = "sha256:" + "0" * 64
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": 2 << 20}],
    }
    archive = _hostile_tar(
        short_tmp / "big.tar",
        {"index.json": json.dumps(index).encode(), f"blobs/sha256/{'0' * 64}": b" " * (2 << 20)},
    )
    service = ImageService(paths)
    with pytest.raises(ImageTooLarge, match="over the"):
        await service.import_(archive)
    _assert_nothing_stored(paths, service)


async def test_not_an_archive(paths: Paths, short_tmp: Path) -> None:
    (short_tmp / "junk").write_bytes(b"not a tar")
    service = ImageService(paths)
    with pytest.raises(InvalidArgument, match="not a tar archive"):
        await service.import_(short_tmp / "junk")
    (short_tmp / "empty").mkdir()
    with pytest.raises(InvalidArgument, match=r"neither index\.json nor manifest\.json"):
        await service.import_(short_tmp / "empty")
    bad = _hostile_tar(short_tmp / "bad.tar", {"index.json": b"{nope"})
    with pytest.raises(ManifestInvalid, match="not valid JSON"):
        await service.import_(bad)
    _assert_nothing_stored(paths, service)


def _multi_platform_layout(root: Path) -> dict[str, str]:
    """A layout whose one named entry is an index of an amd64 and an arm64 image."""
    writer = LayoutWriter(root)
    digests = {}
    for arch in ("amd64", "arm64"):
        blob, diff = _layer(f"etc/{arch}", arch.encode())
        config = {**_config([diff]), "architecture": arch}
        digests[arch] = writer.add_image(
            ref_name=arch,
            config=config,
            layers=[(OCI_LAYER_GZIP, blob)],
            platform=PlatformSpec("linux", arch, "v8" if arch == "arm64" else None),
        )
    writer.write_index()
    nested = (root / "index.json").read_bytes()
    desc = writer.add_blob(nested, OCI_INDEX)
    desc["annotations"] = {"org.opencontainers.image.ref.name": "example.local/multi:1"}
    top = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}
    (root / "index.json").write_text(json.dumps(top))
    return digests


async def test_import_picks_the_platform_from_a_nested_index(paths: Paths, short_tmp: Path) -> None:
    digests = _multi_platform_layout(short_tmp / "layout")
    service = ImageService(paths)
    (image,) = await service.import_(
        short_tmp / "layout", platform=PlatformSpec.parse("linux/arm64")
    )
    assert image.manifest_digest == digests["arm64"]
    assert str(image.platform) == "linux/arm64"
    assert service.content.has(digests["arm64"]) and not service.content.has(digests["amd64"])
    with pytest.raises(ImageNotFound, match="no manifest for linux/s390x"):
        await service.import_(short_tmp / "layout", platform=PlatformSpec.parse("linux/s390x"))


async def test_hostile_layer_undoes_the_whole_import(paths: Paths, short_tmp: Path) -> None:
    good, good_diff = _layer("etc/good", b"good")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    evil = raw.getvalue()
    writer = LayoutWriter(short_tmp / "layout")
    writer.add_image(
        ref_name="example.local/evil:1",
        config=_config([good_diff, sha256_digest(evil)]),
        layers=[(OCI_LAYER_GZIP, good), (OCI_LAYER_TAR, evil)],
    )
    writer.write_index()
    service = ImageService(paths)
    with pytest.raises(PathTraversal):
        await service.import_(short_tmp / "layout")
    _assert_nothing_stored(paths, service)
    assert not (paths.snapshots / "escape").exists()
    assert os.listdir(paths.snapshots / "tmp") == []


async def test_wasm_artifact_with_empty_config_gets_the_wasm_platform(
    paths: Paths, short_tmp: Path
) -> None:
    module = b"\0asm\x01\0\0\0"
    writer = LayoutWriter(short_tmp / "layout")
    writer.add_image(
        ref_name="example.local/empty-config:1",
        config={},
        config_media_type=WASM_CONFIG,
        layers=[(WASM_LAYER, module)],
    )
    writer.write_index()
    service = ImageService(paths)
    (image,) = await service.import_(short_tmp / "layout")
    assert image.kind == "wasm"
    assert image.platform == PlatformSpec("wasip1", "wasm")
    assert [layer.digest for layer in image.layers] == [sha256_digest(module)]


async def test_container_image_without_a_platform_is_refused(paths: Paths, short_tmp: Path) -> None:
    blob, diff_id = _layer("etc/x", b"x")
    writer = LayoutWriter(short_tmp / "layout")
    writer.add_image(
        ref_name="example.local/no-platform:1",
        config={"rootfs": {"type": "layers", "diff_ids": [diff_id]}},
        layers=[(OCI_LAYER_GZIP, blob)],
    )
    writer.write_index()
    service = ImageService(paths)
    with pytest.raises(ManifestInvalid, match="lacks os/architecture"):
        await service.import_(short_tmp / "layout")
    _assert_nothing_stored(paths, service)
