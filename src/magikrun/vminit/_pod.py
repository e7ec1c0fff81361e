"""Guest set-up before the pod's containers start: the pod's shares and the network.

The host shares each container's root filesystem, bundle and the pod's volumes over
9p at the same absolute paths as on the host, so the bundles' ``config.json`` files
(written by the host's ``BundleBuilder``) hold valid paths in the guest as well.
Run synchronously by PID 1 before it installs its SIGCHLD handling.

Everything here is a system call from PID 1 itself (``mount(2)`` through ctypes,
``ioctl(2)`` on an ``AF_INET`` socket): each busybox process it replaces cost 50-70 ms
under TCG, a dozen of them most of a second of the pod's start.
"""

from __future__ import annotations

import _socket  # socket.py's enum conversions cost the boot tens of ms under TCG
import fcntl
import os
import struct

from ._init import PATH

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "READ_ONLY_OPTIONS",
    "SHARE_OPTIONS",
    "configure_network",
    "mount",
    "mount_system",
    "prepare",
]

SHARE_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288"
"""Writable pod shares: no ``cache=loose``, the host writes into them as well."""
READ_ONLY_OPTIONS = SHARE_OPTIONS + ",cache=loose,ro"
"""Read-only host directories (a Python's site-packages): cached, as the guest's root is."""

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
}
"""Options that ``mount(8)`` turns into flags: the filesystem's own parser ignores them."""

# <linux/sockios.h>, <linux/if.h>, <linux/route.h>
SIOCADDRT = 0x890B
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2

_IFNAMSIZ = 16
IFREQ = struct.Struct("@16s24s")
"""x86-64 ``struct ifreq`` (40 bytes): ``ifr_name[IFNAMSIZ=16]``, then a 24-byte union
(its largest member is ``struct ifmap``) that holds a ``struct sockaddr`` or
``short ifr_flags`` at its start."""
SOCKADDR_IN = struct.Struct("=HH4s8x")
"""``struct sockaddr_in`` (16 bytes, the size of ``struct sockaddr``): family in host
order, port (0 here), the IPv4 address in network order, 8 bytes of zero."""
RTENTRY = struct.Struct("@L16s16s16sHhLPhPLLH0L")
"""x86-64 ``struct rtentry`` (120 bytes): ``rt_pad1``; ``rt_dst``, ``rt_gateway``,
``rt_genmask`` (sockaddrs); ``rt_flags``, ``rt_pad2``, ``rt_pad3``, ``rt_pad4``,
``rt_metric``, ``char *rt_dev`` (NULL: the kernel picks the device that reaches the
gateway), ``rt_mtu``, ``rt_window``, ``rt_irtt``; native alignment pads it, ``0L`` ends
it on an 8-byte boundary."""


def mount(
    source: str | None, target: str, fstype: str | None, options: str, flags: int = 0
) -> None:
    """``mount(2)``; ``options`` as ``mount -o`` takes them (``ro``/``rw`` become flags).

    A failure raises OSError naming the target and the errno's text.
    """
    data = []
    for option in options.split(",") if options else ():
        if option in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[option]
        else:
            data.append(option)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    encode = os.fsencode
    result = libc.mount(
        None if source is None else encode(source),
        encode(target),
        None if fstype is None else encode(fstype),
        flags,
        ",".join(data).encode() if data else None,
    )
    if result != 0:
        err = ctypes.get_errno()
        what = f"mount {fstype} {source!r} on {target}" if fstype else f"remount {target} {options}"
        raise OSError(err, f"cannot {what}: {os.strerror(err)}")


