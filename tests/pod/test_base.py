"""The helpers every pod runtime shares for its containers."""

from __future__ import annotations

from pathlib import Path

from magikrun.errors import PodError
from magikrun.platform._limits import MAX_INIT_OUTPUT_BYTES
from magikrun.pod._base import init_container_failed, kubernetes_annotations, log_tail
from tests.pod._podkit import busybox, pod_yaml, spec


def test_kubernetes_annotations_name_pod_namespace_and_container() -> None:
    pod = spec(pod_yaml("web", busybox("main", "true")))
    assert kubernetes_annotations(pod, "main") == {
        "io.kubernetes.pod.name": "web",
        "io.kubernetes.pod.namespace": pod.namespace,
        "io.kubernetes.container.name": "main",
    }


def test_init_container_failed_names_container_code_and_its_last_output() -> None:
    error = init_container_failed("default_web", "setup", 7, ["one", "two", "\x1b[2Joops"])
    assert isinstance(error, PodError)
    assert error.message == (
        "init container 'setup' exited with code 7\n"
        "its last output:\n  | one\n  | two\n  | \\x1b[2Joops"
    )
    assert error.hint == (
        "fix the init container's command or image; the pod was rolled back, so its log is gone"
    )
    assert error.subject == {
        "pod_id": "default_web",
        "container": "setup",
        "exit_code": 7,
        "output": "one\ntwo\n\\x1b[2Joops",
    }


def test_init_container_failed_says_when_it_printed_nothing() -> None:
    error = init_container_failed("default_web", "setup", 1, [])
    assert error.message == "init container 'setup' exited with code 1; it printed nothing"
    assert error.subject["output"] == ""


def _record(stream: str, text: bytes, tag: bytes = b"F") -> bytes:
    return b"2026-01-01T00:00:00.000000000Z %s %s %s\n" % (stream.encode(), tag, text)


def test_log_tail_reads_the_texts_at_the_end_of_a_cri_log(tmp_path: Path) -> None:
    path = tmp_path / "container.log"
    assert log_tail(path) == []
    path.write_bytes(_record("stdout", b"one") + _record("stderr", b"two \xff") + b"garbage\n")
    assert log_tail(path) == ["one", "two \ufffd"]


def test_log_tail_skips_the_record_its_window_begins_inside(tmp_path: Path) -> None:
    path = tmp_path / "container.log"
    early = _record("stdout", b"x" * (16 * MAX_INIT_OUTPUT_BYTES))
    path.write_bytes(early + b"".join(_record("stdout", b"%d" % n) for n in range(30)))
    assert log_tail(path) == [str(n) for n in range(30)]
