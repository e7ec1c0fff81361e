"""The guest's ``/init``: a busybox script that gets Python running vminit as PID 1.

Python cannot start before its files are reachable, and they live on the host: so a
few lines of busybox shell load the modules, build a root from the initramfs's
``/sysroot`` and a few host directories shared read-only (``/usr``, the Python
installation, the magikrun package: never the host's whole root, which holds other
users' files and secrets), give it fresh /run and /tmp, move the VM's private
configuration to a guest-only tmpfs, and change root into Python running vminit: the
host's interpreter over the shares, or one packed into the initramfs under
``/sysroot`` that reads nothing from the host. vminit mounts /proc, /sys, /dev and
cgroup2 itself (:func:`~magikrun.vminit._pod.mount_system`), by system calls.

The script calls busybox's applets by name where busybox's shell runs them in a forked
child without an ``exec`` (each ``exec`` of busybox cost the boot about 30 ms under
TCG); ``mount`` is not one of those, so it runs as ``$B mount``.

The root is ``/sysroot`` bind-mounted onto itself and moved over ``/``, as
``switch_root`` moves a tmpfs: a root that is a mount with a parent, so crun can
``pivot_root`` into containers, while the files packed there need no copy (copying
the packed interpreter into a tmpfs cost about a second under TCG).

Python starts with ``-I -S -X utf8`` under ``LC_ALL=C`` (no locale files to read, UTF-8
all the same) and a bootstrap that registers ``magikrun`` and
``magikrun.vminit`` as bare packages: the guest then imports only vminit's own
stdlib-only modules, not the site machinery, ``magikrun/__init__`` or the host-side
client (each of which costs the boot hundreds of milliseconds under TCG).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from ._pod import HOSTNAME

__all__ = ["CONFIG_PATH", "NEW_ROOT", "early_init_script"]

CONFIG_PATH = "/run/magikrun-vm/config.json"
"""Where vminit finds its configuration in the guest (tmpfs, mode 0600)."""
NEW_ROOT = "/sysroot"
"""The initramfs directory that becomes the guest's root."""

_MOUNT_OPTIONS = {
    "9p": "trans=virtio,version=9p2000.L,cache=loose,msize=524288,ro",
    "virtiofs": "ro",
}


_BOOTSTRAP = (
    "import sys,types\n"
    "for n,p in (('magikrun',{package!r}),('magikrun.vminit',{package!r}+'/vminit')):\n"
    "    m=types.ModuleType(n);m.__path__=[p];sys.modules[n]=m\n"
    "from magikrun.vminit.__main__ import main\n"
    "main(sys.argv)\n"
)


def early_init_script(
    python: str | Sequence[str],
    package: str,
    shares: Sequence[tuple[str, str]],
    links: Sequence[tuple[str, str]] = (),
    share: str = "9p",
) -> bytes:
    """The ``/init`` text: mount ``shares`` ((tag, host path) pairs, each at the same path
    in the guest) over ``share``, add the top-level ``links`` ((name, target) pairs such
    as ``bin -> usr/bin``), and start vminit with ``python`` (the interpreter, or the
    command line that starts it) from ``package``.
    """
    if share not in _MOUNT_OPTIONS:
        raise ValueError(f"unknown root share {share!r} (9p or virtiofs)")
    q = shlex.quote
    bootstrap = _BOOTSTRAP.format(package=package)
    command = " ".join(map(q, [python] if isinstance(python, str) else python))
    lines = [f"ln -s {q(target)} /sysroot/{q(name)}" for name, target in links]
    for tag, path in shares:
        lines.append(f"mkdir -p /sysroot{q(path)}")
        lines.append(
            f"$B mount -t {share} -o {_MOUNT_OPTIONS[share]} {q(tag)} /sysroot{q(path)}"
            f' || fail "cannot mount {tag}"'
        )
    mounts = "\n".join(lines)
    return f"""#!/bin/sh
B=/bin/busybox
fail() {{ echo "magikrun-init: $*"; $B reboot -f; }}
umask 022
while read m; do insmod /modules/$m || fail "insmod $m failed"; done < /modules.list
$B mount --bind /sysroot /sysroot || fail "cannot bind the root"
mkdir /sysroot/etc /sysroot/proc /sysroot/sys /sysroot/dev /sysroot/run /sysroot/tmp
mkdir -m 0700 /sysroot/root
$B mount -t tmpfs -o mode=0755,nosuid,nodev run /sysroot/run || fail "cannot mount /run"
$B mount -t tmpfs -o mode=1777,nosuid,nodev tmp /sysroot/tmp || fail "cannot mount /tmp"
{mounts}
echo "root:x:0:0:root:/root:/bin/sh" > /sysroot/etc/passwd
echo "root:x:0:" > /sysroot/etc/group
echo "127.0.0.1 localhost" > /sysroot/etc/hosts
echo {q(HOSTNAME)} > /sysroot/etc/hostname
$B mount -o remount,bind,ro /sysroot
mkdir -m 0700 /sysroot/run/magikrun-vm
cp /vm/config.json /sysroot{CONFIG_PATH}
rm -r /vm
export LC_ALL=C
cd /sysroot && $B mount --move . / || fail "cannot move the root"
exec $B chroot . {command} -I -S -X utf8 -c {q(bootstrap)} {CONFIG_PATH}
""".encode()