HOSTNAME = "magikrun-vm"
SYSTEM_MOUNTS = (
    ("proc", "/proc", "proc", "nosuid,nodev,noexec"),
    ("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec"),
    ("dev", "/dev", "devtmpfs", "nosuid,mode=0755"),
    ("devpts", "/dev/pts", "devpts", "nosuid,noexec,newinstance,ptmxmode=0666"),
    ("shm", "/dev/shm", "tmpfs", "mode=1777,nosuid,nodev"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", "nosuid,nodev,noexec"),
)
"""(source, target, type, options) of the kernel filesystems, in order (/init made the
first three mount points in the read-only root; the others live in what mounts before)."""


def mount_system() -> None:
    """Mount :data:`SYSTEM_MOUNTS` and set the hostname: first thing in PID 1, which
    does it by system calls where busybox ``mount`` processes cost the boot ~30 ms each."""
    for source, target, fstype, options in SYSTEM_MOUNTS:
        if target.startswith("/dev/"):
            os.makedirs(target, exist_ok=True)
        mount(source, target, fstype, options)
    _socket.sethostname(HOSTNAME)


def _run(argv: list[str]) -> None:
    pid = os.posix_spawn(argv[0], argv, {"PATH": PATH})
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OSError(f"guest set-up step {argv} exited with {code}")


def sockaddr_in(address: str) -> bytes:
    return SOCKADDR_IN.pack(_socket.AF_INET, 0, _socket.inet_aton(address))


def ifreq(name: str, data: bytes) -> bytes:
    return IFREQ.pack(name.encode(), data)


def default_route(gateway: str) -> bytes:
    """The ``struct rtentry`` of ``route add default gw GATEWAY``."""
    anywhere = SOCKADDR_IN.pack(_socket.AF_INET, 0, bytes(4))
    return RTENTRY.pack(
        0, anywhere, sockaddr_in(gateway), anywhere, RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0
    )


def netmask(prefix: int) -> str:
    if not 0 <= prefix <= 32:
        raise ValueError(f"prefix length {prefix} is outside 0..32")
    return _socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))


def _ioctl(sock: _socket.socket, request: int, data: bytes, what: str) -> bytes:
    try:
        result: bytes = fcntl.ioctl(sock, request, data)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot {what}: {os.strerror(exc.errno or 0)}") from None
    return result


def _link_up(sock: _socket.socket, name: str) -> None:
    current = _ioctl(sock, SIOCGIFFLAGS, ifreq(name, b""), f"read the flags of {name}")
    (flags,) = struct.unpack_from("@h", current, _IFNAMSIZ)
    _ioctl(sock, SIOCSIFFLAGS, ifreq(name, struct.pack("@h", flags | IFF_UP)), f"set {name} up")


def configure_network(address: str, gateway: str | None, device: str = "eth0") -> None:
    """What ``ip link set lo up; ip addr add ADDRESS dev eth0; ip link set eth0 up;
    ip route add default via GATEWAY`` do, for ``address`` as ``IP/PREFIX``."""
    ip, _, prefix = address.partition("/")
    mask = netmask(int(prefix or 32))
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        _link_up(sock, "lo")
        _ioctl(sock, SIOCSIFADDR, ifreq(device, sockaddr_in(ip)), f"set {device}'s address {ip}")
        _ioctl(sock, SIOCSIFNETMASK, ifreq(device, sockaddr_in(mask)), f"set {device}'s netmask")
        _link_up(sock, device)
        if gateway:
            _ioctl(sock, SIOCADDRT, default_route(gateway), f"add the default route via {gateway}")
    finally:
        sock.close()


def prepare(config: dict[str, Any]) -> None:
    """Mount ``config["mounts"]`` and ``config["read_only_mounts"]`` ((tag, path) pairs),
    configure ``config["network"]`` (``address``, ``gateway``), then run each
    ``config["setup"]`` argv."""
    mounts = [(tag, path, SHARE_OPTIONS) for tag, path in config.get("mounts", [])]
    mounts += [(tag, path, READ_ONLY_OPTIONS) for tag, path in config.get("read_only_mounts", [])]
    if mounts:
        mount(None, "/", None, "rw", MS_REMOUNT | MS_BIND)
        for tag, path, options in mounts:
            os.makedirs(path, exist_ok=True)
            mount(tag, path, "9p", options)
        mount(None, "/", None, "ro", MS_REMOUNT | MS_BIND)
    network = config.get("network")
    if network:
        configure_network(network["address"], network.get("gateway"))
    for argv in config.get("setup", []):
        _run([str(arg) for arg in argv])
