"""Storage: content-addressed blobs, unpacked-layer snapshots, metadata. Owns bytes and
records; never parses image formats."""

import typing

from .. import _lazy

if typing.TYPE_CHECKING:
    from ._blobs import BlobWriter as BlobWriter
    from ._blobs import ContentStore as ContentStore
    from ._blobs import sha256_digest as sha256_digest
    from ._blobs import validate_digest as validate_digest
    from ._metadata import ImageRecord as ImageRecord
    from ._metadata import MetadataStore as MetadataStore
    from ._snapshots import Rootfs as Rootfs
    from ._snapshots import SnapshotStore as SnapshotStore

__all__ = [
    "BlobWriter",
    "ContentStore",
    "ImageRecord",
    "MetadataStore",
    "Rootfs",
    "SnapshotStore",
    "sha256_digest",
    "validate_digest",
]

__getattr__, __dir__ = _lazy.attach(
    __name__,
    {
        "._blobs": (
            "BlobWriter",
            "ContentStore",
            "sha256_digest",
            "validate_digest",
        ),
        "._metadata": (
            "ImageRecord",
            "MetadataStore",
        ),
        "._snapshots": (
            "Rootfs",
            "SnapshotStore",
        ),
    },
)
