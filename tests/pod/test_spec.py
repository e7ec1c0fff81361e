"""PodSpec: parsing, defaults, resolution, limits and the exact field paths of errors."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from magikrun.errors import InvalidPodSpec, LimitExceeded, PodSpecTooLarge
from magikrun.platform import (
    MAX_POD_CONTAINERS,
    MAX_POD_ENV_VARS,
    MAX_POD_SPEC_DEPTH,
    MAX_POD_SPEC_SIZE,
    MAX_POD_STRING_LEN,
    MAX_POD_VOLUMES,
)
from magikrun.pod import (
    ConfigMapVolume,
    EmptyDirVolume,
    EnvVar,
    HostPathType,
    HostPathVolume,
    PodSpec,
    ProjectedFile,
    Protocol,
    PullPolicy,
    RestartPolicy,
    RuntimeFields,
    SecretVolume,
    pod_id,
    resolve_env,
)

SAMPLE = b"""\
apiVersion: v1
kind: Pod
metadata:
  name: web.example
  namespace: shop
  labels: {app: web, tier: front}
  annotations: {example.com/owner: "team a"}
spec:
  hostname: frontend
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 5
  runtimeClassName: magikrun-native
  shareProcessNamespace: true
  hostAliases:
  - ip: 10.1.2.3
    hostnames: [db.local, cache.local]
  dnsConfig:
    nameservers: [1.1.1.1]
    searches: [svc.local]
    options: [{name: ndots, value: "2"}, {name: edns0}]
  securityContext: {runAsUser: 1000, runAsGroup: 1000}
  initContainers:
  - name: init
    image: registry.local:5000/busybox:1.36
    command: [/bin/sh, -c, "echo init > /data/ready"]
    volumeMounts: [{name: data, mountPath: /data}]
  containers:
  - name: app
    image: registry.local:5000/busybox
    imagePullPolicy: IfNotPresent
    args: ["--greeting=$(GREETING)", "$$(GREETING)"]
    workingDir: /srv
    env:
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: settings, key: greeting}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: OPTIONAL, valueFrom: {secretKeyRef: {name: creds, key: nope, optional: true}}}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: POD_IPS, valueFrom: {fieldRef: {fieldPath: status.podIPs}}}
    - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: TIER, valueFrom: {fieldRef: {fieldPath: "metadata.labels['tier']"}}}
    - {name: URL, value: "http://$(POD_IP):8080"}
    envFrom:
    - configMapRef: {name: settings}
      prefix: CFG_
    ports:
    - {containerPort: 8080, hostPort: 18080, name: http}
    - {containerPort: 5353, protocol: UDP}
    volumeMounts:
    - {name: data, mountPath: /data}
    - {name: settings, mountPath: /etc/settings, readOnly: true}
    - {name: creds, mountPath: /run/creds, readOnly: true}
    - {name: host, mountPath: /host/tmp, subPath: sub/dir}
    resources:
      limits: {cpu: 500m, memory: 128Mi}
      requests: {cpu: "0.25"}
    securityContext:
      runAsUser: 1001
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities: {add: [NET_BIND_SERVICE], drop: [ALL]}
  - name: sidecar
    image: registry.local:5000/busybox@sha256:DIGEST
  volumes:
  - name: data
    emptyDir: {medium: Memory, sizeLimit: 64Mi}
  - name: settings
    configMap:
      name: settings
      items: [{key: greeting, path: conf/greeting.txt, mode: 0440}]
  - name: creds
    secret: {secretName: creds}
  - name: host
    hostPath: {path: /tmp, type: Directory}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hello, color: blue}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
