#!/usr/bin/env bash
# Builds the ztnet/debian12 libvirt box offline-capable, as root, and adds it to Vagrant:
#
#   mmdebstrap (Debian 12 from this machine's configured Debian mirror: the kernel and its
#   matching headers, python3-bpfcc, … and the vagrant user with Vagrant's insecure key)
#   + the Python wheels ztnet needs, in /opt/ztnet-wheels (the VMs have no network)
#   → mkfs.ext4 -d (a file system image, no partition table, no loop device, no bootloader)
#   → qemu-img convert to qcow2 → box.img + metadata.json + Vagrantfile → vagrant box add.
#
# The box boots by direct kernel boot: libvirt starts the guest with the box's own kernel and
# initrd (copied to /var/lib/libvirt/boot/ztnet-debian12/, where qemu may read them) and
# "root=/dev/vda". An existing box is reused when none of its inputs changed (BOX_REVISION,
# the package list, box-customize.sh, pyproject.toml, the mirror list); ZTNET_BOX_REBUILD=1
# forces a rebuild.
#
# Environment: ZTNET_BOX (box name, default ztnet/debian12), ZTNET_BOX_CACHE (work and output
# directory, default /var/cache/ztnet-vagrant), ZTNET_BOX_REBUILD=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BOX_NAME=${ZTNET_BOX:-ztnet/debian12}
CACHE=${ZTNET_BOX_CACHE:-/var/cache/ztnet-vagrant}
BOOT_DIR=/var/lib/libvirt/boot/ztnet-debian12
# Bump when a change to this script changes the box it builds.
BOX_REVISION=1
SUITE=bookworm
DISK_GB=8
CMDLINE="root=/dev/vda rw rootfstype=ext4 console=ttyS0 net.ifnames=0 biosdevname=0"
# What scripts/setup.sh installs (except prometheus: promtool is only for the metrics tests),
# the matching kernel headers for bcc, and what Vagrant needs in a guest.
PACKAGES=(linux-image-amd64 linux-headers-amd64 initramfs-tools systemd-sysv dbus
          python3 python3-venv python3-pip python3-bpfcc python3-seccomp iproute2 util-linux procps gcc
          libpcap0.8 libbpf1 openssh-server sudo rsync kmod ca-certificates netbase
          iputils-ping less)

say() { printf 'build-box: %s\n' "$*"; }
die() { printf 'build-box: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap, libvirt's boot directory)"
for tool in mmdebstrap mkfs.ext4 qemu-img vagrant python3; do
    command -v "$tool" >/dev/null || die "$tool not found (vagrant/run-e2e.sh installs it)"
done

# Vagrant's well-known insecure key: Vagrant replaces it with a generated one on first boot.
# shellcheck disable=SC2012  # fixed paths
INSECURE_KEY=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
                  /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub \
                  /usr/share/vagrant/keys/vagrant.pub 2>/dev/null | head -n 1 || true)
[ -n "$INSECURE_KEY" ] || die "Vagrant's insecure public key (keys/vagrant.pub) not found"

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Only the Debian entries of this machine's apt configuration (one-line and deb822 files):
# the box must come from the mirror this machine is configured to use.
python3 - "$SUITE" > "$WORK/sources.list" <<'EOF'
import glob, sys
suite = sys.argv[1]
entries = []
def keep(uri, suites, comps):
    for s in suites:
        if s == suite or s.startswith(suite + "-"):
            entries.append(f"deb {uri} {s} {' '.join(comps)}")
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words.pop(0)
            words.pop(0)
        if len(words) >= 3 and "debian" in words[0]:
            keep(words[0], [words[1]], words[2:])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"]) == ["no"]:
            continue
        for uri in fields.get("uris", []):
            if "debian" in uri:
                keep(uri, fields.get("suites", []), fields.get("components", ["main"]))
print("\n".join(dict.fromkeys(entries)))
EOF
[ -s "$WORK/sources.list" ] || die "no Debian $SUITE entry in /etc/apt/sources.list*"

# The inputs: when none changed, the box that was built from them is reused.
inputs=$( { echo "$BOX_REVISION ${PACKAGES[*]} $CMDLINE $DISK_GB"
           cat "$HERE/box-customize.sh" "$ROOT/pyproject.toml" "$WORK/sources.list"; } \
         | sha256sum | cut -c1-16)
stamp="$CACHE/box.inputs"
if [ "${ZTNET_BOX_REBUILD:-0}" != 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ] \
        && vagrant box list 2>/dev/null | grep -q "^$BOX_NAME " \
        && [ -f "$BOOT_DIR/vmlinuz" ] && [ -f "$BOOT_DIR/initrd.img" ]; then
    say "reusing box $BOX_NAME (inputs $inputs unchanged)"
    exit 0
fi
say "building box $BOX_NAME (inputs $inputs) in $WORK"
start=$(date +%s)

# Python wheels for `pip install -e .[test]` (and its build backend), for CPython 3.11 on
# x86_64 like the guest; the VMs install them with PIP_NO_INDEX/PIP_FIND_LINKS.
python3 - "$ROOT/pyproject.toml" > "$WORK/requirements.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
reqs = list(project["project"]["dependencies"])
for extra in project["project"].get("optional-dependencies", {}).values():
    reqs += extra
