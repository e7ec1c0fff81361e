"""Every size, count and time limit magikrun enforces, in one place.

The figures are the seed's security table. Each is enforced where the data it
bounds enters magikrun (a registry response, a tar entry, an API argument).
"""

from __future__ import annotations

__all__ = [
    "CNI_PLUGIN_TIMEOUT",
    "CONTAINER_START_TIMEOUT",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MEMORY_BYTES",
    "DEFAULT_WASM_FUEL",
    "EXEC_TIMEOUT",
    "IMAGE_PULL_TIMEOUT",
    "INFRA_EVENT_QUEUE",
    "INFRA_MESSAGE_MAX",
    "INFRA_READY_TIMEOUT",
    "KVM_PROBE_TIMEOUT",
    "KVM_RAW_PROBE_BUDGET",
    "MAX_CONFIG_SIZE",
    "MAX_CONTAINERS",
    "MAX_CONTAINER_ID_LEN",
    "MAX_FILES_PER_LAYER",
    "MAX_IMAGE_REF_LEN",
    "MAX_INFLIGHT_BLOBS",
    "MAX_INIT_OUTPUT_BYTES",
    "MAX_INIT_OUTPUT_LINES",
    "MAX_LAYERS",
    "MAX_LAYER_SIZE",
    "MAX_MANIFEST_SIZE",
    "MAX_MEMORY_BYTES",
    "MAX_PATH_DEPTH",
    "MAX_PATH_LEN",
    "MAX_POD_CONTAINERS",
    "MAX_POD_ENV_VARS",
    "MAX_POD_SPEC_DEPTH",
    "MAX_POD_SPEC_EXPANDED",
    "MAX_POD_SPEC_NODES",
    "MAX_POD_SPEC_SIZE",
    "MAX_POD_STRING_LEN",
    "MAX_POD_VOLUMES",
    "MAX_ROOTFS_SIZE",
    "MAX_SYMLINK_DEPTH",
    "MAX_USER_DB_SIZE",
    "MAX_VCPUS",
    "MAX_VM_MEMORY_MIB",
    "MAX_WASM_MEMORY_PAGES",
    "MAX_WASM_MODULE_SIZE",
    "MIN_MEMORY_BYTES",
    "POD_ROLLBACK_TIMEOUT",
    "RESTART_BACKOFF_BASE",
    "RESTART_BACKOFF_CAP",
    "TOOL_VERSION_TIMEOUT",
    "VM_BOOT_TIMEOUT",
    "VM_CONTROL_MAX_FRAME",
    "VM_CONTROL_TIMEOUT",
    "VM_EXEC_MAX_OUTPUT",
    "VM_LOG_MAX_LINES",
    "WASM_CACHE_MAX_AGE",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MAX_IMAGE_REF_LEN = 512
"""Bytes in an image reference."""
MAX_LAYER_SIZE = 512 * MiB
"""Compressed bytes of one layer blob."""
MAX_ROOTFS_SIZE = 4 * GiB
"""Extracted bytes of one image's layers together."""
MAX_LAYERS = 128
"""Layers in one image."""
MAX_FILES_PER_LAYER = 100_000
"""Entries in one layer archive (inode exhaustion)."""
MAX_MANIFEST_SIZE = 1 * MiB
"""Bytes of a manifest or image index."""
MAX_CONFIG_SIZE = 1 * MiB
"""Bytes of an image config blob."""
MAX_CONTAINERS = 1024
"""Containers one magikrun root holds."""
MAX_CONTAINER_ID_LEN = 128
"""Bytes of a container id."""
MAX_WASM_MODULE_SIZE = 256 * MiB
"""Bytes of a WebAssembly module."""
MAX_WASM_MEMORY_PAGES = 65_536
"""64 KiB pages of linear memory a module may grow to (4 GiB)."""
DEFAULT_WASM_FUEL = 1_000_000_000
"""Fuel units (about one per instruction) a module gets unless told otherwise."""
MAX_VM_MEMORY_MIB = 4096
"""Memory of one microVM."""
MAX_VCPUS = 8
"""vCPUs of one microVM."""
DEFAULT_MEMORY_BYTES = 256 * MiB
"""Container memory when the spec sets none."""
MAX_MEMORY_BYTES = 8 * GiB
"""Container memory a spec may ask for."""
IMAGE_PULL_TIMEOUT = 300.0
"""Seconds one pull may take, network included."""
CONTAINER_START_TIMEOUT = 60.0
"""Seconds a container may take from create to running."""
DEFAULT_GRACE_PERIOD = 30.0
"""Seconds between SIGTERM and SIGKILL on stop."""
EXEC_TIMEOUT = 300.0
"""Seconds one exec may run."""
MAX_INFLIGHT_BLOBS = 256
"""Blob downloads in flight at once, across all pulls of one process."""
MAX_SYMLINK_DEPTH = 40
"""Links followed while resolving one path inside a root filesystem (as Linux's ELOOP)."""
MAX_POD_SPEC_SIZE = 1 * MiB
"""Bytes of one Pod manifest file (the Pod with its ConfigMaps and Secrets)."""
MAX_POD_SPEC_NODES = 100_000
"""Values in a parsed manifest, counting each YAML alias use again (alias bombs)."""
MAX_POD_SPEC_DEPTH = 64
"""Nesting depth of a parsed manifest."""
MAX_POD_SPEC_EXPANDED = 8 * MiB
"""Characters of all strings in a parsed manifest, counting each YAML alias use again."""
MAX_POD_STRING_LEN = 256 * KiB
"""Characters of one string in a manifest (a ConfigMap value, an env value, an argument)."""
MAX_POD_CONTAINERS = 64
"""Containers and init containers of one pod together."""
MAX_POD_VOLUMES = 256
"""Volumes of one pod (and volume mounts of one container)."""
MAX_POD_ENV_VARS = 1024
"""Environment variables of one container, after envFrom is expanded."""
MIN_MEMORY_BYTES = 6 * MiB
"""Container memory a spec may ask for at least (below it the runtime itself cannot start)."""
MAX_USER_DB_SIZE = 4 * MiB
"""Bytes of an image's /etc/passwd or /etc/group read to resolve a user name."""
KVM_PROBE_TIMEOUT = 10.0
"""Seconds a probe boot of the guest kernel under KVM may take to print its banner."""
KVM_RAW_PROBE_BUDGET = 1.0
"""Seconds of guest time the raw KVM probe gets (hardware KVM needs about a millisecond)."""
TOOL_VERSION_TIMEOUT = 5.0
"""Seconds a backend program (crun, qemu, ...) may take to answer ``--version``."""
CNI_PLUGIN_TIMEOUT = 30.0
"""Seconds one CNI plugin call (ADD, DEL, CHECK) may take."""
MAX_PATH_LEN = 4096
"""Bytes of one layer entry's path or link target (Linux's PATH_MAX)."""
MAX_PATH_DEPTH = 256
"""Components of one layer entry's path: bounds the recursion over extracted trees."""
VM_BOOT_TIMEOUT = 60.0
"""Seconds a microVM may take from launch to its init reporting ready (TCG boots take ~2-4 s)."""
VM_CONTROL_MAX_FRAME = 4 * MiB
"""Bytes of one message on a microVM's control channel (one JSON line)."""
VM_CONTROL_TIMEOUT = 30.0
"""Seconds a control request to a microVM's init may take unless the request says otherwise."""
VM_EXEC_MAX_OUTPUT = 1 * MiB
"""Bytes of stdout (and of stderr) one exec in a microVM returns; more is cut and flagged."""
VM_LOG_MAX_LINES = 10_000
"""Log records a microVM's init keeps per process (older ones are dropped, and counted)."""
MAX_INIT_OUTPUT_LINES = 20
"""Last lines of a failed init container's output its error carries (its log is rolled back)."""
MAX_INIT_OUTPUT_BYTES = 4 * KiB
"""Bytes of those lines together (cut at line boundaries)."""
POD_ROLLBACK_TIMEOUT = 120.0
"""Seconds undoing a failed pod start may take before the rest is left to ``system gc``."""
RESTART_BACKOFF_BASE = 1.0
"""Seconds before a pod's supervisor restarts a container the first time (doubling after)."""
RESTART_BACKOFF_CAP = 10.0
"""The longest wait between restarts of one container."""
WASM_CACHE_MAX_AGE = 30 * 24 * 3600.0
"""Seconds a compiled wasm module may go unused before ``sweep_module_cache`` removes it."""
INFRA_MESSAGE_MAX = 64 * KiB
"""Bytes of one newline-delimited JSON message between the host and a pod's infra program."""
INFRA_EVENT_QUEUE = 256
"""Events queued per infra extension; more are dropped, counted and reported to it."""
INFRA_READY_TIMEOUT = 30.0
"""Seconds a pod's infra program may take to start its extensions and report ready."""
