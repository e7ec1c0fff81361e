"""vminit's guest set-up without a VM: the ioctl structs, mount(2) and the network
configured by ioctls, in throwaway namespaces (``unshare``) that end with the test."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from magikrun.vminit import GuestConfig
from magikrun.vminit._pod import (
    IFREQ,
    RTENTRY,
    RTF_GATEWAY,
    RTF_UP,
    SHARE_OPTIONS,
    default_route,
    ifreq,
    mount,
    netmask,
    sockaddr_in,
)

from ..conftest import requires_root


def _in_namespace(flag: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (shell) in a new namespace that dies with it."""
    return subprocess.run(
        ["unshare", flag, "sh", "-c", script], capture_output=True, text=True, timeout=60
    )


def _python(code: str) -> str:
    return f"{sys.executable} -c '{code}'"


def test_sockaddr_in_is_family_port_address_zero() -> None:
    assert sockaddr_in("10.89.3.7") == (
        socket.AF_INET.to_bytes(2, sys.byteorder) + b"\0\0" + bytes([10, 89, 3, 7]) + bytes(8)
    )


def test_ifreq_is_the_name_then_the_union() -> None:
    packed = ifreq("eth0", sockaddr_in("10.0.2.15"))
    assert IFREQ.size == len(packed) == 40
    assert packed[:16] == b"eth0" + bytes(12)
    assert packed[16:32] == sockaddr_in("10.0.2.15")
    assert packed[32:] == bytes(8)


def test_default_route_rtentry_layout() -> None:
    packed = default_route("10.89.0.1")
    assert RTENTRY.size == len(packed) == 120
    anywhere = socket.AF_INET.to_bytes(2, sys.byteorder) + bytes(14)
    assert packed[:8] == bytes(8)  # rt_pad1
    assert packed[8:24] == anywhere  # rt_dst
    assert packed[24:40] == sockaddr_in("10.89.0.1")  # rt_gateway
    assert packed[40:56] == anywhere  # rt_genmask
    assert int.from_bytes(packed[56:58], sys.byteorder) == RTF_UP | RTF_GATEWAY
    assert packed[58:] == bytes(62)  # no metric, no device (NULL), no mtu/window/irtt


@pytest.mark.parametrize(
    ("prefix", "mask"),
    [(1, "128.0.0.0"), (16, "255.255.0.0"), (24, "255.255.255.0"), (32, "255.255.255.255")],
)
def test_netmask(prefix: int, mask: str) -> None:
    assert netmask(prefix) == mask


def test_netmask_rejects_a_prefix_beyond_32() -> None:
    with pytest.raises(ValueError, match=r"prefix length 33 is outside 0\.\.32"):
        netmask(33)


def test_guest_config_carries_the_network() -> None:
    token = secrets.token_urlsafe()
    config = GuestConfig(token=token, address="10.0.2.15/24", gateway="10.0.2.2")
    assert json.loads(config.to_json())["network"] == {
        "address": "10.0.2.15/24",
        "gateway": "10.0.2.2",
    }
    assert json.loads(GuestConfig(token=token).to_json())["network"] is None


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as handle:
        return any(line.split()[1] == str(path) for line in handle)


@requires_root
def test_a_failing_mount_names_the_path_and_the_reason(short_tmp: Path) -> None:
    target = short_tmp / "share"
    target.mkdir()
    with pytest.raises(OSError) as info:
        mount("magikrun-no-such-tag", str(target), "9p", SHARE_OPTIONS)
    assert info.value.errno is not None
    reason = os.strerror(info.value.errno)
    assert str(info.value) == (
        f"[Errno {info.value.errno}] cannot mount 9p 'magikrun-no-such-tag' on {target}: {reason}"
    )
    assert not _mounted(target)


@requires_root
def test_a_failing_remount_names_the_path_and_the_reason(short_tmp: Path) -> None:
    from magikrun.vminit._pod import MS_BIND, MS_REMOUNT

    missing = short_tmp / "missing"
    with pytest.raises(OSError, match=f"cannot remount {missing} rw: No such file or directory"):
        mount(None, str(missing), None, "rw", MS_REMOUNT | MS_BIND)


@requires_root
def test_mount_turns_ro_nosuid_nodev_noexec_into_flags_and_passes_the_rest(
    short_tmp: Path,
) -> None:
    target = short_tmp / "t"
    target.mkdir()
    code = (
        "import os,stat; from magikrun.vminit._pod import mount;"
        f' mount("tmp", "{target}", "tmpfs", "mode=0701,ro,nosuid,nodev,noexec,size=1m");'
        f' f = os.statvfs("{target}").f_flag;'
        " print(*(bool(f & flag) for flag in"
        " (os.ST_RDONLY, os.ST_NOSUID, os.ST_NODEV, os.ST_NOEXEC)),"
        f' oct(stat.S_IMODE(os.stat("{target}").st_mode)))'
    )
    done = _in_namespace("-m", f"mount --make-rprivate / && {_python(code)}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True", "True", "0o701"]
    assert not _mounted(target)
    assert not _mounted(target)


@requires_root
def test_configure_network_sets_links_address_and_default_route() -> None:
    code = (
        "from magikrun.vminit._pod import configure_network;"
        ' configure_network("10.89.3.7/16", "10.89.0.1")'
    )
    done = _in_namespace(
        "-n",
        "ip link add eth0 type veth peer name peer0 && ip link set peer0 up"
        f" && {_python(code)} && ip -4 -o addr show && ip -4 route show"
        " && ip -o link show lo && ip -o link show eth0",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "inet 10.89.3.7/16" in lines[1] and "eth0" in lines[1]
    assert "default via 10.89.0.1 dev eth0" in done.stdout
    assert "10.89.0.0/16 dev eth0" in done.stdout
    assert re.search(r"\blo: <[^>]*\bUP\b", done.stdout)
    assert re.search(r"\beth0@peer0: <[^>]*\bUP\b", done.stdout)


@requires_root
def test_configure_network_without_the_device_names_it_and_the_reason() -> None:
    code = (
        "from magikrun.vminit._pod import configure_network;"
        ' configure_network("10.0.2.15/24", "10.0.2.2")'
    )
    done = _in_namespace("-n", _python(code))
    assert done.returncode != 0
    assert "cannot set eth0's address 10.0.2.15: No such device" in done.stderr
