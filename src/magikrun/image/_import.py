"""``image import``: OCI image layouts (directory or tar) and ``docker save`` archives.

The archive is hostile input. Every name in it is checked (see ``_layout``), every
manifest and config is bounded and hashed against the digest that names it, and
every blob is streamed into the content store through a verifying writer. If any
of it fails, the blobs this import added are removed again: a failed import
leaves nothing behind. Recording and unpacking are the image service's job.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import (
    DigestMismatch,
    ImageTooLarge,
    InvalidArgument,
    InvalidReference,
    ManifestInvalid,
)
from ..platform import (
    MAX_CONFIG_SIZE,
    MAX_LAYER_SIZE,
    MAX_LAYERS,
    MAX_MANIFEST_SIZE,
    MAX_WASM_MODULE_SIZE,
)
from ..storage import ContentStore, sha256_digest
from ._layout import (
    CONTAINERD_NAME_ANNOTATION,
    REF_NAME_ANNOTATION,
    ArchiveSource,
    ParsedManifest,
    blob_name,
    build_image,
    canonical_json,
    copy_stream,
    open_archive,
    parse_index,
    parse_manifest,
    read_json,
    read_limited,
    safe_name,
    select_platform,
)
from ._mediatypes import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    WASM_LAYER,
)
from ._model import Descriptor, Image, PlatformSpec
from ._reference import Reference

__all__ = ["ImportedImage", "stage_archive"]

_HEX_NAME = re.compile(r"(?:blobs/sha256/)?([a-f0-9]{64})(?:\.json)?")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_INDEX_DEPTH = 2


@dataclass(frozen=True, slots=True)
class ImportedImage:
    """One image found in an archive, its blobs now in the content store."""

    image: Image
    blobs: tuple[str, ...]
    """Manifest, config and layer digests (what the image's index entry references)."""


@asynccontextmanager
async def stage_archive(
    path: str | os.PathLike[str],
    store: ContentStore,
    *,
    reference: str | None = None,
    platform: PlatformSpec | None = None,
) -> AsyncIterator[list[ImportedImage]]:
    """Copy every image of the archive at ``path`` into ``store``, verified, for the
    body to unpack and record; if anything fails (the body included), the blobs this
    import added are removed again.

    ``reference`` names the image when the archive does not (or renames it when the
    archive holds exactly one); ``platform`` picks from multi-platform indexes
    (default: the host's).
    """
    added: list[str] = []
    try:
        with open_archive(path) as source:
            if source.exists("index.json"):
                found = _read_layout(source, platform)
            elif source.exists("manifest.json"):
                found = _read_docker(source)
            else:
                raise InvalidArgument(
                    f"{os.fspath(path)} has neither index.json nor manifest.json",
                    hint="pass an OCI image layout (directory or tar) or a 'docker save' archive",
                    path=os.fspath(path),
                )
            named = _name_images(found, reference)
            for item in found:
                await _copy_layers(source, store, item, added)
                for data in item.small_blobs:
                    if not store.has(sha256_digest(data)):
                        added.append(store.put(data))
        yield named
    except BaseException as exc:
        for digest in added:
            try:
                store.delete(digest)
            except OSError as cleanup:
                exc.add_note(f"removing blob {digest} failed: {cleanup!r}")
        raise


@dataclass(slots=True)
class _Found:
    names: list[str]
    manifest_digest: str
    manifest: ParsedManifest
    config_data: bytes
    layer_names: tuple[str, ...]
    small_blobs: tuple[bytes, ...]
    """Manifest (and index) and config bytes, already checked against their digests."""


def _name_images(found: list[_Found], reference: str | None) -> list[ImportedImage]:
    if reference is not None:
        if len(found) != 1:
            raise InvalidArgument(
                f"the archive holds {len(found)} images; a reference can name only one",
                hint="import without a reference to use the names the archive gives",
            )
        found[0].names = [reference]
    result = []
    for item in found:
        if not item.names:
            raise InvalidArgument(
                "the archive does not name an image",
                hint="give it a name: 'magikrun image import PATH REF'",
            )
        for name in item.names:
            try:
                normalized = Reference.parse(name).normalized
            except InvalidReference as exc:
                raise InvalidReference(
                    f"the archive names an image {name[:100]!r}, which is not a valid reference",
                    hint="give it a name: 'magikrun image import PATH REF'",
                    reference=name[:100],
                ) from exc
            image = build_image(normalized, item.manifest_digest, item.manifest, item.config_data)
            for layer in image.layers:
                if layer.media_type == OCI_LAYER_TAR and layer.digest != layer.diff_id:
                    raise DigestMismatch(
                        f"uncompressed layer {layer.digest} does not match its diff_id "
                        f"{layer.diff_id} in the image config",
                        digest=layer.digest,
                        actual=layer.diff_id,
                    )
            digests = {sha256_digest(b) for b in item.small_blobs}
            digests.update(layer.digest for layer in image.layers)
            result.append(ImportedImage(image=image, blobs=tuple(sorted(digests))))
    return result


def _read_verified(source: ArchiveSource, desc: Descriptor, limit: int, what: str) -> bytes:
    name = blob_name(desc.digest)
    data = read_limited(source, name, limit, what)
    actual = sha256_digest(data)
    if actual != desc.digest or len(data) != desc.size:
        raise DigestMismatch(
            f"{what} {desc.digest} in the archive hashes to {actual} ({len(data)} bytes)",
            digest=desc.digest,
            actual=actual,
        )
    return data


def _read_layout(source: ArchiveSource, platform: PlatformSpec | None) -> list[_Found]:
    entries = parse_index(read_limited(source, "index.json", MAX_MANIFEST_SIZE, "index"))
    found = []
    for entry in entries:
        # A ref.name may be a bare tag ("v1"); only a name with a repository is usable.
        name = entry.annotations.get(CONTAINERD_NAME_ANNOTATION) or entry.annotations.get(
            REF_NAME_ANNOTATION
        )
        names = [name] if name and ("/" in name or ":" in name) else []
        desc, extra = _select_manifest(source, entry, platform, 0)
        data = _read_verified(source, desc, MAX_MANIFEST_SIZE, "manifest")
        manifest = parse_manifest(data)
        config = _read_verified(source, manifest.config, MAX_CONFIG_SIZE, "config")
        found.append(
            _Found(
                names=names,
                manifest_digest=desc.digest,
                manifest=manifest,
                config_data=config,
                layer_names=tuple(blob_name(d.digest) for d in manifest.layers),
                small_blobs=(*extra, data, config),
            )
        )
    return found


def _select_manifest(
    source: ArchiveSource, desc: Descriptor, platform: PlatformSpec | None, depth: int
) -> tuple[Descriptor, tuple[bytes, ...]]:
    """Follow nested indexes down to the manifest for ``platform`` (as a pull picks)."""
    if desc.media_type in MANIFEST_TYPES:
        return desc, ()
    if desc.media_type not in INDEX_TYPES or depth >= _MAX_INDEX_DEPTH:
        raise ManifestInvalid(
            f"index entry {desc.digest} has media type {desc.media_type!r}, not an image "
            "manifest or index (or indexes nest too deeply)",
            digest=desc.digest,
        )
    data = _read_verified(source, desc, MAX_MANIFEST_SIZE, "index")
    chosen = select_platform(
        parse_index(data),
        platform or PlatformSpec.host(),
        explicit=platform is not None,
        reference=desc.digest,
    )
    manifest, extra = _select_manifest(source, chosen, platform, depth + 1)
    return manifest, (data, *extra)


def _read_docker(source: ArchiveSource) -> list[_Found]:
    """A ``docker save`` archive: ``manifest.json`` names configs and layer tars."""
    doc = read_json(source, "manifest.json", MAX_MANIFEST_SIZE, "docker manifest.json")
    if not isinstance(doc, list) or not doc:
        raise ManifestInvalid("docker manifest.json is not a non-empty list")
    found = []
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise ManifestInvalid(f"docker manifest.json entry {i} is not an object")
        config_name = safe_name(_string(entry.get("Config"), f"entry {i} Config"))
        tags = entry.get("RepoTags") or []
        layer_names = entry.get("Layers")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ManifestInvalid(f"docker manifest.json entry {i} RepoTags is not a string list")
        if not isinstance(layer_names, list):
            raise ManifestInvalid(f"docker manifest.json entry {i} has no Layers list")
        if len(layer_names) > MAX_LAYERS:
            raise ImageTooLarge(f"image has {len(layer_names)} layers, over the limit {MAX_LAYERS}")
        config = read_limited(source, config_name, MAX_CONFIG_SIZE, "config")
        config_digest = sha256_digest(config)
        _check_named_digest(config_name, config_digest)
        layers = []
        names = []
        for j, raw in enumerate(layer_names):
            name = safe_name(_string(raw, f"entry {i} layer {j}"))
            digest, size, media_type = _hash_layer(source, name)
            _check_named_digest(name, digest)
            layers.append(Descriptor(media_type=media_type, digest=digest, size=size))
            names.append(name)
        manifest_doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in layers
            ],
        }
        manifest_data = canonical_json(manifest_doc)
        found.append(
            _Found(
                names=list(tags),
                manifest_digest=sha256_digest(manifest_data),
                manifest=parse_manifest(manifest_data),
                config_data=config,
                layer_names=tuple(names),
                small_blobs=(manifest_data, config),
            )
        )
    return found


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ManifestInvalid(f"docker manifest.json {what} is not a string")
    return value


