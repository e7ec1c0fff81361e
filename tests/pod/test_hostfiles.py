"""The pod's /etc/hosts, /etc/resolv.conf and /etc/hostname."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

from magikrun.pod import PodSpec, etc_hostname, etc_hosts, etc_resolv_conf, write_etc_files

HOST_RESOLV = """\
# generated
nameserver 127.0.0.53
nameserver 192.0.2.1
nameserver ::1
search corp.example
options edns0 timeout:2
"""


def spec(**extra: Any) -> PodSpec:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web.shop"},
        "spec": {"containers": [{"name": "a", "image": "busybox"}], **extra},
    }
    return PodSpec.from_dict(pod)


def test_hosts_has_pod_ip_and_aliases() -> None:
    pod = spec(hostAliases=[{"ip": "10.1.2.3", "hostnames": ["db.local", "cache"]}])
    assert etc_hosts(pod, "10.89.0.5") == (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "10.89.0.5\tweb\n"
        "# Entries added by HostAliases.\n"
        "10.1.2.3\tdb.local cache\n"
    )


def test_hostname() -> None:
    assert etc_hostname(spec()) == "web\n"
    assert etc_hostname(spec(hostname="front")) == "front\n"
    assert etc_hostname(spec(hostNetwork=True)) == f"{socket.gethostname()}\n"


def test_host_network_uses_host_files() -> None:
    pod = spec(hostNetwork=True, hostAliases=[{"ip": "10.1.2.3", "hostnames": ["db"]}])
    hosts = etc_hosts(pod, None, host_hosts="127.0.0.1 localhost\n192.0.2.9 box\n")
    assert hosts == (
        "127.0.0.1 localhost\n192.0.2.9 box\n# Entries added by HostAliases.\n10.1.2.3\tdb\n"
    )
    resolv = etc_resolv_conf(pod, host_resolv_conf=HOST_RESOLV)
    assert "nameserver 127.0.0.53\n" in resolv  # same network: the host's stub works


def test_resolv_conf_drops_loopback_nameservers() -> None:
    assert etc_resolv_conf(spec(), host_resolv_conf=HOST_RESOLV) == (
        "nameserver 192.0.2.1\nsearch corp.example\noptions edns0 timeout:2\n"
    )


def test_resolv_conf_merges_dns_config() -> None:
    pod = spec(
        dnsConfig={
            "nameservers": ["198.51.100.1"],
            "searches": ["svc.local"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "timeout", "value": "5"}],
        }
    )
    assert etc_resolv_conf(pod, host_resolv_conf=HOST_RESOLV) == (
        "nameserver 198.51.100.1\n"
        "nameserver 192.0.2.1\n"
        "search svc.local corp.example\n"
        "options edns0 timeout:5 ndots:2\n"
    )


def test_resolv_conf_dns_policy_none() -> None:
    pod = spec(dnsPolicy="None", dnsConfig={"nameservers": ["198.51.100.1"]})
    assert etc_resolv_conf(pod, host_resolv_conf=HOST_RESOLV) == "nameserver 198.51.100.1\n"


def test_write_etc_files(tmp_path: Path) -> None:
    directory = tmp_path / "pod" / "etc"
    written = write_etc_files(spec(), directory, pod_ip="10.89.0.9", host_resolv_conf=HOST_RESOLV)
    assert sorted(written) == ["hostname", "hosts", "resolv.conf"]
    assert (directory / "hostname").read_text() == "web\n"
    assert "10.89.0.9\tweb\n" in (directory / "hosts").read_text()
    assert (directory / "resolv.conf").read_text().startswith("nameserver 192.0.2.1\n")
    for path in written.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["hostname", "hosts", "resolv.conf"]
    write_etc_files(spec(), directory, pod_ip="10.89.0.10", host_resolv_conf=HOST_RESOLV)
    assert "10.89.0.10\tweb\n" in (directory / "hosts").read_text()
