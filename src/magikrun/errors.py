"""The one error hierarchy of magikrun.

Every error says what went wrong (``str(err)``) and what the user can do
(``err.hint``), and carries its subject (a container id, a digest, a path) as
attributes so that callers need not parse messages::

    MagikrunError
    ├── InvalidArgument                 caller passed a malformed value (misuse)
    ├── LimitExceeded                   input over one of the limits in magikrun.platform
    ├── ContainerError
    │   ├── InvalidContainerId
    │   ├── ContainerNotFound
    │   ├── ContainerExists
    │   ├── ContainerLimitReached
    │   ├── InvalidState
    │   └── CreateFailed
    ├── ImageError
    │   ├── InvalidReference
    │   ├── ImageNotFound
    │   ├── ImagePullFailed
    │   │   ├── RegistryAuthError
    │   │   └── ManifestInvalid
    │   ├── UnsupportedMediaType
    │   ├── ImageTooLarge               (also a LimitExceeded)
    │   └── UnsafeLayer
    │       └── PathTraversal
    ├── BundleError
    │   ├── BundleBuildFailed
    │   ├── InvalidBundle
    │   └── UnsafeRootfsPath            a path inside a root filesystem leads out of it or loops
    ├── BackendError
    │   ├── RuntimeUnavailable
    │   ├── NotSupported
    │   ├── BackendFailed
    │   │   └── VmBootFailed            a microVM died or missed its boot deadline
    │   └── VmControlError              a microVM's control channel refused or broke a request
    ├── PodError
    │   ├── InvalidPodSpec              a Pod manifest is malformed or asks for what we refuse
    │   │   └── PodSpecTooLarge         (also a LimitExceeded)
    │   ├── PodNetworkError             a CNI plugin or network namespace step failed
    │   ├── PodNotFound
    │   ├── PodExists
    │   ├── PodStartFailed              run_pod failed; everything it made was undone
    │   ├── RollbackFailed              undoing a failed step failed too (carries both)
    │   └── InfraExtensionFailed        a pod's infra extension is unknown or failed to start
    ├── StorageError
    │   ├── InvalidDigest
    │   ├── BlobNotFound
    │   ├── DigestMismatch
    │   ├── StorageFull
    │   ├── SnapshotNotFound
    │   ├── SnapshotInUse
    │   └── RootfsExists
    └── MagikrunTimeout                 (also a builtin TimeoutError)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendError",
    "BackendFailed",
    "BlobNotFound",
    "BundleBuildFailed",
    "BundleError",
    "ContainerError",
    "ContainerExists",
    "ContainerLimitReached",
    "ContainerNotFound",
    "CreateFailed",
    "DigestMismatch",
    "ImageError",
    "ImageNotFound",
    "ImagePullFailed",
    "ImageTooLarge",
    "InfraExtensionFailed",
    "InvalidArgument",
    "InvalidBundle",
    "InvalidContainerId",
    "InvalidDigest",
    "InvalidPodSpec",
    "InvalidReference",
    "InvalidState",
    "LimitExceeded",
    "MagikrunError",
    "MagikrunTimeout",
    "ManifestInvalid",
    "NotSupported",
    "PathTraversal",
    "PodError",
    "PodExists",
    "PodNetworkError",
    "PodNotFound",
    "PodSpecTooLarge",
    "PodStartFailed",
    "RegistryAuthError",
    "RollbackFailed",
    "RootfsExists",
    "RuntimeUnavailable",
    "SnapshotInUse",
    "SnapshotNotFound",
    "StorageError",
    "StorageFull",
    "UnsafeLayer",
    "UnsafeRootfsPath",
    "UnsupportedMediaType",
    "VmBootFailed",
    "VmControlError",
]


class MagikrunError(Exception):
    """Root of every error magikrun raises on purpose."""

    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None, **subject: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.subject = subject
        for key, value in subject.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form, as the CLI prints with ``--json``."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            **{k: str(v) for k, v in self.subject.items()},
        }


class InvalidArgument(MagikrunError):
    """Raised when a caller passes a malformed value (a misuse, not an operational failure)."""


class LimitExceeded(MagikrunError):
    """Raised when input goes over one of magikrun's security limits."""

    default_hint = "the input is larger than magikrun accepts; see magikrun.platform limits"


class ContainerError(MagikrunError):
    """Base of container lifecycle errors."""


class InvalidContainerId(ContainerError, InvalidArgument):
    """Raised when a container id is empty, too long or has characters outside [A-Za-z0-9_.-]."""

    default_hint = (
        "use 1-128 characters from letters, digits, '_', '.' and '-', not starting with '.'"
    )


class ContainerNotFound(ContainerError):
    """Raised when no container has the given id."""

    default_hint = "list containers with 'magikrun list'"


class ContainerExists(ContainerError):
    """Raised when creating a container whose id is taken."""

    default_hint = "pick another id or delete the existing container first"


class ContainerLimitReached(ContainerError, LimitExceeded):
    """Raised when MAX_CONTAINERS containers already exist."""

    default_hint = "delete stopped containers ('magikrun delete ID') before creating more"


class InvalidState(ContainerError):
    """Raised when a lifecycle verb is not allowed in the container's current status."""


class CreateFailed(ContainerError):
    """Raised when a container could not be created; nothing of it is left."""


class ImageError(MagikrunError):
    """Base of image and registry errors."""


class InvalidReference(ImageError, InvalidArgument):
    """Raised when an image reference cannot be parsed or is too long."""

    default_hint = "use NAME[:TAG][@sha256:DIGEST], e.g. registry.example:5000/library/busybox:1.36"


class ImageNotFound(ImageError):
    """Raised when an image is neither in the local store nor (for pulls) in the registry."""

    default_hint = "pull it first with 'magikrun image pull REF' or check the name"


