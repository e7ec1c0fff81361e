"""The image service: pull, import, index, unpack, verify and collect, for one root.

It ties the registry client (``pull``), the content store, the snapshot store and
the metadata index together, as containerd's image service does. A pulled or
imported image is indexed only after its blobs are verified and its layers are
unpacked, so an index entry always names a usable image. Blobs and snapshots are
freed only when no index entry references them (``remove``, ``gc``).
"""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from ..errors import (
    ImageError,
    ImageNotFound,
    ImagePullFailed,
    InvalidArgument,
    SnapshotInUse,
    StorageError,
)
from ..platform import MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Paths
from ..storage import (
    ContentStore,
    ImageRecord,
    MetadataStore,
    Rootfs,
    SnapshotStore,
    validate_digest,
)
from ._extract import ExtractBudget, unpack_layers
from ._import import stage_archive
from ._mediatypes import ARCHIVE_LAYERS
from ._model import Image, ImageConfig, Layer, PlatformSpec
from ._reference import Reference

if TYPE_CHECKING:
    from ._model import ProgressCallback

__all__ = ["GcResult", "ImageService", "ImageSummary", "PullPolicy", "VerifyResult"]

PullPolicy = Literal["IfNotPresent", "Always", "Never"]
_POLICIES = ("IfNotPresent", "Always", "Never")
STALE_INGEST_AGE = 3600.0
"""Seconds after which gc drops an interrupted download instead of keeping it to resume."""


@dataclass(frozen=True, slots=True)
class ImageSummary:
    """One line of ``image ls``."""

    reference: str
    manifest_digest: str
    kind: str
    platform: str
    size: int
    created: str | None
    pulled: float


