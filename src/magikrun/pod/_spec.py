"""``PodSpec``: a Kubernetes ``v1 Pod`` manifest, validated, defaulted and resolved.

A manifest file may carry, beside exactly one Pod, the ``ConfigMap`` and ``Secret``
documents it uses, as ``podman kube play`` accepts. References to them (``env``,
``envFrom``, ``configMap``/``secret`` volumes) are resolved while parsing, so a missing key
fails before anything runs; only field references to values that exist once the pod runs
(``status.podIP``, ``status.hostIP``, ``spec.nodeName``, ``metadata.uid``) are left to
:func:`resolve_env`.

Fields magikrun does not honour are ignored without a warning, as ``podman kube play``
does, except the ones that would change what runs if they were ignored (``privileged``,
``hostPID``, probes, ``lifecycle`` hooks, other resources than cpu and memory, ...): setting
those is an error naming the field.

Example::

    spec = PodSpec.from_yaml(Path("pod.yaml").read_bytes())
    for container in spec.containers:
        print(container.name, container.image, container.image_pull_policy)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from ..errors import InvalidPodSpec, PodSpecTooLarge
from ..platform._limits import (
    DEFAULT_GRACE_PERIOD,
    MAX_CONTAINER_ID_LEN,
    MAX_IMAGE_REF_LEN,
    MAX_MEMORY_BYTES,
    MAX_POD_CONTAINERS,
    MAX_POD_ENV_VARS,
    MAX_POD_VOLUMES,
)
from ._manifest import (
    Obj,
    check_absolute_path,
    check_config_key,
    check_env_name,
    check_ip,
    check_label_map,
    check_port_name,
    check_relative_path,
    check_structure,
    fail,
    is_dns_label,
    is_dns_subdomain,
    is_env_name,
    is_hostname,
    load_documents,
)
from ._quantity import cpu_millicores, memory_bytes

__all__ = [
    "Capabilities",
    "ConfigMap",
    "ConfigMapVolume",
    "Container",
    "ContainerPort",
    "DnsConfig",
    "DnsOption",
    "DnsPolicy",
    "EmptyDirVolume",
    "EnvVar",
    "HostAlias",
    "HostPathType",
    "HostPathVolume",
    "KeyToPath",
    "ObjectMeta",
    "PodSpec",
    "ProjectedFile",
    "Protocol",
    "PullPolicy",
    "ResourceList",
    "Resources",
    "RestartPolicy",
    "RuntimeFields",
    "Secret",
    "SecretVolume",
    "SecurityContext",
    "Volume",
    "VolumeMount",
    "VolumeSource",
    "pod_id",
    "resolve_env",
]

DEFAULT_NAMESPACE = "default"
DEFAULT_TERMINATION_GRACE_PERIOD = int(DEFAULT_GRACE_PERIOD)
DEFAULT_CONFIG_MAP_MODE = 0o644
DEFAULT_SECRET_MODE = 0o400
"""Kubernetes defaults secret files to 0644; magikrun keeps them owner-only."""

_E = TypeVar("_E", bound=StrEnum)
_MAX_ID = 2**31 - 1
_MAX_NAMESERVERS = 3
_MAX_SEARCHES = 32
"""Kubernetes' limits for dnsConfig: what glibc's resolver reads."""
_POD_ID_READABLE_LEN = 63


class PullPolicy(StrEnum):
    """When to pull: the default is ``Always`` for ``:latest`` or untagged images."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class Protocol(StrEnum):
    """A container port's protocol (``TCP`` unless the manifest says otherwise)."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class RestartPolicy(StrEnum):
    """What the pod's monitor does when a container exits (``Always`` by default)."""

    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


class DnsPolicy(StrEnum):
    """Without a cluster DNS, ``ClusterFirst*`` behave as ``Default`` (the host's resolvers)."""

    CLUSTER_FIRST = "ClusterFirst"
    CLUSTER_FIRST_WITH_HOST_NET = "ClusterFirstWithHostNet"
    DEFAULT = "Default"
    NONE = "None"


class HostPathType(StrEnum):
    """What a hostPath must be, checked (or created) before the mount; unset checks nothing."""

    UNSET = ""
    DIRECTORY_OR_CREATE = "DirectoryOrCreate"
    DIRECTORY = "Directory"
    FILE_OR_CREATE = "FileOrCreate"
    FILE = "File"
    SOCKET = "Socket"
    CHAR_DEVICE = "CharDevice"
    BLOCK_DEVICE = "BlockDevice"


