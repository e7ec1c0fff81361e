"""The helpers every pod runtime shares for its containers."""

from __future__ import annotations

from magikrun.errors import PodError
from magikrun.pod._base import init_container_failed, kubernetes_annotations
from tests.pod._podkit import busybox, pod_yaml, spec


def test_kubernetes_annotations_name_pod_namespace_and_container() -> None:
    pod = spec(pod_yaml("web", busybox("main", "true")))
    assert kubernetes_annotations(pod, "main") == {
        "io.kubernetes.pod.name": "web",
        "io.kubernetes.pod.namespace": pod.namespace,
        "io.kubernetes.container.name": "main",
    }


def test_init_container_failed_names_container_code_and_log_command() -> None:
    error = init_container_failed("default_web", "setup", 7)
    assert isinstance(error, PodError)
    assert error.message == "init container 'setup' exited with code 7"
    assert error.hint == "see its log: magikrun pod logs default_web -c setup"
    assert error.subject == {"container": "setup", "exit_code": 7}