type: Opaque
data: {password: czNjcjN0}
stringData: {user: admin}
""".replace(b"DIGEST", b"0" * 64)


def base() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "containers": [
                {"name": "a", "image": "busybox:1.36"},
                {"name": "b", "image": "busybox:1.36", "ports": [{"containerPort": 80}]},
            ],
            "volumes": [{"name": "v", "emptyDir": {}}],
        },
    }


def test_sample_manifest_fields() -> None:
    spec = PodSpec.from_yaml(SAMPLE)
    assert spec.name == "web.example"
    assert spec.namespace == "shop"
    assert spec.id == "shop_web.example"
    assert dict(spec.metadata.labels) == {"app": "web", "tier": "front"}
    assert spec.restart_policy is RestartPolicy.ON_FAILURE
    assert spec.termination_grace_period_seconds == 5
    assert spec.runtime_class_name == "magikrun-native"
    assert spec.share_process_namespace
    assert spec.effective_hostname == "frontend"
    assert spec.host_aliases[0].hostnames == ("db.local", "cache.local")
    assert spec.dns_config is not None and spec.dns_config.nameservers == ("1.1.1.1",)
    init = spec.init_containers[0]
    assert init.image_pull_policy is PullPolicy.IF_NOT_PRESENT
    assert init.security_context.run_as_user == 1000  # from the pod's securityContext
    app, sidecar = spec.containers
    assert app.working_dir == "/srv"
    assert app.ports[0].host_port == 18080 and app.ports[0].protocol is Protocol.TCP
    assert app.ports[1].protocol is Protocol.UDP and app.ports[1].host_port is None
    assert app.resources.limits.cpu_millicores == 500
    assert app.resources.limits.memory_bytes == 128 * 2**20
    assert app.resources.requests.cpu_millicores == 250
    assert app.resources.requests.memory_bytes == 128 * 2**20  # defaults to the limit
    sc = app.security_context
    assert (sc.run_as_user, sc.run_as_group) == (1001, 1000)
    assert sc.read_only_root_filesystem and sc.allow_privilege_escalation is False
    assert sc.capabilities.add == ("CAP_NET_BIND_SERVICE",)
    assert sc.capabilities.drop == ("ALL",)
    assert app.volume_mounts[3].sub_path == "sub/dir"
    assert sidecar.image_pull_policy is PullPolicy.IF_NOT_PRESENT  # a digest
    volumes = {v.name: v.source for v in spec.volumes}
    assert volumes["data"] == EmptyDirVolume(medium="Memory", size_limit_bytes=64 * 2**20)
    assert volumes["host"] == HostPathVolume(path="/tmp", type=HostPathType.DIRECTORY)
    settings = volumes["settings"]
    assert isinstance(settings, ConfigMapVolume)
    assert settings.files == (ProjectedFile(path="conf/greeting.txt", data=b"hello", mode=0o440),)
    creds = volumes["creds"]
    assert isinstance(creds, SecretVolume)
    assert creds.files == (
        ProjectedFile(path="password", data=b"s3cr3t", mode=0o400),
        ProjectedFile(path="user", data=b"admin", mode=0o400),
    )


def test_env_resolution_and_argv() -> None:
    spec = PodSpec.from_yaml(SAMPLE)
    app = spec.containers[0]
    by_name = {v.name: v for v in app.env}
    assert by_name["GREETING"] == EnvVar(name="GREETING", value="hello")
    assert by_name["PASSWORD"].value == "s3cr3t"
    assert "OPTIONAL" not in by_name
    assert by_name["POD_IP"] == EnvVar(name="POD_IP", field_ref="status.podIP")
    assert by_name["CFG_color"].value == "blue"
    env = resolve_env(app, spec, RuntimeFields(pod_ip="10.89.0.7", node_name="host1"))
    assert env["POD_IPS"] == "10.89.0.7"
    assert env["NODE"] == "host1"
    assert env["POD_NAME"] == "web.example"
    assert env["POD_NAMESPACE"] == "shop"
    assert env["POD_IP"] == "10.89.0.7"
    assert env["TIER"] == "front"
    assert env["URL"] == "http://10.89.0.7:8080"
    assert list(env)[:2] == ["CFG_greeting", "CFG_color"]  # envFrom first, as Kubernetes
    assert app.argv(["/entry"], ["cmd"], env) == (
        "/entry",
        "--greeting=hello",
        "$(GREETING)",
    )


@pytest.mark.parametrize(
    ("command", "args", "argv"),
    [
        (None, None, ("/ep", "cmd")),
        (["/bin/x"], None, ("/bin/x",)),
        (None, ["a"], ("/ep", "a")),
        (["/bin/x"], ["a"], ("/bin/x", "a")),
    ],
)
def test_command_and_args_over_entrypoint_and_cmd(
    command: list[str] | None, args: list[str] | None, argv: tuple[str, ...]
) -> None:
    pod = base()
    pod["spec"]["containers"][0].update(command=command, args=args)
    container = PodSpec.from_dict(pod).containers[0]
    assert container.argv(["/ep"], ["cmd"]) == argv


@pytest.mark.parametrize(
    ("image", "policy"),
    [
        ("busybox", PullPolicy.ALWAYS),
        ("busybox:latest", PullPolicy.ALWAYS),
        ("registry.local:5000/busybox", PullPolicy.ALWAYS),
        ("registry.local:5000/busybox:latest", PullPolicy.ALWAYS),
        ("busybox:1.36", PullPolicy.IF_NOT_PRESENT),
        ("registry.local:5000/busybox:1.36", PullPolicy.IF_NOT_PRESENT),
        ("busybox@sha256:" + "a" * 64, PullPolicy.IF_NOT_PRESENT),
    ],
)
def test_pull_policy_defaults(image: str, policy: PullPolicy) -> None:
    pod = base()
    pod["spec"]["containers"][0]["image"] = image
    assert PodSpec.from_dict(pod).containers[0].image_pull_policy is policy


def test_explicit_pull_policy_wins() -> None:
    pod = base()
    pod["spec"]["containers"][0].update(image="busybox", imagePullPolicy="Never")
    assert PodSpec.from_dict(pod).containers[0].image_pull_policy is PullPolicy.NEVER


def test_defaults() -> None:
    spec = PodSpec.from_dict(base())
    assert spec.namespace == "default"
    assert spec.restart_policy is RestartPolicy.ALWAYS
    assert spec.termination_grace_period_seconds == 30
    assert spec.effective_hostname == "p"
    assert not spec.host_network
    assert spec.containers[1].ports[0].protocol is Protocol.TCP


def test_round_trip() -> None:
    spec = PodSpec.from_yaml(SAMPLE)
    again = PodSpec.from_yaml(spec.to_yaml())
    assert again == spec
    assert again.to_yaml() == spec.to_yaml()


def test_privileged_needs_permission() -> None:
    pod = base()
    pod["spec"]["containers"][1]["securityContext"] = {"privileged": True}
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_dict(pod)
    assert str(info.value) == "spec.containers[1].securityContext.privileged: true is refused"
    assert "allow_privileged" in info.value.hint
    spec = PodSpec.from_dict(pod, allow_privileged=True)
    assert spec.containers[1].security_context.privileged


def test_unknown_fields_are_ignored() -> None:
    pod = base()
    pod["spec"]["nodeSelector"] = {"disk": "ssd"}
    pod["spec"]["containers"][0]["readinessProbe"] = {"exec": {"command": ["true"]}}
    pod["spec"]["containers"][0]["stdin"] = True
    pod["status"] = {"phase": "Running"}
    assert PodSpec.from_dict(pod).containers[0].name == "a"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted path ('spec.containers.1.ports.0.containerPort')."""

    def mutate(pod: dict[str, Any]) -> None:
        target: Any = pod
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(pod: dict[str, Any]) -> None:
        target: Any = pod
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return mutate


