"""Storage: content-addressed blobs, unpacked-layer snapshots, metadata. Owns bytes and
records; never parses image formats."""

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
