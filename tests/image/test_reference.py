"""Reference parsing: Docker's normalisation and the distribution grammar."""

from __future__ import annotations

import pytest

from magikrun.errors import InvalidReference
from magikrun.image._reference import Reference, is_loopback_host
from magikrun.platform import MAX_IMAGE_REF_LEN

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "normalized"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None,
         "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None,
         "docker.io/library/busybox:1.36"),
        ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None,
         "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None,
         "docker.io/library/busybox:1"),
        ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
        ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None,
         "localhost:5000/a/b/c:v1"),
        ("127.0.0.1:5000/demo/busybox", "127.0.0.1:5000", "demo/busybox", "latest", None,
         "127.0.0.1:5000/demo/busybox:latest"),
        (f"quay.io/org/app@{DIGEST}", "quay.io", "org/app", None, DIGEST,
         f"quay.io/org/app@{DIGEST}"),
        (f"quay.io/org/app:1@{DIGEST}", "quay.io", "org/app", "1", DIGEST,
         f"quay.io/org/app:1@{DIGEST}"),
        ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None, "[::1]:5000/app:x"),
        ("Registry.Example/a__b/c-d.e:T_1", "Registry.Example", "a__b/c-d.e", "T_1", None,
         "Registry.Example/a__b/c-d.e:T_1"),
    ],
)  # fmt: skip
def test_parse_normalizes(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, normalized: str
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ref.normalized == normalized
    assert Reference.parse(ref.normalized) == ref


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("busybox:", "tag"),
        ("busybox:-x", "tag"),
        ("busybox@sha256:abc", "digest"),
        (f"busybox@sha512:{'a' * 128}", "digest"),
        ("a//b", "component"),
        ("a/b/", "component"),
        ("host:99999/app", "port"),
        ("-host.com/app", "registry"),
        ("a b", "whitespace"),
        ("app\n", "whitespace"),
        ("x" * (MAX_IMAGE_REF_LEN + 1), f"{MAX_IMAGE_REF_LEN} bytes"),
        ("example.com/" + "a" * 250, "255"),
        ("example.com/a..b", "component"),
        ("example.com/", "empty"),
    ],
)
def test_parse_rejects_with_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    assert why in str(info.value)
    assert info.value.hint


def test_registry_host_and_manifest_reference() -> None:
    hub = Reference.parse("busybox")
    assert hub.host == "registry-1.docker.io"
    assert hub.reference == "latest"
    pinned = Reference.parse(f"example.com:443/app:1@{DIGEST}")
    assert pinned.host == "example.com:443"
    assert pinned.reference == DIGEST
    assert pinned.with_digest("sha256:" + "cd" * 32).digest == "sha256:" + "cd" * 32


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.3.2.1", True),
        ("[::1]:5000", True),
        ("docker.io", False),
        ("10.0.0.1:5000", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
    assert Reference.parse(f"{host}/app").is_loopback is loopback
