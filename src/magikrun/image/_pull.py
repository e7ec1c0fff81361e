"""Pull an image from a registry into the content store.

Resolve the reference to one platform's manifest, check it and its config against
the limits and the spec's types, and download config and layers concurrently (one
process-wide bound, one download per digest). Indexing and unpacking are the image
service's job; a pull only leaves verified blobs behind.
"""

from __future__ import annotations

import asyncio
import json
import weakref

import httpx

from ..errors import (
    ImageNotFound,
    ImagePullFailed,
    MagikrunError,
    MagikrunTimeout,
    ManifestInvalid,
    UnsupportedMediaType,
)
from ..platform import (
    IMAGE_PULL_TIMEOUT,
    MAX_CONFIG_SIZE,
    MAX_INFLIGHT_BLOBS,
    MAX_LAYER_SIZE,
    MAX_WASM_MODULE_SIZE,
)
from ..storage import ContentStore
from ._layout import build_image, parse_index, parse_manifest, platform_key, select_platform
from ._mediatypes import INDEX_TYPES, MANIFEST_TYPES, WASM_LAYER
from ._model import Descriptor, Image, PlatformSpec, ProgressCallback
from ._reference import Reference
from ._registry import FetchedManifest, RegistryClient

__all__ = ["pull"]

_inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _blob_slots() -> asyncio.Semaphore:
    """The process-wide MAX_INFLIGHT_BLOBS bound (one per event loop, as semaphores are)."""
    loop = asyncio.get_running_loop()
    slots = _inflight.get(loop)
    if slots is None:
        slots = _inflight[loop] = asyncio.Semaphore(MAX_INFLIGHT_BLOBS)
    return slots


def _is_index(fetched: FetchedManifest) -> bool:
    """Index or manifest: by Content-Type, else by the document's own ``mediaType``."""
    if fetched.media_type in INDEX_TYPES | MANIFEST_TYPES:
        return fetched.media_type in INDEX_TYPES
    try:
        declared = json.loads(fetched.data).get("mediaType")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ManifestInvalid(f"manifest {fetched.digest} is not a JSON object") from None
    if declared not in INDEX_TYPES | MANIFEST_TYPES:
        raise UnsupportedMediaType(
            f"manifest {fetched.digest} has media type {str(declared)[:100]!r} "
            f"(Content-Type {fetched.media_type[:100]!r}); expected an OCI or Docker manifest "
            "or index",
            digest=fetched.digest,
        )
    return declared in INDEX_TYPES


async def pull(
    ref: Reference | str,
    store: ContentStore,
    *,
    platform: PlatformSpec | None = None,
    creds: str | None = None,
    auth_file: str | None = None,
    plain_http: bool | None = None,
    progress: ProgressCallback | None = None,
    allow_foreign_layers: bool = False,
    timeout: float = IMAGE_PULL_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Image:
    """Pull ``ref`` into ``store`` and return the Image it describes.

    ```python
    image = await pull("127.0.0.1:5000/demo/busybox:1", ContentStore(paths))
    ```

    Parameters:
    * ``platform`` — which entry of an image index to take; default the host's.
    * ``creds`` — ``USER:PASSWORD``; otherwise credentials come from ``auth_file`` or
      ``$DOCKER_CONFIG/config.json`` / ``~/.docker/config.json``.
    * ``plain_http`` — see RegistryClient; loopback registries use HTTP by default.
    * ``progress`` — called with a ProgressEvent per chunk of every blob.
    * ``allow_foreign_layers`` — fetch layers that name ``urls`` from there (without
      credentials); refused otherwise.
    * ``timeout`` — seconds for the whole pull.
    """
    reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
    try:
        async with asyncio.timeout(timeout):
            async with RegistryClient.for_reference(
                reference,
                creds=creds,
                auth_file=auth_file,
                plain_http=plain_http,
                transport=transport,
            ) as client:
                return await _pull(
                    client, reference, store, platform, progress, allow_foreign_layers
                )
    except TimeoutError as exc:
        if isinstance(exc, MagikrunError):
            raise
        raise MagikrunTimeout(
            f"pulling {reference} took longer than {timeout:g} seconds",
            reference=str(reference),
        ) from exc


async def _pull(
    client: RegistryClient,
    ref: Reference,
    store: ContentStore,
    platform: PlatformSpec | None,
    progress: ProgressCallback | None,
    allow_foreign_layers: bool,
) -> Image:
    fetched = await client.get_manifest(ref)
    if _is_index(fetched):
        entry = select_platform(
            parse_index(fetched.data),
            platform or PlatformSpec.host(),
            explicit=platform is not None,
            reference=str(ref),
        )
        store.put(fetched.data, expected=fetched.digest)
        fetched = await client.get_manifest(ref.with_digest(entry.digest))
        if _is_index(fetched):
            raise UnsupportedMediaType(
                f"image {ref} nests an index inside an index", reference=str(ref)
            )
    manifest = parse_manifest(fetched.data)
    if fetched.media_type in MANIFEST_TYPES and fetched.media_type != manifest.media_type:
        raise ManifestInvalid(
            f"registry says the manifest of {ref} is {fetched.media_type} but it declares "
            f"{manifest.media_type}",
            reference=str(ref),
        )
    foreign = [layer for layer in manifest.layers if layer.urls]
    if foreign and not allow_foreign_layers:
        raise ImagePullFailed(
            f"image {ref} has {len(foreign)} foreign layer(s) to be fetched from other hosts "
            f"({foreign[0].urls[0][:200]})",
            hint="allow foreign layers explicitly if you trust those hosts",
            reference=str(ref),
            digest=foreign[0].digest,
        )
    store.put(fetched.data, expected=fetched.digest)

    async def fetch(desc: Descriptor, max_size: int) -> None:
        async with _blob_slots():
            if desc.urls:
                await client.fetch_foreign(desc, store, max_size=max_size, progress=progress)
            else:
                await client.fetch_blob(
                    ref.repository, desc, store, max_size=max_size, progress=progress
                )

    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(fetch(manifest.config, MAX_CONFIG_SIZE))
            for layer in manifest.layers:
                limit = MAX_WASM_MODULE_SIZE if layer.media_type == WASM_LAYER else MAX_LAYER_SIZE
                tasks.create_task(fetch(layer, limit))
    except* MagikrunError as group:
        first, *others = group.exceptions
        for other in others:
            first.add_note(f"also: {type(other).__name__}: {other}")
        raise first from first.__cause__
    config = store.read(manifest.config.digest, max_size=MAX_CONFIG_SIZE)
    image = build_image(ref.normalized, fetched.digest, manifest, config)
    if platform is not None and platform_key(image.platform)[:2] != platform_key(platform)[:2]:
        raise ImageNotFound(
            f"image {ref} is for {image.platform}, not {platform}",
            hint="pull it without --platform, or pick an image built for that platform",
            reference=str(ref),
            platform=str(platform),
        )
    return image
