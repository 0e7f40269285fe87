#!/usr/bin/env bash
# Provisioning of ztnet's VMs (see Vagrantfile), as root inside the guest:
#
#   provision.sh addresses LAB_IPV4 ADDR/PREFIX|route:CIDR...   (every boot)
#   provision.sh controller|host-a|host-b|services              (once)
#
# ztnet is in /ztnet (rsync) and is installed by the project's own scripts/setup.sh; with the
# offline box (build-box.sh) every package is already there and pip takes the wheels baked
# into /opt/ztnet-wheels. Roles, addresses, ports, DNS records and the policy come from
# ztnet/lab (labvm.py), the same code as `ztnet lab` and `make demo`.
# The lab's variables (CONTROLLER_V4, API_V4, …) are set by eval in setup().
# shellcheck disable=SC2153
set -euo pipefail

SRC=/ztnet
SHARED=/ztnet-shared
PY=$SRC/.venv/bin/python
ZTNET=$SRC/.venv/bin/ztnet
CONTROLLER_IP=10.77.0.10  # the Vagrantfile's; setup() checks that the lab agrees
CTL_STATE=/var/lib/ztnet-controller
ADMIN=/root/ztnet-admin
WAIT_TOKEN=${ZTNET_WAIT_TOKEN:-2400}  # seconds a host waits for the controller's token

say() { printf '%s: %s\n' "$(hostname)" "$*"; }
die() { printf '%s: ERROR: %s\n' "$(hostname)" "$*" >&2; exit 1; }

# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
    local limit=$1 start=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - start)) -lt "$limit" ] || return 1
        sleep 2
    done
}

# The interface that holds LAB_IPV4 (Vagrant's private network), then each address or route.
addresses() {
    local lab_ip=$1 iface item
    shift
    iface=$(ip -o -4 addr show | awk -v ip="$lab_ip" 'index($4, ip "/") == 1 {print $2; exit}')
    [ -n "$iface" ] || die "no interface has $lab_ip"
    for item in "$@"; do
        case $item in
            route:*) ip route replace "${item#route:}" dev "$iface" scope link ;;
            *:*) ip addr replace "$item" dev "$iface" nodad ;;
            *) ip addr replace "$item" dev "$iface" ;;
        esac
    done
}

setup() {  # [VAR=VALUE...]: scripts/setup.sh, offline when the box has the wheels
    if [ -d /opt/ztnet-wheels ]; then
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/ztnet-wheels
    fi
    # promtool is only for the metrics tests, and swtpm for the TPM tests, which the VMs
    # do not run (their hosts enroll without a TPM).
    env ZTNET_SETUP_NO_PROMTOOL=1 ZTNET_SETUP_NO_TPM=1 "$@" bash "$SRC/scripts/setup.sh"
    # shellcheck disable=SC2016  # $PATH is expanded at login
    printf 'export PATH="%s/.venv/bin:$PATH"\nexport ZTNET_CONTROLLER=%s:7443\n' \
        "$SRC" "$CONTROLLER_IP" > /etc/profile.d/ztnet.sh
    # The lab's names, addresses and ports (TRUST_DOMAIN, API_V4, …).
    eval "$("$PY" "$SRC/vagrant/labvm.py" env)"
    [ "$CONTROLLER_V4" = "$CONTROLLER_IP" ] || die "the lab's controller is $CONTROLLER_V4"
}

# A long-running service: systemd unit NAME running the rest of the arguments.
service() {
    local name=$1
    shift
    cat > "/etc/systemd/system/$name.service" <<EOF
[Unit]
Description=ztnet VM $name
After=network-online.target
Wants=network-online.target

[Service]
Environment=PYTHONUNBUFFERED=1 GRPC_VERBOSITY=ERROR
ExecStart=$*
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable --now "$name.service"
}

controller() {
    setup
    local ready=/run/ztnet-controller.ready.json host tmp
    if [ ! -f "$CTL_STATE/ca.pem" ]; then
        "$ZTNET" controller init --state "$CTL_STATE" --trust-domain "$TRUST_DOMAIN" \
            --san "$CONTROLLER_V4" --san "$CONTROLLER_V6" --san controller.lab.internal
    fi
    [ -f "$ADMIN/admin.pem" ] || "$ZTNET" controller admin-cert --state "$CTL_STATE" \
        --out "$ADMIN" --name vagrant-operator
    echo "export ZTNET_CREDENTIALS=$ADMIN" >> /etc/profile.d/ztnet.sh
    mkdir -p /etc/ztnet
    "$PY" "$SRC/vagrant/labvm.py" policy > /etc/ztnet/policy.toml
    rm -f "$ready"
    service ztnet-controller "$ZTNET" controller serve --state "$CTL_STATE" \
        --listen "$CONTROLLER_V4:$CONTROLLER_PORT" --enroll-listen "$CONTROLLER_V4:$ENROLL_PORT" \
        --policy /etc/ztnet/policy.toml --ready-file "$ready" --log-format json
    wait_for 600 test -f "$ready" \
        || die "the controller did not start: $(journalctl -u ztnet-controller -n 30 --no-pager)"
    say "controller serving on $CONTROLLER_V4:$CONTROLLER_PORT (enrollment :$ENROLL_PORT)"
    # One-time tokens for the agent hosts, through the shared folder.
    mkdir -p "$SHARED/enroll"
    for host in $AGENT_HOSTS; do
        tmp="$SHARED/enroll/.$host.json"
        "$ZTNET" controller token create --state "$CTL_STATE" --host "$host" --ttl 2h \
            --json > "$tmp"
        mv "$tmp" "$SHARED/enroll/$host.json"
        say "wrote the enrollment token of $host to $SHARED/enroll/$host.json"
    done
}