@dataclass(frozen=True, slots=True)
class GcResult:
    """What ``gc`` freed."""

    blobs: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()
    ingests: tuple[str, ...] = ()
    bytes_freed: int = 0


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What ``verify`` found: blobs that were fine, repaired, or still broken."""

    reference: str
    ok: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()
    broken: tuple[str, ...] = ()
    """Corrupt or missing blobs that could not be fetched again (removed if corrupt)."""
    error: str | None = None
    """Why the repair failed, when it did."""

    @property
    def healthy(self) -> bool:
        return not self.broken


@dataclass(slots=True)
class _Freed:
    blobs: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    bytes: int = 0


class ImageService:
    """Images of one magikrun root.

    ```python
    images = ImageService(Paths.resolve(root))
    image = await images.pull("127.0.0.1:5000/demo/busybox:1")
    rootfs = await images.prepare_rootfs(image, "ctr-1")
    ```
    """

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.content = ContentStore(paths)
        self.snapshots = SnapshotStore(paths)
        self.metadata = MetadataStore(paths)

    # -- pulling and importing ---------------------------------------------------

    async def pull(
        self,
        ref: str,
        *,
        platform: PlatformSpec | str | None = None,
        creds: str | None = None,
        auth_file: str | None = None,
        plain_http: bool | None = None,
        progress: ProgressCallback | None = None,
        policy: PullPolicy = "IfNotPresent",
    ) -> Image:
        """Make ``ref`` available locally and return it.

        ``IfNotPresent`` answers from the index when the image is there (no network);
        ``Always`` asks the registry; ``Never`` only looks locally (``ImageNotFound``).
        Layers are unpacked into snapshots (each diff_id once, also across concurrent
        pulls) before the image is indexed.
        """
        if policy not in _POLICIES:
            raise InvalidArgument(
                f"invalid pull policy {policy!r}", hint=f"use one of {', '.join(_POLICIES)}"
            )
        reference = Reference.parse(ref)
        wanted = PlatformSpec.parse(platform) if isinstance(platform, str) else platform
        if policy != "Always":
            cached = self._lookup(reference.normalized)
            if cached is not None and (wanted is None or _same_platform(cached.platform, wanted)):
                if self._unpacked(cached):
                    return cached
                async with self.metadata.lease():
                    if self._has_blobs(cached):
                        await self._unpack(cached)
                        return cached
            if policy == "Never":
                raise ImageNotFound(
                    f"image {reference} is not in the local store and the pull policy is Never",
                    hint="pull it with policy IfNotPresent or Always, or import it",
                    reference=reference.normalized,
                )
        from ._pull import pull as registry_pull  # the registry client (httpx) only to pull

        async with self.metadata.lease():
            image = await registry_pull(
                reference,
                self.content,
                platform=wanted,
                creds=creds,
                auth_file=auth_file,
                plain_http=plain_http,
                progress=progress,
            )
            await self._unpack(image)
            self._record(image, _blobs_of(image))
        return image

    async def import_(
        self,
        path: str | os.PathLike[str],
        *,
        reference: str | None = None,
        platform: PlatformSpec | None = None,
    ) -> list[Image]:
        """Import an OCI layout (directory or tar) or ``docker save`` archive.

        Every blob is verified on the way into the store and every layer unpacked; if
        anything fails, what this import added is removed again.
        """
        async with self.metadata.lease():
            async with stage_archive(
                path, self.content, reference=reference, platform=platform
            ) as staged:
                created: list[str] = []
                try:
                    for item in staged:
                        await self._unpack(item.image, created)
                except BaseException as exc:
                    for key in created:
                        try:
                            if self.metadata.snapshot_refcount(key) == 0:
                                await self.snapshots.remove(key)
                        except Exception as cleanup:  # noqa: BLE001 - attached to the original
                            exc.add_note(f"removing snapshot {key} failed: {cleanup!r}")
                    raise
                for item in staged:
                    self._record(item.image, item.blobs)
        return [item.image for item in staged]

    async def _unpack(self, image: Image, created: builtins.list[str] | None = None) -> None:
        """Unpack the image's archive layers (in parallel), adding the snapshots it creates
        to ``created`` as each commits (so a caller can undo them after a failure)."""
        await unpack_layers(
            self.snapshots,
            [layer for layer in image.layers if layer.media_type in ARCHIVE_LAYERS],
            lambda layer: self.content.open(layer.digest),
            budget=ExtractBudget(),
            created=created,
        )

    def _record(self, image: Image, blobs: Iterable[str]) -> None:
        size = 0
        kept = []
        for digest in sorted(set(blobs)):
            size += self.content.size(digest)
            kept.append(digest)
        created = image.annotations.get("org.opencontainers.image.created")
        self.metadata.put_image(
            ImageRecord(
                reference=image.reference,
                manifest_digest=image.manifest_digest,
                config_digest=image.config_digest,
                platform=str(image.platform),
                kind=image.kind,
                size=size,
                created=created if isinstance(created, str) else None,
                pulled=time.time(),
                document=_dump_image(image),
                blobs=tuple(kept),
                snapshots=tuple(
                    sorted({x.diff_id for x in image.layers if x.media_type in ARCHIVE_LAYERS})
                ),
            )
        )

    # -- looking --------------------------------------------------------------

    def _lookup(self, normalized: str) -> Image | None:
        record = self.metadata.get_image(normalized)
        return None if record is None else _load_image(record.document)

    def _find(self, ref: str) -> ImageRecord:
        record = None
        if ref.startswith("sha256:"):
            matches = self.metadata.find_by_digest(validate_digest(ref))
            record = matches[0] if matches else None
        else:
            record = self.metadata.get_image(Reference.parse(ref).normalized)
        if record is None:
            raise ImageNotFound(
                f"image {ref} is not in the local store",
                hint="list images with 'magikrun image ls'; pull it with 'magikrun image pull'",
                reference=ref,
            )
        return record

    def get(self, ref: str) -> Image:
        """The stored image for ``ref`` (a reference, or a manifest digest)."""
        return _load_image(self._find(ref).document)

    def list(self) -> list[ImageSummary]:
        return [
            ImageSummary(
                reference=r.reference,
                manifest_digest=r.manifest_digest,
                kind=r.kind,
                platform=r.platform,
                size=r.size,
                created=r.created,
                pulled=r.pulled,
            )
            for r in self.metadata.list_images()
        ]

    def inspect(self, ref: str) -> dict[str, Any]:
        """Manifest, config, layers and sizes of a stored image, JSON-ready."""
        record = self._find(ref)
        image = _load_image(record.document)
        manifest = json.loads(self.content.read(record.manifest_digest, max_size=MAX_MANIFEST_SIZE))
        config = json.loads(self.content.read(record.config_digest, max_size=MAX_CONFIG_SIZE))
        return {
            "reference": record.reference,
            "manifest_digest": record.manifest_digest,
            "config_digest": record.config_digest,
            "platform": record.platform,
            "kind": record.kind,
            "size": record.size,
            "created": record.created,
            "pulled": record.pulled,
            "layers": [
                {
                    "digest": layer.digest,
                    "media_type": layer.media_type,
                    "size": layer.size,
                    "diff_id": layer.diff_id,
                    "unpacked": self.snapshots.has(layer.diff_id)
                    if layer.media_type in ARCHIVE_LAYERS
                    else None,
                }
                for layer in image.layers
            ],
            "manifest": manifest,
            "config": config,
        }

    def open_blob(self, digest: str) -> BinaryIO:
        """A binary file of a stored blob (a wasm module, say); the caller closes it."""
        return self.content.open(digest)

    async def prepare_rootfs(self, image: Image, key: str, *, readonly: bool = False) -> Rootfs:
        """A root filesystem of ``image``'s layers for container ``key`` (an overlay with a
        private upper dir); ``Rootfs.remove()`` releases it."""
        diff_ids = [x.diff_id for x in image.layers if x.media_type in ARCHIVE_LAYERS]
        missing = [d for d in diff_ids if not self.snapshots.has(d)]
        if missing:
            raise ImageError(
                f"image {image.reference} has {len(missing)} layer(s) not unpacked "
                f"(first: {missing[0]})",
                hint=f"pull it again: 'magikrun image pull {image.reference}'",
                reference=image.reference,
            )
        return await self.snapshots.prepare_rootfs(key, diff_ids, readonly=readonly)

    # -- removing and collecting ---------------------------------------------

    async def remove(self, ref: str) -> GcResult:
        """Drop ``ref`` from the index and free the blobs and snapshots nothing else uses."""
        async with self.metadata.lease(exclusive=True):
            record = self._find(ref)
            self.metadata.remove_image(record.reference)
            freed = _Freed()
            self._free_blobs(record.blobs, freed)
            await self._free_snapshots(record.snapshots, freed)
        return GcResult(
            blobs=tuple(freed.blobs), snapshots=tuple(freed.snapshots), bytes_freed=freed.bytes
        )

    async def gc(self) -> GcResult:
        """Free unreferenced blobs and snapshots, and interrupted downloads gone stale."""
        async with self.metadata.lease(exclusive=True):
            freed = _Freed()
            self._free_blobs(self.content.list(), freed)
            await self._free_snapshots(self.snapshots.list(), freed)
            ingests = self._free_ingests(freed)
        return GcResult(
            blobs=tuple(freed.blobs),
            snapshots=tuple(freed.snapshots),
            ingests=tuple(ingests),
            bytes_freed=freed.bytes,
        )

    def _free_blobs(self, candidates: Iterable[str], freed: _Freed) -> None:
        keep = self.metadata.referenced_blobs()
        for digest in list(candidates):
            if digest in keep:
                continue
            with suppress(StorageError):
                size = self.content.size(digest)
                if self.content.delete(digest):
                    freed.blobs.append(digest)
                    freed.bytes += size

    async def _free_snapshots(self, candidates: Iterable[str], freed: _Freed) -> None:
        """Remove unreferenced snapshots; one a live root filesystem stacks stays."""
        keep = self.metadata.referenced_snapshots()
        for key in list(candidates):
            if key in keep or not self.snapshots.has(key):
                continue
            with suppress(SnapshotInUse):
                await self.snapshots.remove(key)
                freed.snapshots.append(key)

    def _free_ingests(self, freed: _Freed) -> builtins.list[str]:
        removed = []
        cutoff = time.time() - STALE_INGEST_AGE
        with suppress(FileNotFoundError), os.scandir(self.paths.ingest) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(entry.name)
                    freed.bytes += st.st_size
        return sorted(removed)

    # -- verifying -----------------------------------------------------------

    async def verify(self, ref: str) -> VerifyResult:
        """Re-hash every blob of ``ref``; remove corrupt ones and fetch them again when
        the image's registry is reachable, else report them."""
        record = self._find(ref)
        image = _load_image(record.document)
        ok, bad = [], []
        for digest in record.blobs:
            if self.content.has(digest) and self.content.verify(digest):
                ok.append(digest)
            else:
                bad.append(digest)
        if not bad:
            return VerifyResult(reference=record.reference, ok=tuple(ok))
        pinned = Reference.parse(record.reference)
        pinned = pinned.with_digest(record.manifest_digest)
        from ._pull import pull as registry_pull

        try:
            async with self.metadata.lease():
                await registry_pull(pinned, self.content, platform=image.platform)
                await self._unpack(image)
        except (ImagePullFailed, ImageNotFound) as exc:
            return VerifyResult(
                reference=record.reference, ok=tuple(ok), broken=tuple(bad), error=exc.message
            )
        repaired = tuple(d for d in bad if self.content.has(d))
        broken = tuple(d for d in bad if not self.content.has(d))
        return VerifyResult(
            reference=record.reference, ok=tuple(ok), repaired=repaired, broken=broken
        )

    # -- helpers -------------------------------------------------------------

    def _unpacked(self, image: Image) -> bool:
        return all(
            self.snapshots.has(x.diff_id) for x in image.layers if x.media_type in ARCHIVE_LAYERS
        )

    def _has_blobs(self, image: Image) -> bool:
        return all(self.content.has(d) for d in _blobs_of(image))