C0 = "spec.containers.0"
C1 = "spec.containers.1"

ERRORS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (
        _set(f"{C1}.ports.0.containerPort", 70000),
        "spec.containers[1].ports[0].containerPort: 70000 is out of range",
    ),
    (
        _set(f"{C1}.ports.0.containerPort", 0),
        "spec.containers[1].ports[0].containerPort: 0 is out of range",
    ),
    (
        _set(f"{C1}.ports.0.hostPort", 65536),
        "spec.containers[1].ports[0].hostPort: 65536 is out of range",
    ),
    (
        _set(f"{C1}.ports.0.containerPort", "80"),
        "spec.containers[1].ports[0].containerPort: expected an integer, got string",
    ),
    (
        _set(f"{C1}.ports.0", {"hostPort": 80}),
        "spec.containers[1].ports[0].containerPort: is required",
    ),
    (
        _set(f"{C1}.ports.0.protocol", "ICMP"),
        "spec.containers[1].ports[0].protocol: 'ICMP' is not one of TCP, UDP, SCTP",
    ),
    (
        _set(f"{C1}.ports.0.name", "Http_Port"),
        "spec.containers[1].ports[0].name: 'Http_Port' is not a valid port name",
    ),
    (_set(f"{C1}.ports", "80"), "spec.containers[1].ports: expected a list, got string"),
    (_set(f"{C1}.name", "a"), "spec.containers[1].name: container name 'a' is used twice"),
    (_set(f"{C1}.name", "B"), "spec.containers[1].name: 'B' is not a valid DNS-1123 label"),
    (_set(f"{C1}.name", "a.b"), "spec.containers[1].name: 'a.b' is not a valid DNS-1123 label"),
    (_del(f"{C1}.name"), "spec.containers[1].name: is required"),
    (_del(f"{C0}.image"), "spec.containers[0].image: is required"),
    (
        _set(f"{C0}.image", "bad image"),
        "spec.containers[0].image: 'bad image' is not a valid image reference",
    ),
    (_set(f"{C0}.command", "/bin/sh"), "spec.containers[0].command: expected a list, got string"),
    (_set(f"{C0}.args", [1]), "spec.containers[0].args[0]: expected a string, got integer"),
    (
        _set(f"{C0}.imagePullPolicy", "Sometimes"),
        "spec.containers[0].imagePullPolicy: 'Sometimes' is not one of Always, IfNotPresent, Never",
    ),
    (
        _set(f"{C0}.workingDir", "srv"),
        "spec.containers[0].workingDir: 'srv' must be an absolute path without '..'",
    ),
    (
        _set(f"{C0}.volumeMounts", [{"name": "nope", "mountPath": "/x"}]),
        "spec.containers[0].volumeMounts[0].name: volume 'nope' is not declared in spec.volumes",
    ),
    (
        _set(f"{C0}.volumeMounts", [{"name": "v", "mountPath": "x"}]),
        "spec.containers[0].volumeMounts[0].mountPath: 'x' must be an absolute path without '..'",
    ),
    (
        _set(f"{C0}.volumeMounts", [{"name": "v", "mountPath": "/a/../b"}]),
        "spec.containers[0].volumeMounts[0].mountPath: '/a/../b' must be an absolute path without '..'",  # noqa: E501
    ),
    (
        _set(f"{C0}.volumeMounts", [{"name": "v", "mountPath": "/x", "subPath": "../etc"}]),
        "spec.containers[0].volumeMounts[0].subPath: '../etc' must be a relative path without '..'",
    ),
    (
        _set(f"{C0}.volumeMounts", [{"name": "v", "mountPath": "/x", "subPath": "/etc"}]),
        "spec.containers[0].volumeMounts[0].subPath: '/etc' must be a relative path without '..'",
    ),
    (
        _set(
            f"{C0}.volumeMounts",
            [{"name": "v", "mountPath": "/x"}, {"name": "v", "mountPath": "/x"}],
        ),
        "spec.containers[0].volumeMounts[1].mountPath: '/x' is mounted twice",
    ),
    (
        _set(f"{C0}.volumeMounts", [{"name": "v", "mountPath": "/x", "readOnly": "yes"}]),
        "spec.containers[0].volumeMounts[0].readOnly: expected a boolean, got string",
    ),
    (
        _set("spec.volumes", [{"name": "v", "persistentVolumeClaim": {"claimName": "c"}}]),
        "spec.volumes[0].persistentVolumeClaim: is not a supported volume type",
    ),
    (
        _set("spec.volumes", [{"name": "v", "emptyDir": {}, "hostPath": {"path": "/"}}]),
        "spec.volumes[0]: sets more than one volume type (emptyDir, hostPath)",
    ),
    (
        _set("spec.volumes", [{"name": "v"}, {"name": "v"}]),
        "spec.volumes[1].name: volume 'v' is declared twice",
    ),
    (
        _set("spec.volumes", [{"name": "V_1"}]),
        "spec.volumes[0].name: 'V_1' is not a valid DNS-1123 label",
    ),
    (
        _set("spec.volumes", [{"name": "v", "hostPath": {"path": "rel"}}]),
        "spec.volumes[0].hostPath.path: 'rel' must be an absolute path without '..'",
    ),
    (
        _set("spec.volumes", [{"name": "v", "hostPath": {"path": "/x", "type": "Dir"}}]),
        "spec.volumes[0].hostPath.type: 'Dir' is not one of DirectoryOrCreate, Directory,"
        " FileOrCreate, File, Socket, CharDevice, BlockDevice",
    ),
    (
        _set("spec.volumes", [{"name": "v", "emptyDir": {"medium": "HugePages"}}]),
        "spec.volumes[0].emptyDir.medium: 'HugePages' is not one of '', Memory",
    ),
    (
        _set("spec.volumes", [{"name": "v", "emptyDir": {"sizeLimit": "1Gb"}}]),
        "spec.volumes[0].emptyDir.sizeLimit: '1Gb' has an unknown suffix 'Gb'",
    ),
    (
        _set("spec.volumes", [{"name": "v", "configMap": {"name": "missing"}}]),
        "spec.volumes[0].configMap: ConfigMap 'missing' is not in the manifest",
    ),
    (
        _set("spec.volumes", [{"name": "v", "secret": {"secretName": "s", "defaultMode": 0o1777}}]),
        "spec.volumes[0].secret.defaultMode: 1023 is out of range",
    ),
    (_set("spec.volumes", {"name": "v"}), "spec.volumes: expected a list, got mapping"),
    (
        _set(f"{C0}.resources", {"limits": {"memory": "12XB"}}),
        "spec.containers[0].resources.limits.memory: '12XB' has an unknown suffix 'XB'",
    ),
    (
        _set(f"{C0}.resources", {"limits": {"cpu": "lots"}}),
        "spec.containers[0].resources.limits.cpu: 'lots' is not a valid quantity",
    ),
    (
        _set(f"{C0}.resources", {"limits": {"memory": "9Gi"}}),
        "spec.containers[0].resources.limits.memory: 9Gi is over the limit of 8589934592 bytes",
    ),
    (
        _set(f"{C0}.resources", {"limits": {"cpu": 1}, "requests": {"cpu": 2}}),
        "spec.containers[0].resources.requests.cpu: must be less than or equal to the limit",
    ),
    (
        _set(f"{C0}.resources", {"limits": {"nvidia.com/gpu": 1}}),
        "spec.containers[0].resources.limits.nvidia.com/gpu: is not supported by magikrun"
        " (only cpu and memory resources)",
    ),
    (
        _set(f"{C0}.env", [{"name": "1X", "value": "v"}]),
        "spec.containers[0].env[0].name: '1X' is not a valid environment variable name",
    ),
    (
        _set(f"{C0}.env", [{"name": "X", "value": 5}]),
        "spec.containers[0].env[0].value: expected a string, got integer",
    ),
    (
        _set(f"{C0}.env", [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.foo"}}}]),
        "spec.containers[0].env[0].valueFrom.fieldRef.fieldPath: 'spec.foo' is not a supported field",  # noqa: E501
    ),
    (
        _set(
            f"{C0}.env",
            [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}],
        ),
        "spec.containers[0].env[0].valueFrom.configMapKeyRef.key: ConfigMap 'cm' is not in the manifest",  # noqa: E501
    ),
    (
        _set(
            f"{C0}.env",
            [{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}],
        ),
        "spec.containers[0].env[0].valueFrom.resourceFieldRef: is not supported by magikrun"
        " (resource field references)",
    ),
    (
        _set(
            f"{C0}.env",
            [
                {
                    "name": "X",
                    "value": "a",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                }
            ],
        ),
        "spec.containers[0].env[0].value: may not be set together with valueFrom",
    ),
    (
        _set(f"{C0}.envFrom", [{"secretRef": {"name": "nope"}}]),
        "spec.containers[0].envFrom[0].secretRef.name: Secret 'nope' is not in the manifest",
    ),
    (
        _set(f"{C0}.securityContext", {"runAsUser": -1}),
        "spec.containers[0].securityContext.runAsUser: -1 is out of range",
    ),
    (
        _set(f"{C0}.securityContext", {"runAsNonRoot": True, "runAsUser": 0}),
        "spec.containers[0].securityContext.runAsUser: 0 contradicts runAsNonRoot: true",
    ),
    (
        _set(f"{C0}.securityContext", {"capabilities": {"add": ["net admin"]}}),
        "spec.containers[0].securityContext.capabilities.add[0]: 'net admin' is not a capability name",  # noqa: E501
    ),
    (
        _set(f"{C0}.securityContext", {"seccompProfile": {"type": "Unconfined"}}),
        "spec.containers[0].securityContext.seccompProfile.type: is not supported by magikrun"
        " (only the RuntimeDefault seccomp profile)",
    ),
    (
        _set(f"{C0}.livenessProbe", {"exec": {"command": ["true"]}}),
        "spec.containers[0].livenessProbe: is not supported by magikrun"
        " (probes, lifecycle hooks and block devices)",
    ),
    (
        _set("spec.hostPID", True),
        "spec.hostPID: is not supported by magikrun (pods never share the host's PID or IPC namespace)",  # noqa: E501
    ),
    (
        _set("spec.securityContext", {"fsGroup": 2000}),
        "spec.securityContext.fsGroup: is not supported by magikrun"
        " (volume ownership, sysctls and extra groups)",
    ),
    (
        _set("spec.initContainers", [{"name": "i", "image": "busybox", "restartPolicy": "Always"}]),
        "spec.initContainers[0].restartPolicy: is not supported by magikrun (sidecar containers)",
    ),
    (
        _set("spec.initContainers", [{"name": "a", "image": "busybox"}]),
        "spec.containers[0].name: container name 'a' is used twice",
    ),
    (_set("spec.containers", []), "spec.containers: must hold at least one container"),
    (_set("spec.containers", None), "spec.containers: must hold at least one container"),
    (_set("spec.containers", "a"), "spec.containers: expected a list, got string"),
    (_set("spec.containers", ["a"]), "spec.containers[0]: expected a mapping, got string"),
    (
        _set("spec.restartPolicy", "Sometimes"),
        "spec.restartPolicy: 'Sometimes' is not one of Always, OnFailure, Never",
    ),
    (
        _set("spec.terminationGracePeriodSeconds", -1),
        "spec.terminationGracePeriodSeconds: -1 is out of range",
    ),
    (_set("spec.hostNetwork", "true"), "spec.hostNetwork: expected a boolean, got string"),
    (_set("spec.hostname", "Host_1"), "spec.hostname: 'Host_1' is not a valid DNS-1123 label"),
    (
        _set("spec.hostAliases", [{"ip": "300.1.1.1", "hostnames": ["a"]}]),
        "spec.hostAliases[0].ip: '300.1.1.1' is not an IP address",
    ),
    (
        _set("spec.hostAliases", [{"ip": "1.1.1.1", "hostnames": ["a\nb"]}]),
        "spec.hostAliases[0].hostnames[0]: 'a\\nb' is not a host name",
    ),
    (
        _set("spec.dnsConfig", {"nameservers": ["1.1.1.1", "1.0.0.1", "8.8.8.8", "9.9.9.9"]}),
        "spec.dnsConfig.nameservers: holds more than 3 addresses",
    ),
    (
        _set("spec.dnsConfig", {"options": [{"name": "ndots", "value": "1 rotate"}]}),
        "spec.dnsConfig.options[0].value: '1 rotate' must not contain whitespace",
    ),
    (_set("spec.dnsPolicy", "None"), "spec.dnsConfig: is required when dnsPolicy is None"),
    (_set("metadata.name", "My_Pod"), "metadata.name: 'My_Pod' is not a valid DNS-1123 subdomain"),
    (
        _set("metadata.name", "a" * 254),
        f"metadata.name: {'a' * 254!r} is not a valid DNS-1123 subdomain",
    ),
    (_del("metadata.name"), "metadata.name: is required"),
    (_set("metadata.namespace", "a.b"), "metadata.namespace: 'a.b' is not a valid DNS-1123 label"),
    (
        _set("metadata.labels", {"app": "a b"}),
        "metadata.labels.app: 'a b' is not a valid label value",
    ),
    (_set("metadata.labels", {"app": 1}), "metadata.labels.app: expected a string, got integer"),
    (_del("spec"), "spec: is required"),
    (_set("spec", []), "spec: expected a mapping, got list"),
]


