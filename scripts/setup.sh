#!/usr/bin/env bash
# Idempotent host set-up for ztnet, as root on Debian 12 / Ubuntu 24.04:
# distribution packages (bcc and the TPM bindings from the distribution, never from
# PyPI; swtpm for the TPM tests), kernel
# headers for bcc, a bpf filesystem, and .venv with the project and its test
# and lab extras. A second run with nothing to do takes seconds.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
say() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (installs packages, mounts bpffs)" >&2
    exit 1
fi

PACKAGES=(python3 python3-venv python3-pip python3-bpfcc python3-seccomp iproute2 util-linux procps gcc libpcap0.8
          libbpf1 libfaketime)
# The head-to-head benchmark (benchmarks/headtohead.py) compares ztnet with nftables and
# iptables and runs iperf3; it only ever loads rules inside the namespaces it creates.
# None of these packages loads a rule or starts a service when installed (iperf3 asks
# whether to start its daemon; the non-interactive default is no). libnfnetlink0 and libmnl0
# are what the unpacked opensnitchd links against (below).
[ "${ZTNET_SETUP_NO_BENCH:-0}" = 1 ] || PACKAGES+=(iperf3 nftables iptables libnfnetlink0 libmnl0)
# TPM-bound host identity (`ztnet enroll --tpm`): the TSS bindings from the distribution
# (like bcc, never from PyPI: they build against these tss2 libraries), and a software TPM
# with its EK-certificate tooling for the tests. ZTNET_SETUP_NO_TPM=1 leaves them out
# (the Vagrant boxes, offline, enroll their hosts without a TPM).
[ "${ZTNET_SETUP_NO_TPM:-0}" = 1 ] || PACKAGES+=(python3-tpm2-pytss swtpm swtpm-tools tpm2-tools)
# promtool (the metrics tests) is left out where no test runs: the Vagrant VMs, which have no
# network and find everything else already installed in their box.
[ "${ZTNET_SETUP_NO_PROMTOOL:-0}" = 1 ] || PACKAGES+=(prometheus)
# PostgreSQL for the replica store's tests (ztnet/testing/postgres.py runs its own cluster
# from the binaries in a temporary directory, as nobody); the package's own cluster is
# stopped below. ZTNET_SETUP_NO_POSTGRES=1 leaves it out (the Vagrant boxes).
[ "${ZTNET_SETUP_NO_POSTGRES:-0}" = 1 ] || PACKAGES+=(postgresql)
KERNEL=$(uname -r)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt_install "${missing[@]}"
    # Only promtool is wanted from the prometheus package (metrics tests):
    # do not leave a Prometheus server running on the host.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
    fi
    # Nor a PostgreSQL server: tests start their own.
    if [[ " ${missing[*]} " == *" postgresql "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
fi

# Kernel headers: bcc compiles the programs at load time against
# /lib/modules/$(uname -r)/build.
if [ ! -e "/lib/modules/$KERNEL/build/include" ] && [ ! -e "/lib/modules/$KERNEL/build/Makefile" ]; then
    if [ "$apt_updated" -eq 0 ]; then apt-get update -qq; apt_updated=1; fi
    if apt-cache show "linux-headers-$KERNEL" >/dev/null 2>&1; then
        say "installing linux-headers-$KERNEL"
        apt_install "linux-headers-$KERNEL"
    else
        generic=linux-headers-amd64
        # shellcheck source=/dev/null
        [ -r /etc/os-release ] && . /etc/os-release
        [ "${ID:-}" = ubuntu ] && generic=linux-headers-generic
        [ "$(dpkg --print-architecture)" = arm64 ] && [ "${ID:-}" != ubuntu ] && generic=linux-headers-arm64
        apt_install "$generic"
        # shellcheck disable=SC2010,SC2012  # names of Debian header directories: no odd characters
        build=$(ls -d /usr/src/linux-headers-*/ 2>/dev/null | grep -v -- '-common/$' | sort -V | tail -n 1)
        # shellcheck disable=SC2012
        common=$(ls -d /usr/src/linux-headers-*-common/ 2>/dev/null | sort -V | tail -n 1)
        [ -n "$build" ] || { echo "setup: no kernel headers found under /usr/src" >&2; exit 1; }
        mkdir -p "/lib/modules/$KERNEL"
        ln -sfn "${build%/}" "/lib/modules/$KERNEL/build"
        ln -sfn "${common:-$build}" "/lib/modules/$KERNEL/source"
        warn "no headers package for kernel $KERNEL; linked the distribution's generic" \
             "headers (${build%/}) at /lib/modules/$KERNEL/{build,source}." \
             "They work for ztnet's program types (cgroup_skb, cgroup_sock_addr)."
    fi
fi

# Pins live on a bpf filesystem.
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {found=1} END {exit !found}' /proc/mounts; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    say "mounted bpffs at /sys/fs/bpf"
fi

# The venv must see the distribution's bcc: system interpreter, system site packages.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
    say "creating $VENV"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi

stamp="$VENV/.ztnet-installed"
want=$(cat pyproject.toml setup.py | sha256sum | cut -d" " -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing ztnet and its test, lab and bench extras into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[test,lab,bench]"
    echo "$want" > "$stamp"
fi
# The wire protocol lives only in proto/; its Python code is generated here.
"$VENV/bin/python" -m ztnet.protogen >/dev/null

# OpenSnitch for the head-to-head (benchmarks/h2h_scenarios.py): Debian's package is
# downloaded and unpacked under .venv, never installed, because its postinst starts
# opensnitchd on the host, where its rules would queue every connection the host makes. The
# bench runs the unpacked binary inside its own network and mount namespaces only.
OPENSNITCH="$VENV/opensnitch"
if [ "${ZTNET_SETUP_NO_BENCH:-0}" != 1 ] && [ ! -x "$OPENSNITCH/usr/bin/opensnitchd" ]; then
    say "unpacking Debian's opensnitch into $OPENSNITCH (not installed)"
    debs=$(mktemp -d)
    chmod 0755 "$debs"  # apt's download sandbox user must be able to write here
    fetch() { (cd "$debs" && apt-get download -qq opensnitch libnetfilter-queue1); }
    if ! fetch 2>/dev/null; then
        apt-get update -qq
        apt_updated=1
        fetch
    fi
    mkdir -p "$OPENSNITCH.tmp"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$OPENSNITCH.tmp"; done
    rm -rf "$debs" "$OPENSNITCH"
    mv "$OPENSNITCH.tmp" "$OPENSNITCH"
fi

# The second-language client of tests/interop (Node.js); its test skips without npm.
NODE_CLIENT="$ROOT/tests/interop/node_client"
if command -v npm >/dev/null 2>&1; then
    lock=$(sha256sum "$NODE_CLIENT/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$NODE_CLIENT/node_modules/.ztnet-installed" 2>/dev/null)" != "$lock" ]; then
        say "installing the Node.js interop client's packages (npm ci)"
        (cd "$NODE_CLIENT" && npm ci --no-audit --no-fund --loglevel=error)
        echo "$lock" > "$NODE_CLIENT/node_modules/.ztnet-installed"
    fi
else
    warn "npm not found: tests/interop (the Node.js client) will be skipped"
fi

# Opt-in: ZTNET_INSTALL_UNIT=1 installs the daemon's systemd unit, run from this checkout.
if [ "${ZTNET_INSTALL_UNIT:-0}" = 1 ]; then
    sed "s#/usr/local/bin/ztnet#$VENV/bin/ztnet#" packaging/ztnet-daemon.service \
        > /etc/systemd/system/ztnet-daemon.service
    chmod 0644 /etc/systemd/system/ztnet-daemon.service
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        say "installed ztnet-daemon.service (set ZTNET_CONTROLLER in /etc/default/ztnet," \
            "then: systemctl enable --now ztnet-daemon)"
    else
        say "installed ztnet-daemon.service; systemd is not running here, so not reloaded"
    fi
fi
say "ready ($("$VENV/bin/python" -c 'import bcc, sys; print("python", sys.version.split()[0], "+ bcc")'))"
