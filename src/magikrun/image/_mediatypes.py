"""OCI and Docker media types magikrun reads."""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

WASM_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
WASM_CONFIG = "application/vnd.wasm.config.v0+json"
"""The config media type of wasm OCI artifacts (as runwasi and wasm-to-oci write them)."""

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG, WASM_CONFIG})

TAR_LAYERS = frozenset({OCI_LAYER_TAR, OCI_LAYER_NONDIST_TAR})
GZIP_LAYERS = frozenset(
    {OCI_LAYER_GZIP, OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN_GZIP}
)
ZSTD_LAYERS = frozenset({OCI_LAYER_ZSTD, OCI_LAYER_NONDIST_ZSTD})
ARCHIVE_LAYERS = TAR_LAYERS | GZIP_LAYERS | ZSTD_LAYERS

ACCEPT_MANIFESTS = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))
"""The Accept header for manifest requests; without the OCI types a registry answers 404."""