_RUNTIME_FIELDS = (
    "metadata.uid",
    "spec.nodeName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
)
_FIELD_REF = re.compile(r"metadata\.(labels|annotations)\['([^']*)'\]")


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectMeta:
    name: str
    namespace: str = DEFAULT_NAMESPACE
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    uid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvVar:
    """A resolved variable: ``value``, or a ``field_ref`` known only when the pod runs."""

    name: str
    value: str | None = None
    field_ref: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerPort:
    container_port: int
    host_port: int | None = None
    protocol: Protocol = Protocol.TCP
    name: str | None = None
    host_ip: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeMount:
    name: str
    mount_path: str
    read_only: bool = False
    sub_path: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceList:
    cpu_millicores: int | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """``limits`` become cgroup limits; ``requests`` (defaulting to the limits) are recorded."""

    limits: ResourceList = field(default_factory=ResourceList)
    requests: ResourceList = field(default_factory=ResourceList)


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """Capability names normalised to the ``CAP_`` form OCI uses (``ALL`` stays ``ALL``)."""

    add: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityContext:
    """The container's context, with the pod-level ``runAs*`` fields already applied."""

    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_non_root: bool | None = None
    read_only_root_filesystem: bool = False
    capabilities: Capabilities = field(default_factory=Capabilities)
    allow_privilege_escalation: bool | None = None
    privileged: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Container:
    name: str
    image: str
    image_pull_policy: PullPolicy
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    env: tuple[EnvVar, ...] = ()
    working_dir: str | None = None
    ports: tuple[ContainerPort, ...] = ()
    volume_mounts: tuple[VolumeMount, ...] = ()
    resources: Resources = field(default_factory=Resources)
    security_context: SecurityContext = field(default_factory=SecurityContext)

    def argv(
        self,
        entrypoint: Iterable[str] = (),
        cmd: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> tuple[str, ...]:
        """The process arguments over the image's ENTRYPOINT and CMD, as Kubernetes.

        ``command`` replaces ENTRYPOINT and drops CMD; ``args`` replaces CMD. ``$(VAR)``
        references to ``env`` are expanded, ``$$`` escapes a ``$``.
        """
        head = tuple(entrypoint) if self.command is None else self.command
        if self.args is not None:
            tail = self.args
        elif self.command is None:
            tail = tuple(cmd)
        else:
            tail = ()
        values = env or {}
        return tuple(expand_vars(arg, values) for arg in (*head, *tail))


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyToPath:
    key: str
    path: str
    mode: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectedFile:
    """One file of a configMap or secret volume, ready to be written (``path`` is relative)."""

    path: str
    data: bytes
    mode: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EmptyDirVolume:
    medium: str = ""
    """``""`` (on disk) or ``"Memory"`` (a tmpfs)."""
    size_limit_bytes: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPathVolume:
    path: str
    type: HostPathType = HostPathType.UNSET


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigMapVolume:
    name: str
    items: tuple[KeyToPath, ...] = ()
    default_mode: int = DEFAULT_CONFIG_MAP_MODE
    optional: bool = False
    files: tuple[ProjectedFile, ...] = ()
    """The files the volume holds, resolved from the manifest's ConfigMap."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretVolume:
    secret_name: str
    items: tuple[KeyToPath, ...] = ()
    default_mode: int = DEFAULT_SECRET_MODE
    optional: bool = False
    files: tuple[ProjectedFile, ...] = ()
    """The files the volume holds, resolved from the manifest's Secret."""


VolumeSource = EmptyDirVolume | HostPathVolume | ConfigMapVolume | SecretVolume


@dataclass(frozen=True, slots=True, kw_only=True)
class Volume:
    name: str
    source: VolumeSource


@dataclass(frozen=True, slots=True, kw_only=True)
class HostAlias:
    ip: str
    hostnames: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsOption:
    name: str
    value: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[DnsOption, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigMap:
    name: str
    data: Mapping[str, str] = field(default_factory=dict)
    binary_data: Mapping[str, bytes] = field(default_factory=dict)

    def get(self, key: str) -> bytes | None:
        if key in self.data:
            return self.data[key].encode()
        return self.binary_data.get(key)


@dataclass(frozen=True, slots=True, kw_only=True)
class Secret:
    name: str
    data: Mapping[str, bytes] = field(default_factory=dict)
    type: str = "Opaque"

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeFields:
    """Values of field references that exist only once the pod runs."""

    pod_ip: str = ""
    host_ip: str = ""
    node_name: str = ""
    pod_uid: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PodSpec:
    """A validated Pod. Build it with :meth:`from_yaml` or :meth:`from_dict`."""

    metadata: ObjectMeta
    containers: tuple[Container, ...]
    init_containers: tuple[Container, ...] = ()
    volumes: tuple[Volume, ...] = ()
    hostname: str | None = None
    host_aliases: tuple[HostAlias, ...] = ()
    dns_policy: DnsPolicy = DnsPolicy.CLUSTER_FIRST
    dns_config: DnsConfig | None = None
    host_network: bool = False
    share_process_namespace: bool = False
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    termination_grace_period_seconds: int = DEFAULT_TERMINATION_GRACE_PERIOD
    runtime_class_name: str | None = None
    config_maps: Mapping[str, ConfigMap] = field(default_factory=dict)
    """The ConfigMaps the manifest file carried beside the Pod."""
    secrets: Mapping[str, Secret] = field(default_factory=dict)
    """The Secrets the manifest file carried beside the Pod."""

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def id(self) -> str:
        """The pod id, see :func:`pod_id`."""
        return pod_id(self.metadata.namespace, self.metadata.name)

    @property
    def effective_hostname(self) -> str:
        """``spec.hostname``, else the pod name's first DNS label (as the kubelet)."""
        return self.hostname or self.metadata.name.split(".")[0][:63]

    @classmethod
    def from_yaml(cls, data: bytes, *, allow_privileged: bool = False) -> PodSpec:
        """Parse a manifest file: one ``v1 Pod`` plus any ``ConfigMap``/``Secret`` documents.

        Raises ``InvalidPodSpec`` naming the field at fault, ``PodSpecTooLarge`` over a limit.
        ``allow_privileged`` lets ``securityContext.privileged: true`` through.
        """
        pods: list[tuple[int, dict[str, Any]]] = []
        config_maps: list[dict[str, Any]] = []
        secrets: list[dict[str, Any]] = []
        for index, document in load_documents(data):
            kind = document.get("kind")
            api_version = document.get("apiVersion")
            where = f"document {index}"
            if kind not in ("Pod", "ConfigMap", "Secret"):
                raise InvalidPodSpec(
                    f"{where}: kind {kind!r} is not supported",
                    field="kind",
                    hint="a manifest holds one Pod and the ConfigMaps and Secrets it uses",
                )
            if api_version != "v1":
                raise InvalidPodSpec(
                    f"{where}: apiVersion {api_version!r} is not supported for {kind}",
                    field="apiVersion",
                    hint="use apiVersion: v1",
                )
            if kind == "Pod":
                pods.append((index, document))
            elif kind == "ConfigMap":
                config_maps.append(document)
            else:
                secrets.append(document)
        if len(pods) != 1:
            raise InvalidPodSpec(
                f"manifest holds {len(pods)} Pods, expected exactly one",
                field="kind",
                hint="put each pod in a file of its own",
            )
        return cls.from_dict(
            pods[0][1],
            config_maps=config_maps,
            secrets=secrets,
            allow_privileged=allow_privileged,
        )

    @classmethod
    def from_dict(
        cls,
        pod: Mapping[str, Any],
        *,
        config_maps: Iterable[Mapping[str, Any]] = (),
        secrets: Iterable[Mapping[str, Any]] = (),
        allow_privileged: bool = False,
    ) -> PodSpec:
        """Build from parsed documents (a Pod and the ConfigMap/Secret documents it uses)."""
        for document in (pod, *config_maps, *secrets):
            check_structure(document)
        maps = _index("ConfigMap", (_parse_config_map(Obj.of(d, "")) for d in config_maps))
        secs = _index("Secret", (_parse_secret(Obj.of(d, "")) for d in secrets))
        return _PodParser(maps, secs, allow_privileged).parse(Obj.of(pod, ""))

    def volume(self, name: str) -> Volume:
        """The volume named ``name`` (every mount's volume exists: the parser checked)."""
        for volume in self.volumes:
            if volume.name == name:
                return volume
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The Pod as a Kubernetes manifest (env resolved; see :meth:`to_yaml` for the rest)."""
        return _pod_to_dict(self)

    def to_yaml(self) -> bytes:
        """The manifest file again: the Pod, then its ConfigMaps and Secrets."""
        documents: list[dict[str, Any]] = [self.to_dict()]
        documents += [_config_map_to_dict(c) for c in self.config_maps.values()]
        documents += [_secret_to_dict(s) for s in self.secrets.values()]
        import yaml

        return yaml.safe_dump_all(documents, sort_keys=False).encode()


def pod_id(namespace: str, name: str) -> str:
    """The deterministic id of the pod ``namespace/name``, safe as a container id.

    ``namespace_name`` when that fits in 63 characters: readable in ``pod ls``, and
    unambiguous because DNS names never hold ``_``. Longer pairs (a name may have 253
    characters) become their first 47 characters, ``-`` and 16 hex digits of the pair's
    SHA-256: 64 characters, so never equal to a short form, and short enough to leave room
    for per-container suffixes within the 128-character container-id limit.
    """
    if not (is_dns_label(namespace) and is_dns_subdomain(name)):
        raise InvalidPodSpec(
            f"{namespace}/{name} is not a valid pod namespace/name", field="metadata.name"
        )
    readable = f"{namespace}_{name}"
    if len(readable) <= _POD_ID_READABLE_LEN:
        return readable
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:16]
    result = f"{readable[:47]}-{digest}"
    assert len(result) == _POD_ID_READABLE_LEN + 1 < MAX_CONTAINER_ID_LEN
    return result


def resolve_env(
    container: Container, spec: PodSpec, fields: RuntimeFields | None = None
) -> dict[str, str]:
    """The container's environment, with runtime field references filled in.

    Later variables may refer to earlier ones as ``$(NAME)``, as in Kubernetes.
    """
    values = fields or RuntimeFields()
    runtime = {
        "metadata.uid": spec.metadata.uid or values.pod_uid,
        "spec.nodeName": values.node_name,
        "status.hostIP": values.host_ip,
        "status.hostIPs": values.host_ip,
        "status.podIP": values.pod_ip,
        "status.podIPs": values.pod_ip,
    }
    env: dict[str, str] = {}
    for var in container.env:
        if var.field_ref is not None:
            env[var.name] = runtime[var.field_ref]
        else:
            env[var.name] = expand_vars(var.value or "", env)
    return env


_VAR_REF = re.compile(r"\$\$|\$\(([^)]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: unknown references stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


def _index(kind: str, objects: Iterable[ConfigMap | Secret]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for obj in objects:
        if obj.name in result:
            raise InvalidPodSpec(f"{kind} {obj.name!r} is defined twice", field="metadata.name")
        result[obj.name] = obj
    return result


def _meta_name(obj: Obj, kind: str) -> str:
    meta = obj.obj("metadata")
    if meta is None:
        raise fail("metadata.name", f"is required for a {kind}")
    name = meta.req_text("name")
    if not is_dns_subdomain(name):
        raise fail("metadata.name", f"{name!r} is not a valid {kind} name (a DNS-1123 subdomain)")
    return name


def _parse_config_map(obj: Obj) -> ConfigMap:
    name = _meta_name(obj, "ConfigMap")
    data = obj.text_map("data")
    binary: dict[str, bytes] = {}
    for key, value in obj.text_map("binaryData").items():
        binary[key] = _b64(value, obj.at(f"binaryData.{key}"))
    for key in (*data, *binary):
        check_config_key(key, f"ConfigMap {name}: data.{key}")
    return ConfigMap(name=name, data=data, binary_data=binary)


def _parse_secret(obj: Obj) -> Secret:
    name = _meta_name(obj, "Secret")
    data = {key: _b64(value, obj.at(f"data.{key}")) for key, value in obj.text_map("data").items()}
    data.update((k, v.encode()) for k, v in obj.text_map("stringData").items())
    for key in data:
        check_config_key(key, f"Secret {name}: data.{key}")
    return Secret(name=name, data=data, type=obj.text("type") or "Opaque")


def _b64(value: str, path: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise fail(path, "is not valid base64") from exc


_CAPABILITY = re.compile(r"[A-Z][A-Z0-9_]*")


def _capability(value: str, path: str) -> str:
    name = value.upper()
    if _CAPABILITY.fullmatch(name) is None:
        raise fail(path, f"{value!r} is not a capability name")
    if name == "ALL" or name.startswith("CAP_"):
        return name
    return f"CAP_{name}"


def _is_latest(image: str) -> bool:
    """True when ``image`` has no digest and its tag is ``latest`` or missing."""
    if "@" in image:
        return False
    last = image.rsplit("/", 1)[-1]
    return ":" not in last or last.rsplit(":", 1)[1] == "latest"


def _refuse(obj: Obj, key: str, reason: str) -> None:
    raise fail(obj.at(key), f"is not supported by magikrun ({reason})")


class _PodParser:
    """One parse: the pod's ConfigMaps and Secrets, and what the walk has seen so far."""

    def __init__(
        self,
        config_maps: dict[str, ConfigMap],
        secrets: dict[str, Secret],
        allow_privileged: bool,
    ) -> None:
        self.config_maps = config_maps
        self.secrets = secrets
        self.allow_privileged = allow_privileged
        self.metadata = ObjectMeta(name="")
        self.pod_security = SecurityContext()

    def parse(self, pod: Obj) -> PodSpec:
        meta = pod.obj("metadata")
        if meta is None:
            raise fail("metadata", "is required")
        self.metadata = self._metadata(meta)
        spec = pod.obj("spec")
        if spec is None:
            raise fail("spec", "is required")
        self._refuse_unsupported_pod_fields(spec)
        self.pod_security = self._pod_security(spec.obj("securityContext"))
        volumes = self._volumes(spec)
        volume_names = {v.name for v in volumes}
        init = self._containers(spec, "initContainers", volume_names)
        containers = self._containers(spec, "containers", volume_names)
        if not containers:
            raise fail(spec.at("containers"), "must hold at least one container")
        if len(init) + len(containers) > MAX_POD_CONTAINERS:
            raise PodSpecTooLarge(
                f"spec: {len(init) + len(containers)} containers are over the limit of"
                f" {MAX_POD_CONTAINERS}",
                field="spec.containers",
            )
        self._check_unique_names(spec, init, containers)
        self._check_host_ports(spec, containers)
        hostname = spec.text("hostname")
        if hostname is not None and not is_dns_label(hostname):
            raise fail(spec.at("hostname"), f"{hostname!r} is not a valid DNS-1123 label")
        dns_policy = self._enum(spec, "dnsPolicy", DnsPolicy, DnsPolicy.CLUSTER_FIRST)
        dns_config = self._dns_config(spec.obj("dnsConfig"))
        if dns_policy is DnsPolicy.NONE and dns_config is None:
            raise fail(spec.at("dnsConfig"), "is required when dnsPolicy is None")
        runtime_class = spec.text("runtimeClassName")
        if runtime_class is not None and not is_dns_subdomain(runtime_class):
            raise fail(spec.at("runtimeClassName"), f"{runtime_class!r} is not a valid name")
        grace = spec.integer("terminationGracePeriodSeconds", low=0, high=_MAX_ID)
        return PodSpec(
            metadata=self.metadata,
            containers=containers,
            init_containers=init,
            volumes=volumes,
            hostname=hostname,
            host_aliases=self._host_aliases(spec),
            dns_policy=dns_policy,
            dns_config=dns_config,
            host_network=spec.flag("hostNetwork") or False,
            share_process_namespace=spec.flag("shareProcessNamespace") or False,
            restart_policy=self._enum(spec, "restartPolicy", RestartPolicy, RestartPolicy.ALWAYS),
            termination_grace_period_seconds=(
                DEFAULT_TERMINATION_GRACE_PERIOD if grace is None else grace
            ),
            runtime_class_name=runtime_class,
            config_maps=self.config_maps,
            secrets=self.secrets,
        )

    @staticmethod
    def _enum(obj: Obj, key: str, enum: type[_E], default: _E) -> _E:
        value = obj.text(key)
        if value is None:
            return default
        try:
            return enum(value)
        except ValueError as exc:
            allowed = ", ".join(member.value for member in enum if member.value)
            raise fail(obj.at(key), f"{value!r} is not one of {allowed}") from exc

    def _metadata(self, meta: Obj) -> ObjectMeta:
        name = meta.req_text("name")
        if not is_dns_subdomain(name):
            raise fail(meta.at("name"), f"{name!r} is not a valid DNS-1123 subdomain")
        namespace = meta.text("namespace") or DEFAULT_NAMESPACE
        if not is_dns_label(namespace):
            raise fail(meta.at("namespace"), f"{namespace!r} is not a valid DNS-1123 label")
        labels = meta.text_map("labels")
        check_label_map(labels, meta.at("labels"), check_values=True)
        annotations = meta.text_map("annotations")
        check_label_map(annotations, meta.at("annotations"), check_values=False)
        return ObjectMeta(
            name=name,
            namespace=namespace,
            labels=labels,
            annotations=annotations,
            uid=meta.text("uid"),
        )

    def _refuse_unsupported_pod_fields(self, spec: Obj) -> None:
        for key in ("hostPID", "hostIPC"):
            if spec.flag(key):
                _refuse(spec, key, "pods never share the host's PID or IPC namespace")
        if spec.flag("hostUsers") is False:
            _refuse(spec, "hostUsers", "user namespaces")
        if spec.get("ephemeralContainers"):
            _refuse(spec, "ephemeralContainers", "ephemeral containers")
        if spec.has("activeDeadlineSeconds"):
            _refuse(spec, "activeDeadlineSeconds", "pod deadlines")

    def _pod_security(self, ctx: Obj | None) -> SecurityContext:
        if ctx is None:
            return SecurityContext()
        for key in ("fsGroup", "sysctls", "supplementalGroups"):
            if ctx.get(key) not in (None, [], {}):
                _refuse(ctx, key, "volume ownership, sysctls and extra groups")
        self._check_seccomp(ctx)
        return SecurityContext(
            run_as_user=ctx.integer("runAsUser", low=0, high=_MAX_ID),
            run_as_group=ctx.integer("runAsGroup", low=0, high=_MAX_ID),
            run_as_non_root=ctx.flag("runAsNonRoot"),
        )

    @staticmethod
    def _check_seccomp(ctx: Obj) -> None:
        profile = ctx.obj("seccompProfile")
        if profile is not None and profile.text("type") not in (None, "RuntimeDefault"):
            _refuse(profile, "type", "only the RuntimeDefault seccomp profile")

    def _volumes(self, spec: Obj) -> tuple[Volume, ...]:
        volumes: list[Volume] = []
        seen: set[str] = set()
        for obj in spec.objs("volumes", limit=MAX_POD_VOLUMES):
            name = obj.req_text("name")
            if not is_dns_label(name):
                raise fail(obj.at("name"), f"{name!r} is not a valid DNS-1123 label")
            if name in seen:
                raise fail(obj.at("name"), f"volume {name!r} is declared twice")
            seen.add(name)
            volumes.append(Volume(name=name, source=self._volume_source(obj)))
        return tuple(volumes)

    def _volume_source(self, obj: Obj) -> VolumeSource:
        known = {"emptyDir", "hostPath", "configMap", "secret"}
        given = [key for key, value in obj.data.items() if key != "name" and value is not None]
        unknown = [key for key in given if key not in known]
        if unknown:
            raise fail(
                obj.at(str(unknown[0])),
                "is not a supported volume type",
                hint="use emptyDir, hostPath, configMap or secret volumes",
            )
        if len(given) > 1:
            raise fail(obj.path, f"sets more than one volume type ({', '.join(given)})")
        if not given or given[0] == "emptyDir":
            return self._empty_dir(obj.obj("emptyDir"))
        kind = given[0]
        source = obj.obj(kind)
        assert source is not None
        if kind == "hostPath":
            path = source.req_text("path")
            check_absolute_path(path, source.at("path"))
            kind_enum = self._enum(source, "type", HostPathType, HostPathType.UNSET)
            return HostPathVolume(path=path, type=kind_enum)
        items = self._items(source)
        mode = source.integer("defaultMode", low=0, high=0o777)
        optional = source.flag("optional") or False
        if kind == "configMap":
            name = source.req_text("name")
            cm_files = self._project(
                source, self.config_maps.get(name), "ConfigMap", name, items, mode, optional
            )
            return ConfigMapVolume(
                name=name,
                items=items,
                default_mode=DEFAULT_CONFIG_MAP_MODE if mode is None else mode,
                optional=optional,
                files=cm_files,
            )
        secret_name = source.req_text("secretName")
        files = self._project(
            source, self.secrets.get(secret_name), "Secret", secret_name, items, mode, optional
        )
        return SecretVolume(
            secret_name=secret_name,
            items=items,
            default_mode=DEFAULT_SECRET_MODE if mode is None else mode,
            optional=optional,
            files=files,
        )

    @staticmethod
    def _empty_dir(obj: Obj | None) -> EmptyDirVolume:
        if obj is None:
            return EmptyDirVolume()
        medium = obj.text("medium") or ""
        if medium not in ("", "Memory"):
            raise fail(obj.at("medium"), f"{medium!r} is not one of '', Memory")
        limit = obj.get("sizeLimit")
        size = None if limit is None else memory_bytes(limit, obj.at("sizeLimit"))
        return EmptyDirVolume(medium=medium, size_limit_bytes=size)

    @staticmethod
    def _items(source: Obj) -> tuple[KeyToPath, ...]:
        items: list[KeyToPath] = []
        for item in source.objs("items", limit=MAX_POD_VOLUMES):
            key = item.req_text("key")
            path = item.req_text("path")
            check_relative_path(path, item.at("path"))
            mode = item.integer("mode", low=0, high=0o777)
            items.append(KeyToPath(key=key, path=path, mode=mode))
        return tuple(items)

    @staticmethod
    def _project(
        source: Obj,
        obj: ConfigMap | Secret | None,
        kind: str,
        name: str,
        items: tuple[KeyToPath, ...],
        mode: int | None,
        optional: bool,
    ) -> tuple[ProjectedFile, ...]:
        default = (
            mode
            if mode is not None
            else (DEFAULT_SECRET_MODE if kind == "Secret" else DEFAULT_CONFIG_MAP_MODE)
        )
        if obj is None:
            if optional:
                return ()
            raise fail(
                source.path,
                f"{kind} {name!r} is not in the manifest",
                hint=f"add the {kind} as another document of the same file, or mark it optional",
            )
        if not items:
            keys = obj.data.keys() | (
                obj.binary_data.keys() if isinstance(obj, ConfigMap) else set()
            )
            return tuple(
                ProjectedFile(path=key, data=obj.get(key) or b"", mode=default)
                for key in sorted(keys)
            )
        files: list[ProjectedFile] = []
        for index, item in enumerate(items):
            data = obj.get(item.key)
            if data is None:
                if optional:
                    continue
                raise fail(
                    f"{source.at('items')}[{index}].key",
                    f"{kind} {name!r} has no key {item.key!r}",
                )
            mode_ = item.mode if item.mode is not None else default
            files.append(ProjectedFile(path=item.path, data=data, mode=mode_))
        return tuple(files)

    def _containers(self, spec: Obj, key: str, volume_names: set[str]) -> tuple[Container, ...]:
        init = key == "initContainers"
        return tuple(
            self._container(obj, volume_names, init=init)
            for obj in spec.objs(key, limit=MAX_POD_CONTAINERS)
        )

    def _container(self, obj: Obj, volume_names: set[str], *, init: bool) -> Container:
        name = obj.req_text("name")
        if not is_dns_label(name):
            raise fail(obj.at("name"), f"{name!r} is not a valid DNS-1123 label")
        for key in ("lifecycle", "livenessProbe", "startupProbe", "volumeDevices"):
            if obj.has(key):
                _refuse(obj, key, "probes, lifecycle hooks and block devices")
        if obj.has("restartPolicy"):
            _refuse(obj, "restartPolicy", "sidecar containers")
        image = obj.req_text("image")
        if not image or len(image) > MAX_IMAGE_REF_LEN or any(c.isspace() for c in image):
            raise fail(obj.at("image"), f"{image!r} is not a valid image reference")
        default_policy = PullPolicy.ALWAYS if _is_latest(image) else PullPolicy.IF_NOT_PRESENT
        working_dir = obj.text("workingDir")
        if working_dir is not None:
            check_absolute_path(working_dir, obj.at("workingDir"))
        return Container(
            name=name,
            image=image,
            image_pull_policy=self._enum(obj, "imagePullPolicy", PullPolicy, default_policy),
            command=obj.texts("command"),
            args=obj.texts("args"),
            env=self._env(obj),
            working_dir=working_dir,
            ports=self._ports(obj),
            volume_mounts=self._mounts(obj, volume_names),
            resources=self._resources(obj.obj("resources")),
            security_context=self._security(obj.obj("securityContext")),
        )

    def _env(self, obj: Obj) -> tuple[EnvVar, ...]:
        env: dict[str, EnvVar] = {}
        for source in obj.objs("envFrom", limit=MAX_POD_ENV_VARS):
            for name, value in self._env_from(source):
                env[name] = EnvVar(name=name, value=value)
        for var in obj.objs("env", limit=MAX_POD_ENV_VARS):
            name = var.req_text("name")
            check_env_name(name, var.at("name"))
            resolved = self._env_var(var, name)
            if resolved is not None:
                env.pop(name, None)
                env[name] = resolved
        if len(env) > MAX_POD_ENV_VARS:
            raise PodSpecTooLarge(
                f"{obj.at('env')}: {len(env)} variables are over the limit of {MAX_POD_ENV_VARS}",
                field=obj.at("env"),
            )
        return tuple(env.values())

    def _env_from(self, source: Obj) -> list[tuple[str, str]]:
        prefix = source.text("prefix") or ""
        refs = [(k, source.obj(k)) for k in ("configMapRef", "secretRef") if source.has(k)]
        if len(refs) != 1:
            raise fail(source.path, "must set exactly one of configMapRef, secretRef")
        key, ref = refs[0]
        assert ref is not None
        name = ref.req_text("name")
        optional = ref.flag("optional") or False
        found: ConfigMap | Secret | None = (
            self.config_maps.get(name) if key == "configMapRef" else self.secrets.get(name)
        )
        kind = "ConfigMap" if key == "configMapRef" else "Secret"
        if found is None:
            if optional:
                return []
            raise fail(ref.at("name"), f"{kind} {name!r} is not in the manifest")
        keys = list(found.data)
        if isinstance(found, ConfigMap):
            keys += list(found.binary_data)
        result: list[tuple[str, str]] = []
        for data_key in keys:
            if not is_env_name(prefix + data_key):
                continue  # Kubernetes skips keys that are no valid variable name, too.
            result.append((prefix + data_key, self._text(found.get(data_key), ref, data_key)))
        return result

    def _env_var(self, var: Obj, name: str) -> EnvVar | None:
        value_from = var.obj("valueFrom")
        if value_from is None:
            return EnvVar(name=name, value=var.text("value") or "")
        if var.has("value"):
            raise fail(var.at("value"), "may not be set together with valueFrom")
        refs = [
            k
            for k in ("fieldRef", "configMapKeyRef", "secretKeyRef", "resourceFieldRef")
            if value_from.has(k)
        ]
        if len(refs) != 1:
            raise fail(
                value_from.path,
                "must set exactly one of fieldRef, configMapKeyRef, secretKeyRef",
            )
        kind = refs[0]
        ref = value_from.obj(kind)
        assert ref is not None
        if kind == "resourceFieldRef":
            _refuse(value_from, kind, "resource field references")
        if kind == "fieldRef":
            return self._field_ref(ref, name)
        source_name = ref.req_text("name")
        key = ref.req_text("key")
        optional = ref.flag("optional") or False
        found: ConfigMap | Secret | None
        if kind == "configMapKeyRef":
            found, what = self.config_maps.get(source_name), "ConfigMap"
        else:
            found, what = self.secrets.get(source_name), "Secret"
        data = None if found is None else found.get(key)
        if data is None:
            if optional:
                return None
            missing = "is not in the manifest" if found is None else f"has no key {key!r}"
            raise fail(ref.at("key"), f"{what} {source_name!r} {missing}")
        return EnvVar(name=name, value=self._text(data, ref, key))

    @staticmethod
    def _text(data: bytes | None, ref: Obj, key: str) -> str:
        try:
            return (data or b"").decode()
        except UnicodeDecodeError as exc:
            raise fail(ref.path, f"the value of {key!r} is not UTF-8 text") from exc

    def _field_ref(self, ref: Obj, name: str) -> EnvVar:
        path = ref.req_text("fieldPath")
        meta = self.metadata
        direct = {"metadata.name": meta.name, "metadata.namespace": meta.namespace}
        if path in direct:
            return EnvVar(name=name, value=direct[path])
        if path == "metadata.uid" and meta.uid is not None:
            return EnvVar(name=name, value=meta.uid)
        if path in _RUNTIME_FIELDS:
            return EnvVar(name=name, field_ref=path)
        match = _FIELD_REF.fullmatch(path)
        if match is not None:
            values = meta.labels if match.group(1) == "labels" else meta.annotations
            return EnvVar(name=name, value=values.get(match.group(2), ""))
        raise fail(ref.at("fieldPath"), f"{path!r} is not a supported field")

    @staticmethod
    def _ports(obj: Obj) -> tuple[ContainerPort, ...]:
        ports: list[ContainerPort] = []
        for port in obj.objs("ports", limit=MAX_POD_VOLUMES):
            container_port = port.integer("containerPort", low=1, high=65535)
            if container_port is None:
                raise fail(port.at("containerPort"), "is required")
            host_port = port.integer("hostPort", low=0, high=65535) or None
            name = port.text("name")
            if name is not None:
                check_port_name(name, port.at("name"))
            host_ip = port.text("hostIP")
            ports.append(
                ContainerPort(
                    container_port=container_port,
                    host_port=host_port,
                    protocol=_PodParser._enum(port, "protocol", Protocol, Protocol.TCP),
                    name=name,
                    host_ip=None if host_ip is None else check_ip(host_ip, port.at("hostIP")),
                )
            )
        return tuple(ports)

    @staticmethod
    def _mounts(obj: Obj, volume_names: set[str]) -> tuple[VolumeMount, ...]:
        mounts: list[VolumeMount] = []
        seen: set[str] = set()
        for mount in obj.objs("volumeMounts", limit=MAX_POD_VOLUMES):
            name = mount.req_text("name")
            if name not in volume_names:
                raise fail(mount.at("name"), f"volume {name!r} is not declared in spec.volumes")
            path = mount.req_text("mountPath")
            check_absolute_path(path, mount.at("mountPath"))
            if path in seen:
                raise fail(mount.at("mountPath"), f"{path!r} is mounted twice")
            seen.add(path)
            sub_path = mount.text("subPath") or None
            if sub_path is not None:
                check_relative_path(sub_path, mount.at("subPath"))
            mounts.append(
                VolumeMount(
                    name=name,
                    mount_path=path,
                    read_only=mount.flag("readOnly") or False,
                    sub_path=sub_path,
                )
            )
        return tuple(mounts)

    @staticmethod
    def _resource_list(obj: Obj | None) -> ResourceList:
        if obj is None:
            return ResourceList()
        for key in obj.data:
            if key not in ("cpu", "memory"):
                _refuse(obj, str(key), "only cpu and memory resources")
        cpu = obj.get("cpu")
        memory = obj.get("memory")
        mem = None if memory is None else memory_bytes(memory, obj.at("memory"))
        if mem is not None and mem > MAX_MEMORY_BYTES:
            raise fail(obj.at("memory"), f"{memory} is over the limit of {MAX_MEMORY_BYTES} bytes")
        return ResourceList(
            cpu_millicores=None if cpu is None else cpu_millicores(cpu, obj.at("cpu")),
            memory_bytes=mem,
        )

    def _resources(self, obj: Obj | None) -> Resources:
        if obj is None:
            return Resources()
        limits = self._resource_list(obj.obj("limits"))
        requests = self._resource_list(obj.obj("requests"))
        requests = ResourceList(
            cpu_millicores=(
                limits.cpu_millicores
                if requests.cpu_millicores is None
                else requests.cpu_millicores
            ),
            memory_bytes=(
                limits.memory_bytes if requests.memory_bytes is None else requests.memory_bytes
            ),
        )
        for key in ("cpu_millicores", "memory_bytes"):
            limit, request = getattr(limits, key), getattr(requests, key)
            if limit is not None and request is not None and request > limit:
                field_name = "cpu" if key == "cpu_millicores" else "memory"
                raise fail(
                    obj.at(f"requests.{field_name}"), "must be less than or equal to the limit"
                )
        return Resources(limits=limits, requests=requests)

    def _security(self, ctx: Obj | None) -> SecurityContext:
        pod = self.pod_security
        if ctx is None:
            return pod
        self._check_seccomp(ctx)
        if ctx.text("procMount") not in (None, "Default"):
            _refuse(ctx, "procMount", "only the Default /proc mount")
        privileged = ctx.flag("privileged") or False
        if privileged and not self.allow_privileged:
            raise fail(
                ctx.at("privileged"),
                "true is refused",
                hint="privileged containers have full access to the host;"
                " pass allow_privileged=True (--allow-privileged) if you mean it",
            )
        caps = ctx.obj("capabilities")
        capabilities = Capabilities()
        if caps is not None:
            capabilities = Capabilities(
                add=tuple(_capability(v, p) for p, v in self._string_items(caps, "add")),
                drop=tuple(_capability(v, p) for p, v in self._string_items(caps, "drop")),
            )
        user = ctx.integer("runAsUser", low=0, high=_MAX_ID)
        group = ctx.integer("runAsGroup", low=0, high=_MAX_ID)
        non_root = ctx.flag("runAsNonRoot")
        result = SecurityContext(
            run_as_user=pod.run_as_user if user is None else user,
            run_as_group=pod.run_as_group if group is None else group,
            run_as_non_root=pod.run_as_non_root if non_root is None else non_root,
            read_only_root_filesystem=ctx.flag("readOnlyRootFilesystem") or False,
            capabilities=capabilities,
            allow_privilege_escalation=ctx.flag("allowPrivilegeEscalation"),
            privileged=privileged,
        )
        if result.run_as_non_root and result.run_as_user == 0:
            raise fail(ctx.at("runAsUser"), "0 contradicts runAsNonRoot: true")
        return result

    @staticmethod
    def _string_items(obj: Obj, key: str) -> list[tuple[str, str]]:
        values = obj.texts(key) or ()
        return [(f"{obj.at(key)}[{i}]", value) for i, value in enumerate(values)]

    @staticmethod
    def _check_unique_names(
        spec: Obj, init: tuple[Container, ...], containers: tuple[Container, ...]
    ) -> None:
        seen: set[str] = set()
        for key, group in (("initContainers", init), ("containers", containers)):
            for index, container in enumerate(group):
                if container.name in seen:
                    raise fail(
                        f"{spec.at(key)}[{index}].name",
                        f"container name {container.name!r} is used twice",
                    )
                seen.add(container.name)

    @staticmethod
    def _check_host_ports(spec: Obj, containers: tuple[Container, ...]) -> None:
        seen: set[tuple[int, Protocol, str | None]] = set()
        for c_index, container in enumerate(containers):
            for p_index, port in enumerate(container.ports):
                if port.host_port is None:
                    continue
                key = (port.host_port, port.protocol, port.host_ip)
                if key in seen:
                    raise fail(
                        f"{spec.at('containers')}[{c_index}].ports[{p_index}].hostPort",
                        f"{port.host_port}/{port.protocol} is used twice",
                    )
                seen.add(key)

    @staticmethod
    def _host_aliases(spec: Obj) -> tuple[HostAlias, ...]:
        aliases: list[HostAlias] = []
        for alias in spec.objs("hostAliases", limit=MAX_POD_VOLUMES):
            ip = check_ip(alias.req_text("ip"), alias.at("ip"))
            names = alias.texts("hostnames") or ()
            for index, name in enumerate(names):
                if not is_hostname(name):
                    raise fail(f"{alias.at('hostnames')}[{index}]", f"{name!r} is not a host name")
            aliases.append(HostAlias(ip=ip, hostnames=names))
        return tuple(aliases)

    @staticmethod
    def _dns_config(obj: Obj | None) -> DnsConfig | None:
        if obj is None:
            return None
        servers = tuple(
            check_ip(s, f"{obj.at('nameservers')}[{i}]")
            for i, s in enumerate(obj.texts("nameservers") or ())
        )
        if len(servers) > _MAX_NAMESERVERS:
            raise fail(obj.at("nameservers"), f"holds more than {_MAX_NAMESERVERS} addresses")
        searches = obj.texts("searches") or ()
        if len(searches) > _MAX_SEARCHES:
            raise fail(obj.at("searches"), f"holds more than {_MAX_SEARCHES} domains")
        for index, search in enumerate(searches):
            if not is_hostname(search):
                raise fail(f"{obj.at('searches')}[{index}]", f"{search!r} is not a domain")
        options: list[DnsOption] = []
        for option in obj.objs("options", limit=MAX_POD_VOLUMES):
            name = option.req_text("name")
            value = option.text("value")
            for key, text in (("name", name), ("value", value or "")):
                if any(c.isspace() for c in text):
                    raise fail(option.at(key), f"{text!r} must not contain whitespace")
            options.append(DnsOption(name=name, value=value))
        return DnsConfig(nameservers=servers, searches=searches, options=tuple(options))


def _drop_empty(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v not in (None, (), [], {}, "")}


def _resource_list_to_dict(resources: ResourceList) -> dict[str, Any]:
    return _drop_empty(
        {
            "cpu": None if resources.cpu_millicores is None else f"{resources.cpu_millicores}m",
            "memory": resources.memory_bytes,
        }
    )


def _container_to_dict(container: Container) -> dict[str, Any]:
    sc = container.security_context
    return _drop_empty(
        {
            "name": container.name,
            "image": container.image,
            "imagePullPolicy": container.image_pull_policy.value,
            "command": None if container.command is None else list(container.command),
            "args": None if container.args is None else list(container.args),
            "workingDir": container.working_dir,
            "env": [
                {"name": v.name, "value": v.value}
                if v.field_ref is None
                else {"name": v.name, "valueFrom": {"fieldRef": {"fieldPath": v.field_ref}}}
                for v in container.env
            ],
            "ports": [
                _drop_empty(
                    {
                        "containerPort": p.container_port,
                        "hostPort": p.host_port,
                        "protocol": p.protocol.value,
                        "name": p.name,
                        "hostIP": p.host_ip,
                    }
                )
                for p in container.ports
            ],
            "volumeMounts": [
                _drop_empty(
                    {
                        "name": m.name,
                        "mountPath": m.mount_path,
                        "readOnly": m.read_only or None,
                        "subPath": m.sub_path,
                    }
                )
                for m in container.volume_mounts
            ],
            "resources": _drop_empty(
                {
                    "limits": _resource_list_to_dict(container.resources.limits),
                    "requests": _resource_list_to_dict(container.resources.requests),
                }
            ),
            "securityContext": _drop_empty(
                {
                    "runAsUser": sc.run_as_user,
                    "runAsGroup": sc.run_as_group,
                    "runAsNonRoot": sc.run_as_non_root,
                    "readOnlyRootFilesystem": sc.read_only_root_filesystem or None,
                    "capabilities": _drop_empty(
                        {"add": list(sc.capabilities.add), "drop": list(sc.capabilities.drop)}
                    ),
                    "allowPrivilegeEscalation": sc.allow_privilege_escalation,
                    "privileged": sc.privileged or None,
                }
            ),
        }
    )


def _items_to_list(items: tuple[KeyToPath, ...]) -> list[dict[str, Any]]:
    return [_drop_empty({"key": i.key, "path": i.path, "mode": i.mode}) for i in items]


def _volume_to_dict(volume: Volume) -> dict[str, Any]:
    source = volume.source
    body: dict[str, Any]
    if isinstance(source, EmptyDirVolume):
        body = {
            "emptyDir": _drop_empty({"medium": source.medium, "sizeLimit": source.size_limit_bytes})
        }
    elif isinstance(source, HostPathVolume):
        body = {"hostPath": _drop_empty({"path": source.path, "type": source.type.value})}
    elif isinstance(source, ConfigMapVolume):
        body = {
            "configMap": _drop_empty(
                {
                    "name": source.name,
                    "items": _items_to_list(source.items),
                    "defaultMode": source.default_mode,
                    "optional": source.optional or None,
                }
            )
        }
    else:
        body = {
            "secret": _drop_empty(
                {
                    "secretName": source.secret_name,
                    "items": _items_to_list(source.items),
                    "defaultMode": source.default_mode,
                    "optional": source.optional or None,
                }
            )
        }
    return {"name": volume.name, **body}


def _pod_to_dict(spec: PodSpec) -> dict[str, Any]:
    meta = spec.metadata
    dns = spec.dns_config
    body = _drop_empty(
        {
            "containers": [_container_to_dict(c) for c in spec.containers],
            "initContainers": [_container_to_dict(c) for c in spec.init_containers],
            "volumes": [_volume_to_dict(v) for v in spec.volumes],
            "hostname": spec.hostname,
            "hostAliases": [
                {"ip": a.ip, "hostnames": list(a.hostnames)} for a in spec.host_aliases
            ],
            "dnsPolicy": spec.dns_policy.value,
            "dnsConfig": None
            if dns is None
            else _drop_empty(
                {
                    "nameservers": list(dns.nameservers),
                    "searches": list(dns.searches),
                    "options": [
                        _drop_empty({"name": o.name, "value": o.value}) for o in dns.options
                    ],
                }
            ),
            "hostNetwork": spec.host_network or None,
            "shareProcessNamespace": spec.share_process_namespace or None,
            "restartPolicy": spec.restart_policy.value,
            "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
            "runtimeClassName": spec.runtime_class_name,
        }
    )
    if dns is not None and "dnsConfig" not in body:
        body["dnsConfig"] = {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _drop_empty(
            {
                "name": meta.name,
                "namespace": meta.namespace,
                "labels": dict(meta.labels),
                "annotations": dict(meta.annotations),
                "uid": meta.uid,
            }
        ),
        "spec": body,
    }


def _config_map_to_dict(config_map: ConfigMap) -> dict[str, Any]:
    return _drop_empty(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": config_map.name},
            "data": dict(config_map.data),
            "binaryData": {
                k: base64.b64encode(v).decode() for k, v in config_map.binary_data.items()
            },
        }
    )


def _secret_to_dict(secret: Secret) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret.name},
        "type": secret.type,
        "data": {k: base64.b64encode(v).decode() for k, v in secret.data.items()},
    }
