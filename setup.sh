#!/usr/bin/env bash
# Installs everything liverestore needs on Debian 12 and creates .venv with the package in it.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(qemu-system-x86 qemu-utils ovmf mtools dosfstools syslinux syslinux-common e2fsprogs
              nbdkit libnbd-bin python3-libnbd cpio python3-venv ca-certificates
              libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# the test VM builder runs 'apt-get download' (kernel, busybox): it needs package lists too
have_lists=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -n 1)
if ((${#missing[@]})) || [ -z "$have_lists" ]; then
    $SUDO apt-get update -qq
fi
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# /dev/kvm without udev is root-only: libvirt then flips between "KVM usable" (its probe) and
# "not usable" (its check as libvirt-qemu) and re-probes QEMU on every domain start (60 s each).
# Debian's udev rule gives it to group kvm; do the same where no udev did.
if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" = root ] && getent group kvm >/dev/null; then
    $SUDO chgrp kvm /dev/kvm && $SUDO chmod 0660 /dev/kvm
fi
# libvirtd for the libvirt driver and the demo: started here when no service manager runs it
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl start libvirtd virtlogd || true
    else
        pgrep -x virtlogd >/dev/null || $SUDO virtlogd -d
        pgrep -x libvirtd >/dev/null || $SUDO libvirtd -d
    fi
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "setup: ready (.venv/bin/liverestore)" >&2