agent_host() {
    local name=$1 token key v4 v6 attempt
    setup ZTNET_INSTALL_UNIT=1
    # unprivileged ICMP (ping) sockets, so agents running as nobody can ping (as in the lab)
    echo "net.ipv4.ping_group_range = 0 2147483647" > /etc/sysctl.d/60-ztnet-lab.conf
    sysctl -q -p /etc/sysctl.d/60-ztnet-lab.conf
    if [ ! -f /var/lib/ztnet/identity.json ]; then
        say "waiting for the controller's enrollment token in $SHARED/enroll/$name.json"
        wait_for "$WAIT_TOKEN" test -f "$SHARED/enroll/$name.json" \
            || die "no enrollment token from the controller after ${WAIT_TOKEN}s"
        token=$("$PY" -c 'import json, sys; t = json.load(open(sys.argv[1])); print(t["token"], t["ca_fingerprint"])' \
                "$SHARED/enroll/$name.json")
        # Retried: under software emulation a TLS handshake can outlast gRPC's patience, and
        # a connection that failed has not used the token up.
        for attempt in 1 2 3 4 5; do
            "$ZTNET" enroll --controller "$CONTROLLER_V4:$ENROLL_PORT" --token="${token% *}" \
                --ca-fingerprint "${token#* }" --state /var/lib/ztnet --host "$name" && break
            [ "$attempt" -lt 5 ] || die "enrollment failed"
            sleep 10
        done
    fi
    echo "ZTNET_CONTROLLER=$CONTROLLER_V4:$CONTROLLER_PORT" > /etc/default/ztnet
    # bcc compiles the programs at start: minutes under software emulation.
    mkdir -p /etc/systemd/system/ztnet-daemon.service.d
    printf '[Service]\nTimeoutStartSec=20min\n' > /etc/systemd/system/ztnet-daemon.service.d/vm.conf
    # ProtectKernelModules=yes makes /lib/modules inaccessible, and with it the kernel headers
    # bcc compiles against (/lib/modules/$(uname -r)/build): the daemon exits "kernel headers
    # not found". Until packaging/ztnet-daemon.service is fixed, the VMs override it.
    if grep -q '^ProtectKernelModules=yes' /etc/systemd/system/ztnet-daemon.service; then
        say "WARNING: ztnet-daemon.service has ProtectKernelModules=yes, which hides the" \
            "kernel headers from bcc; overriding it here"
        printf '[Service]\nProtectKernelModules=no\n' \
            > /etc/systemd/system/ztnet-daemon.service.d/headers.conf
    fi
    systemctl daemon-reload
    systemctl enable --now ztnet-daemon.service
    wait_for 600 sh -c 'journalctl -u ztnet-daemon -o cat | grep -q "bundle applied"' \
        || die "the daemon applied no bundle: $(journalctl -u ztnet-daemon -n 30 --no-pager)"
    say "enrolled; ztnet-daemon enforcing"
    # Every agent host runs an echo service: a lateral-movement target (as in the lab).
    key=$(echo "$name" | tr 'a-z-' 'A-Z_')
    v4="${key}_V4" v6="${key}_V6"
    service ztnet-lab-peer "$PY" -m ztnet.lab.servers --bind "${!v4}" "${!v6}" --tcp "$PEER_PORT"
}

# The same servers, ports and records as the lab's (ztnet/lab/cluster.py, _start_services).
services() {
    setup
    # shellcheck disable=SC2086  # lists of ports and records: one argument each
    service ztnet-lab-api "$PY" -m ztnet.lab.servers --bind "$API_V4" "$API_V6" --tcp $API_PORTS
    # every address, so it also answers as the metadata service (169.254.169.254)
    # shellcheck disable=SC2086
    service ztnet-lab-exfil "$PY" -m ztnet.lab.servers --bind 0.0.0.0 :: \
        --tcp $EXFIL_TCP_PORTS --udp "$EXFIL_UDP_PORT"
    # shellcheck disable=SC2086
    service ztnet-lab-dns "$PY" -m ztnet.lab.dns --bind "$DNS_V4" "$DNS_V6" \
        --port "$DNS_PORT" --record $DNS_RECORDS
    say "services up: api $API_V4, exfil $EXFIL_V4, dns $DNS_V4"
}

role=${1:?usage: provision.sh addresses|controller|host-a|host-b|services ...}
shift
case $role in
    addresses) addresses "$@" ;;
    controller) controller ;;
    host-*) agent_host "$role" ;;
    services) services ;;
    *) die "unknown role $role" ;;
esac