@pytest.mark.parametrize(("mutate", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_errors_name_the_field(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    pod = copy.deepcopy(base())
    mutate(pod)
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_dict(pod)
    assert str(info.value) == message
    assert info.value.hint


def test_error_field_attribute() -> None:
    pod = base()
    pod["spec"]["containers"][1]["ports"][0]["containerPort"] = 70000
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_dict(pod)
    assert info.value.subject["field"] == "spec.containers[1].ports[0].containerPort"


def _yaml(*documents: dict[str, Any]) -> bytes:
    return yaml.safe_dump_all(documents).encode()


CONFIG = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k": "v"}}


def test_missing_config_map_key_is_named() -> None:
    pod = base()
    pod["spec"]["containers"][0]["env"] = [
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "other"}}}
    ]
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_yaml(_yaml(pod, CONFIG))
    assert str(info.value) == (
        "spec.containers[0].env[0].valueFrom.configMapKeyRef.key: ConfigMap 'cm' has no key 'other'"
    )
    pod["spec"]["containers"][0]["env"][0]["valueFrom"]["configMapKeyRef"]["optional"] = True
    assert PodSpec.from_yaml(_yaml(pod, CONFIG)).containers[0].env == ()


def test_missing_volume_item_key_is_named() -> None:
    pod = base()
    pod["spec"]["volumes"] = [
        {"name": "v", "configMap": {"name": "cm", "items": [{"key": "zz", "path": "f"}]}}
    ]
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_yaml(_yaml(pod, CONFIG))
    assert (
        str(info.value) == "spec.volumes[0].configMap.items[0].key: ConfigMap 'cm' has no key 'zz'"
    )


