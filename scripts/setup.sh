#!/usr/bin/env bash
# Idempotent setup for a Debian 12 host, run as root: the Debian packages magikrun
# drives, then a virtual environment at .venv/ with magikrun installed editable.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

packages=(
    crun runc conmon docker-registry skopeo umoci busybox-static
    qemu-system-x86 linux-image-amd64 passt containernetworking-plugins
    iproute2 iptables wabt apache2-utils podman catatonit hyperfine
    python3-venv
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: installing packages needs root; run as root or install them yourself" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python=${MAGIKRUN_PYTHON:-}
if [[ -z $python ]]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            python=$candidate
            break
        fi
    done
fi
[[ -n $python ]] || { echo "setup: no Python 3.11+ with venv found" >&2; exit 1; }

stamp=.venv/.magikrun-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -x .venv/bin/python || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "setup: creating .venv with $python"
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