def _blobs_of(image: Image) -> list[str]:
    return [image.manifest_digest, image.config_digest, *(x.digest for x in image.layers)]


def _same_platform(a: PlatformSpec, b: PlatformSpec) -> bool:
    return (a.os, a.architecture) == (b.os, b.architecture) and (
        b.variant is None or a.variant == b.variant
    )


def _dump_image(image: Image) -> str:
    return json.dumps(asdict(image), sort_keys=True, separators=(",", ":"))


def _load_image(document: str) -> Image:
    doc = json.loads(document)
    cfg = doc["config"]
    return Image(
        reference=doc["reference"],
        manifest_digest=doc["manifest_digest"],
        config_digest=doc["config_digest"],
        platform=PlatformSpec(**doc["platform"]),
        config=ImageConfig(
            entrypoint=tuple(cfg["entrypoint"]),
            cmd=tuple(cfg["cmd"]),
            env=tuple(cfg["env"]),
            working_dir=cfg["working_dir"],
            user=cfg["user"],
            labels=dict(cfg["labels"]),
            exposed_ports=tuple(cfg["exposed_ports"]),
            stop_signal=cfg["stop_signal"],
        ),
        layers=tuple(Layer(**layer) for layer in doc["layers"]),
        kind=doc["kind"],
        annotations=dict(doc["annotations"]),
    )