def test_volume_item_path_must_stay_inside() -> None:
    pod = base()
    pod["spec"]["volumes"] = [
        {"name": "v", "configMap": {"name": "cm", "items": [{"key": "k", "path": "../../etc/x"}]}}
    ]
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_yaml(_yaml(pod, CONFIG))
    assert str(info.value) == (
        "spec.volumes[0].configMap.items[0].path: '../../etc/x' must be a relative path without '..'"  # noqa: E501
    )


def test_optional_missing_config_map_volume_is_empty() -> None:
    pod = base()
    pod["spec"]["volumes"] = [{"name": "v", "configMap": {"name": "none", "optional": True}}]
    source = PodSpec.from_dict(pod).volumes[0].source
    assert isinstance(source, ConfigMapVolume) and source.files == ()


def test_secret_binary_and_bad_base64() -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s"},
        "data": {"bin": base64.b64encode(b"\xff\x00").decode()},
    }
    pod = base()
    pod["spec"]["volumes"] = [{"name": "v", "secret": {"secretName": "s", "defaultMode": 0o600}}]
    source = PodSpec.from_yaml(_yaml(pod, secret)).volumes[0].source
    assert isinstance(source, SecretVolume)
    assert source.files == (ProjectedFile(path="bin", data=b"\xff\x00", mode=0o600),)
    pod["spec"]["containers"][0]["env"] = [
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "bin"}}}
    ]
    with pytest.raises(InvalidPodSpec, match="the value of 'bin' is not UTF-8 text"):
        PodSpec.from_yaml(_yaml(pod, secret))
    secret["data"] = {"bad": "***"}
    with pytest.raises(InvalidPodSpec, match=r"^data\.bad: is not valid base64$"):
        PodSpec.from_yaml(_yaml(base(), secret))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "manifest holds 0 Pods, expected exactly one"),
        (b"---\n---\n", "manifest holds 0 Pods, expected exactly one"),
        (_yaml(base(), base()), "manifest holds 2 Pods, expected exactly one"),
        (
            _yaml(base(), {"apiVersion": "apps/v1", "kind": "Deployment"}),
            "document 1: kind 'Deployment' is not supported",
        ),
        (
            _yaml({**base(), "apiVersion": "v2"}),
            "document 0: apiVersion 'v2' is not supported for Pod",
        ),
        (b"- a\n- b\n", "document 0: expected a mapping, got list"),
        (b"kind: Pod\n  bad: [", None),
        (_yaml(base(), CONFIG, CONFIG), "ConfigMap 'cm' is defined twice"),
    ],
)
def test_file_level_errors(data: bytes, message: str | None) -> None:
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_yaml(data)
    if message is None:
        assert str(info.value).startswith("manifest is not valid YAML")
    else:
        assert str(info.value) == message


