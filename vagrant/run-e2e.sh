#!/usr/bin/env bash
# `make test-vagrant` (root): ztnet across real VMs, end to end.
#
#   1. installs what it needs (vagrant, vagrant-libvirt, libvirt, qemu, mmdebstrap) if missing
#   2. starts libvirtd and virtlogd (by hand when there is no systemd)
#   3. builds the ztnet/debian12 box offline, or reuses it (build-box.sh)
#   4. probes whether KVM can run a guest; if not, VMs run under QEMU's software emulation
#   5. vagrant up: controller, host-a, host-b, services (Vagrantfile)
#   6. runs the end-to-end checks (e2e.py) and prints their table
#   7. always destroys the VMs (vagrant destroy -f), whatever happened
#
# Everything CPU-heavy runs at nice 19 (the box build, and every qemu process), so other work
# on the machine keeps priority. ZTNET_VAGRANT_KEEP=1 leaves the VMs up for debugging;
# ZTNET_LIBVIRT_DRIVER=kvm|qemu skips the probe.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
START=$(date +%s)
BOOT_DIR=/var/lib/libvirt/boot/ztnet-debian12
LOG_DIR=/var/log/ztnet-vagrant
say() { printf 'test-vagrant: %s\n' "$*"; }
die() { printf 'test-vagrant: %s\n' "$*" >&2; exit 1; }
elapsed() { local s=$(( $(date +%s) - START )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

[ "$(id -u)" -eq 0 ] || die "must run as root (libvirt, building the box)"

# --- 1. packages ------------------------------------------------------------------------------
PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils mmdebstrap
          rsync openssh-client dnsmasq-base iptables)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- 2. libvirt -------------------------------------------------------------------------------
# /dev/kvm as udev would leave it (root:kvm 0660). When only root may open it, libvirtd finds
# KVM in its capability probe but "unusable" for the qemu user, and so throws its cache away
# and probes qemu again on every call: vagrant up then crawls.
if [ -c /dev/kvm ] && getent group kvm >/dev/null \
        && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
libvirt_up() { virsh -c qemu:///system version >/dev/null 2>&1; }
if ! libvirt_up; then
    if [ -d /run/systemd/system ]; then
        systemctl start virtlogd.socket libvirtd.service
    else
        # No systemd: start the daemons ourselves. The qemu processes libvirtd starts inherit
        # its nice value.
        say "no systemd: starting virtlogd and libvirtd by hand"
        pgrep -x virtlogd >/dev/null || nice -n 19 virtlogd -d
        nice -n 19 libvirtd -d
    fi
    for _ in $(seq 30); do libvirt_up && break; sleep 1; done
    libvirt_up || die "libvirtd did not come up"
fi
if ! virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
    # vagrant-libvirt keeps its images in the "default" storage pool.
    virsh -c qemu:///system pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    virsh -c qemu:///system pool-start default >/dev/null
    virsh -c qemu:///system pool-autostart default >/dev/null
fi

# --- 3. the box -------------------------------------------------------------------------------
box_start=$(date +%s)
nice -n 19 ionice -c 3 bash "$HERE/build-box.sh"
box_seconds=$(( $(date +%s) - box_start ))

# --- 4. KVM or software emulation --------------------------------------------------------------
# /dev/kvm may exist and still be unable to run a stock guest kernel: boot the box's kernel
# with no root file system under KVM; reaching the root mount (its panic) proves KVM works.
kvm_works() {
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    local log
    log=$(mktemp)
    (timeout 40 nice -n 19 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults \
        -display none -no-reboot -serial "file:$log" -kernel "$BOOT_DIR/vmlinuz" \
        -append "console=ttyS0 panic=-1 root=/dev/nonexistent" >/dev/null 2>&1; true) \
        2>/dev/null  # qemu aborts where KVM cannot run the guest: no "Aborted" from bash
    grep -q "VFS: Unable to mount root\|Kernel panic" "$log"
    local ok=$?
    rm -f "$log"
    return $ok
}
if [ -z "${ZTNET_LIBVIRT_DRIVER:-}" ]; then
    if kvm_works; then ZTNET_LIBVIRT_DRIVER=kvm; else ZTNET_LIBVIRT_DRIVER=qemu; fi
fi
export ZTNET_LIBVIRT_DRIVER
say "libvirt driver: $ZTNET_LIBVIRT_DRIVER$([ "$ZTNET_LIBVIRT_DRIVER" = qemu ] && echo ' (software emulation: KVM cannot run a guest here)')"

# --- 5. the VMs, destroyed whatever happens ----------------------------------------------------
renicer=""
# shellcheck disable=SC2317  # called by the trap
cleanup() {
    local rc=$?
    [ -z "$renicer" ] || kill "$renicer" 2>/dev/null || true
    if [ "${ZTNET_VAGRANT_KEEP:-0}" = 1 ]; then
        say "ZTNET_VAGRANT_KEEP=1: the VMs stay up (cd vagrant && vagrant destroy -f)"
    else
        say "destroying the VMs"
        vagrant destroy -f >/dev/null 2>&1 || vagrant destroy -f || true
        rm -rf "$HERE/.shared/enroll"
    fi
    say "total $(elapsed) (box ${box_seconds}s)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Every thread of our qemu processes at nice 19, whoever started libvirtd.
renice_qemu() {
    local pidfile pid
    while sleep 3; do
        for pidfile in /run/libvirt/qemu/ztnet-*.pid; do
            [ -f "$pidfile" ] || continue
            pid=$(cat "$pidfile")
            for task in /proc/"$pid"/task/*; do
                renice -n 19 -p "${task##*/}" >/dev/null 2>&1 || true
            done
        done
    done
}
renice_qemu &
renicer=$!

mkdir -p "$LOG_DIR"
rm -rf "$HERE/.shared/enroll"
vagrant destroy -f >/dev/null 2>&1 || true  # leftovers of an interrupted run
up_start=$(date +%s)
say "vagrant up (4 VMs; console logs in $LOG_DIR)"
# (without the box upload's progress bar, which redraws itself thousands of times)
vagrant up --provider libvirt 2>&1 | sed -u 's/\x1b\[K//g; s/\r/\n/g' \
    | grep --line-buffered -v '^Progress: '
up_seconds=$(( $(date +%s) - up_start ))
say "VMs up and provisioned in ${up_seconds}s"

# --- 6. the checks ----------------------------------------------------------------------------
e2e_rc=0
python3 "$HERE/e2e.py" --vagrant-dir "$HERE" || e2e_rc=$?
say "box ${box_seconds}s, vagrant up ${up_seconds}s, total so far $(elapsed)"
exit "$e2e_rc"