def _check_named_digest(name: str, digest: str) -> None:
    """Names like ``blobs/sha256/<hex>`` or ``<hex>.json`` promise a digest: hold them to it."""
    match = _HEX_NAME.fullmatch(name)
    if match is not None and f"sha256:{match.group(1)}" != digest:
        raise DigestMismatch(
            f"archive entry {name!r} hashes to {digest}", digest=f"sha256:{match.group(1)}"
        )


def _hash_layer(source: ArchiveSource, name: str) -> tuple[str, int, str]:
    """Digest, size and media type (by magic number) of a docker-save layer file."""
    size = source.size(name)
    if size > MAX_LAYER_SIZE:
        raise ImageTooLarge(f"layer {name!r} is {size} bytes, over the {MAX_LAYER_SIZE}-byte limit")
    h = hashlib.sha256()
    with source.open(name) as f:
        head = f.read(4)
        h.update(head)
        copy_stream(f, h.update, MAX_LAYER_SIZE)
    if head.startswith(_GZIP_MAGIC):
        media_type = OCI_LAYER_GZIP
    elif head.startswith(_ZSTD_MAGIC):
        media_type = OCI_LAYER_ZSTD
    else:
        media_type = OCI_LAYER_TAR
    return "sha256:" + h.hexdigest(), size, media_type


async def _copy_layers(
    source: ArchiveSource, store: ContentStore, item: _Found, added: list[str]
) -> None:
    for desc, name in zip(item.manifest.layers, item.layer_names, strict=True):
        limit = MAX_WASM_MODULE_SIZE if desc.media_type == WASM_LAYER else MAX_LAYER_SIZE
        async with store.ingest(desc.digest, size=desc.size, max_size=limit) as writer:
            if writer is None:
                continue
            writer.reset()
            with source.open(name) as f:
                copy_stream(f, writer.write, limit)
            writer.commit()
            added.append(desc.digest)