def test_size_limit() -> None:
    data = _yaml(base()) + b"#" * MAX_POD_SPEC_SIZE
    with pytest.raises(PodSpecTooLarge) as info:
        PodSpec.from_yaml(data)
    assert isinstance(info.value, LimitExceeded)
    assert str(info.value).startswith(f"manifest is {len(data)} bytes, over the limit")


def test_alias_bomb_is_refused() -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 10):
        prev = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([prev] * 10)}]")
    bomb = ("\n".join(lines) + "\nkind: Pod\n").encode()
    assert len(bomb) < 2000
    with pytest.raises(PodSpecTooLarge, match="expands to more than"):
        PodSpec.from_yaml(bomb)


def test_long_string_alias_expansion_is_refused() -> None:
    big = "x" * (MAX_POD_STRING_LEN - 1)
    refs = ", ".join(["*s"] * 40)
    data = f"s: &s {big}\nl: [{refs}]\n".encode()
    with pytest.raises(PodSpecTooLarge, match="characters"):
        PodSpec.from_yaml(data)


def test_too_long_string_is_refused() -> None:
    pod = base()
    pod["spec"]["containers"][0]["args"] = ["x" * (MAX_POD_STRING_LEN + 1)]
    with pytest.raises(PodSpecTooLarge, match="over the limit"):
        PodSpec.from_yaml(_yaml(pod))


