#!/usr/bin/env bash
# mmdebstrap customize hook of build-box.sh: turns the root file system at $1 into a Vagrant
# guest that boots quickly under software emulation. Runs on the build machine, as root.
set -euo pipefail
root=${1:?usage: box-customize.sh ROOTDIR}

# Direct kernel boot with root=/dev/vda: the whole disk is the file system.
echo "/dev/vda / ext4 defaults,noatime 0 1" > "$root/etc/fstab"
echo ztnet > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tztnet\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$root/etc/hosts"

# Networking by systemd-networkd: DHCP on eth0 (Vagrant's management network); Vagrant
# writes its own .network files for the private network it is given (eth1).
cat > "$root/etc/systemd/network/10-vagrant-management.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4
EOF
systemctl --root "$root" enable systemd-networkd.service >/dev/null 2>&1
# network-online.target is reached when any link is up (the management one), not all.
mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat > "$root/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=60
EOF

# Every VM gets its own SSH host keys at first boot, not the ones made in the build.
rm -f "$root"/etc/ssh/ssh_host_*
cat > "$root/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
systemctl --root "$root" enable ssh-host-keys.service >/dev/null 2>&1
printf 'UseDNS no\nGSSAPIAuthentication no\n' > "$root/etc/ssh/sshd_config.d/vagrant.conf"

# Nothing periodic competes with the tests for an emulated CPU; the journal stays in memory.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
            fstrim.timer systemd-timesyncd.service; do
    systemctl --root "$root" mask "$unit" >/dev/null 2>&1 || true
done
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/volatile.conf"