reqs += project.get("build-system", {}).get("requires", [])
print("\n".join(reqs + ["pip"]))
EOF
python3 -m venv "$WORK/pip-venv"
say "downloading wheels: $(tr '\n' ' ' < "$WORK/requirements.txt")"
"$WORK/pip-venv/bin/pip" download -q --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any \
    -d "$WORK/wheels" -r "$WORK/requirements.txt"

# The root file system. Hooks run on this machine with the new root as $1 (hence the single
# quotes: $1 is mmdebstrap's, not ours).
key=$(cat "$INSECURE_KEY")
say "mmdebstrap $SUITE ($(wc -l < "$WORK/sources.list") apt sources)"
# shellcheck disable=SC2016
mmdebstrap --variant=apt --mode=root --format=directory \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --customize-hook="mkdir -p \"\$1/opt/ztnet-wheels\" && cp '$WORK/wheels/'* \"\$1/opt/ztnet-wheels/\"" \
    --customize-hook='chroot "$1" useradd -m -s /bin/bash -G sudo vagrant' \
    --customize-hook='echo "vagrant:vagrant" | chroot "$1" chpasswd' \
    --customize-hook='echo "vagrant ALL=(ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/vagrant"; chmod 0440 "$1/etc/sudoers.d/vagrant"' \
    --customize-hook="install -d -m 0700 -o 1000 -g 1000 \"\$1/home/vagrant/.ssh\"; echo '$key' > \"\$1/home/vagrant/.ssh/authorized_keys\"; chown 1000:1000 \"\$1/home/vagrant/.ssh/authorized_keys\"; chmod 0600 \"\$1/home/vagrant/.ssh/authorized_keys\"" \
    --customize-hook="$HERE/box-customize.sh \"\$1\"" \
    "$SUITE" "$WORK/root" "$WORK/sources.list"

# shellcheck disable=SC2012  # Debian's kernel file names
kernel=$(ls "$WORK"/root/boot/vmlinuz-* | sort -V | tail -n 1)
# shellcheck disable=SC2012
initrd=$(ls "$WORK"/root/boot/initrd.img-* | sort -V | tail -n 1)
kver=${kernel##*/vmlinuz-}
[ -d "$WORK/root/usr/src/linux-headers-$kver" ] || die "no headers for kernel $kver in the box"
say "kernel $kver; file system image (${DISK_GB} GiB, ext4)"
cp "$kernel" "$WORK/vmlinuz"
cp "$initrd" "$WORK/initrd.img"
truncate -s "${DISK_GB}G" "$WORK/root.raw"
mkfs.ext4 -q -F -L ztnet-root -d "$WORK/root" "$WORK/root.raw"
rm -rf "$WORK/root"
mkdir "$WORK/box"
qemu-img convert -c -O qcow2 "$WORK/root.raw" "$WORK/box/box.img"
rm -f "$WORK/root.raw"
cp "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/box/"
cat > "$WORK/box/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $DISK_GB}
EOF
# The box's own Vagrantfile: direct kernel boot. qemu runs as an unprivileged user that
# cannot read ~/.vagrant.d, so the kernel and initrd are used from libvirt's boot directory
# when they are there (this script puts them there), else from the box itself.
cat > "$WORK/box/Vagrantfile" <<EOF
# ztnet/debian12: Debian 12 for ztnet's VMs, built by vagrant/build-box.sh (inputs $inputs).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    boot = File.file?("$BOOT_DIR/vmlinuz") ? "$BOOT_DIR" : File.dirname(__FILE__)
    libvirt.kernel = File.join(boot, "vmlinuz")
    libvirt.initrd = File.join(boot, "initrd.img")
    libvirt.cmd_line = "$CMDLINE"
    libvirt.disk_bus = "virtio"
  end
end
EOF
# not gzipped: the qcow2 image is compressed already
tar -C "$WORK/box" -cf "$CACHE/ztnet-debian12.box" metadata.json Vagrantfile box.img vmlinuz initrd.img

install -d -m 0755 "$BOOT_DIR"
install -m 0644 "$WORK/vmlinuz" "$BOOT_DIR/vmlinuz"
install -m 0644 "$WORK/initrd.img" "$BOOT_DIR/initrd.img"

# Replace the box, and the copy vagrant-libvirt uploaded of the old one into the storage pool
# (it would otherwise keep using that).
if vagrant box list 2>/dev/null | grep -q "^$BOX_NAME "; then
    vagrant box remove --force --all "$BOX_NAME" >/dev/null
fi
if command -v virsh >/dev/null && virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
    for vol in $(virsh -c qemu:///system vol-list default | awk 'NR > 2 {print $1}' \
                     | grep "^${BOX_NAME//\//-VAGRANTSLASH-}_vagrant_box_image_" || true); do
        virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null
    done
fi
vagrant box add --name "$BOX_NAME" "$CACHE/ztnet-debian12.box" >/dev/null
echo "$inputs" > "$stamp"
say "added box $BOX_NAME ($(du -h "$CACHE/ztnet-debian12.box" | cut -f1)) in $(( $(date +%s) - start ))s"