class ImagePullFailed(ImageError):
    """Raised when talking to a registry fails."""

    default_hint = "check the reference, the registry address and the network"


class RegistryAuthError(ImagePullFailed):
    """Raised when a registry refuses our credentials or asks for ones we do not have."""

    default_hint = "pass --creds USER:PASSWORD or log in so that ~/.docker/config.json has them"


class ManifestInvalid(ImagePullFailed):
    """Raised when a manifest, index or image config is malformed."""


class UnsupportedMediaType(ImageError):
    """Raised when an image uses a media type magikrun cannot handle."""


class ImageTooLarge(ImageError, LimitExceeded):
    """Raised when an image, layer, manifest or config is over its size or count limit."""


class UnsafeLayer(ImageError):
    """Raised when a layer archive holds an entry magikrun refuses to create."""

    default_hint = "the image is malformed or hostile; do not run it"


class PathTraversal(UnsafeLayer):
    """Raised when a layer entry would be created outside the root filesystem."""


class BundleError(MagikrunError):
    """Base of bundle errors."""


class BundleBuildFailed(BundleError):
    """Raised when a bundle cannot be built from an image."""


class InvalidBundle(BundleError):
    """Raised when a bundle directory or its config.json is malformed or unsafe."""


class UnsafeRootfsPath(BundleError):
    """Raised when a path resolved inside a root filesystem would leave it, loops through
    too many symbolic links or runs through a non-directory (``reason``: escape, links,
    notdir)."""

    reason: str


class BackendError(MagikrunError):
    """Base of errors of the execution backends (crun, wasmtime, QEMU)."""


class RuntimeUnavailable(BackendError):
    """Raised when the chosen backend cannot run on this machine."""


class NotSupported(BackendError):
    """Raised when the backend cannot do what was asked (e.g. exec into a wasm module)."""


class BackendFailed(BackendError):
    """Raised when a backend program or library reports an error."""


class VmBootFailed(BackendFailed):
    """Raised when a microVM exits, fails to start or misses its boot deadline before ready."""

    default_hint = "read the guest console log named in the error (it shows how far the boot got)"


class VmControlError(BackendError):
    """Raised when a microVM's init refuses a control request or the channel breaks."""

    default_hint = "the VM may have stopped; check its status and console log"


class PodError(MagikrunError):
    """Base of pod errors (manifests, pod networking)."""


class InvalidPodSpec(PodError):
    """Raised when a Pod manifest is malformed; ``field`` is the manifest path at fault."""

    default_hint = "fix the manifest field named in the message"


class PodSpecTooLarge(InvalidPodSpec, LimitExceeded):
    """Raised when a Pod manifest is over a size, count or nesting limit."""

    default_hint = "the manifest is larger than magikrun accepts; see magikrun.platform limits"


class PodNetworkError(PodError):
    """Raised when creating or tearing down a pod's network namespace or CNI attachment fails."""

    default_hint = "check the CNI plugins in /usr/lib/cni and that magikrun runs as root"


class PodNotFound(PodError):
    """Raised when no pod has the given name or id."""

    default_hint = "list pods with 'magikrun pod ls'"


class PodExists(PodError):
    """Raised when running a pod whose namespace/name is taken; the existing pod is untouched."""

    default_hint = "remove the existing pod first ('magikrun pod rm NAME') or rename the new one"


class PodStartFailed(PodError):
    """Raised when run_pod fails; ``container`` and ``step`` say where, ``undone`` lists undos;
    a failed init container adds its ``exit_code`` and last ``output``."""

    default_hint = "fix the cause named in the message; nothing of the pod was left behind"


class RollbackFailed(PodError):
    """Raised when undoing a failed pod start failed too; ``original`` and ``cleanup_errors``."""

    default_hint = "run 'magikrun system gc' to retry the cleanup of what was left"


class InfraExtensionFailed(PodError):
    """Raised when a pod's infra extension is unknown or its ``on_start`` failed; ``extension``."""

    default_hint = (
        "install the extension (entry point group magikrun.infra_extensions) or fix what "
        "its error names (its magikrun.io/infra-config.<name> annotation, what it reaches)"
    )


class StorageError(MagikrunError):
    """Base of content-store errors."""


class InvalidDigest(StorageError, InvalidArgument):
    """Raised when a digest is not 'sha256:' followed by 64 lowercase hex characters."""

    default_hint = "digests look like sha256:<64 lowercase hex characters>"


class BlobNotFound(StorageError):
    """Raised when a blob is not in the content store."""

    default_hint = "pull the image again"


class DigestMismatch(StorageError):
    """Raised when content does not hash to the digest it was announced with."""

    default_hint = "the registry or the file served corrupt or tampered content; nothing was stored"


class StorageFull(StorageError):
    """Raised when the disk under the magikrun root is full."""

    default_hint = "free disk space under the magikrun root, e.g. with 'magikrun system gc'"


class SnapshotNotFound(StorageError):
    """Raised when a layer's unpacked snapshot is not in the snapshot store."""

    default_hint = "unpack the image's layers first (pull or import the image again)"


class SnapshotInUse(StorageError):
    """Raised when removing a snapshot that a prepared root filesystem still stacks."""

    default_hint = "remove the containers (root filesystems) that use it first"


class RootfsExists(StorageError):
    """Raised when preparing a root filesystem under a key that is already taken."""

    default_hint = "pick another key or remove the existing root filesystem first"


class MagikrunTimeout(MagikrunError, TimeoutError):
    """Raised when an operation runs past its deadline; what it started has been stopped."""

    default_hint = "retry; if it keeps happening, raise the timeout or check the machine's load"