def test_deep_nesting_is_refused() -> None:
    depth = MAX_POD_SPEC_DEPTH + 5
    data = ("x: " + "[" * depth + "]" * depth + "\n").encode()
    with pytest.raises(PodSpecTooLarge, match="nested"):
        PodSpec.from_yaml(data)


def test_self_referencing_yaml_is_refused() -> None:
    with pytest.raises(PodSpecTooLarge):
        PodSpec.from_yaml(b"kind: Pod\nspec: &s {a: *s}\n")


def test_count_limits() -> None:
    pod = base()
    pod["spec"]["containers"] = [
        {"name": f"c{i}", "image": "busybox"} for i in range(MAX_POD_CONTAINERS + 1)
    ]
    with pytest.raises(PodSpecTooLarge, match="over the limit of"):
        PodSpec.from_dict(pod)
    pod = base()
    pod["spec"]["volumes"] = [{"name": f"v{i}"} for i in range(MAX_POD_VOLUMES + 1)]
    with pytest.raises(PodSpecTooLarge) as info:
        PodSpec.from_dict(pod)
    assert info.value.subject["field"] == "spec.volumes"
    pod = base()
    pod["spec"]["containers"][0]["env"] = [
        {"name": f"V{i}", "value": "x"} for i in range(MAX_POD_ENV_VARS + 1)
    ]
    with pytest.raises(PodSpecTooLarge):
        PodSpec.from_dict(pod)


def test_env_from_expansion_counts_against_the_env_limit() -> None:
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "big"},
        "data": {f"K{i}": "v" for i in range(MAX_POD_ENV_VARS + 1)},
    }
    pod = base()
    pod["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "big"}}]
    with pytest.raises(PodSpecTooLarge, match=r"spec\.containers\[0\]\.env: 1025 variables"):
        PodSpec.from_yaml(_yaml(pod, config))


def test_duplicate_host_ports() -> None:
    pod = base()
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 80, "hostPort": 8080}]
    pod["spec"]["containers"][1]["ports"] = [{"containerPort": 81, "hostPort": 8080}]
    with pytest.raises(InvalidPodSpec) as info:
        PodSpec.from_dict(pod)
    assert str(info.value) == "spec.containers[1].ports[0].hostPort: 8080/TCP is used twice"
    pod["spec"]["containers"][1]["ports"][0]["protocol"] = "UDP"
    assert PodSpec.from_dict(pod).containers[1].ports[0].host_port == 8080


def test_pod_id() -> None:
    assert pod_id("default", "web") == "default_web"
    assert pod_id("shop", "web.example") == "shop_web.example"
    long_name = ".".join(["a" * 50] * 4)
    first = pod_id("default", long_name)
    assert len(first) == 64 and first.startswith("default_aaaa")
    assert first == pod_id("default", long_name)
    assert first != pod_id("default", long_name + "b")
    assert first != pod_id("other", long_name)
    with pytest.raises(InvalidPodSpec):
        pod_id("Bad", "x")
