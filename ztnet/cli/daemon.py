"""`ztnet daemon`: enforce signed grant bundles on this host (docs/daemon.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ztnet.cli.args import SubParsers, add_command, daemon_state, instance_option, size


def controller_addresses(value: str) -> str:
    from ztnet.daemon.channel import parse_addresses

    try:
        parse_addresses(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value

MIN_SPOOL_BYTES = 1 << 20


def register(sub: SubParsers) -> None:
    p = add_command(sub, "daemon", "Enforce signed grant bundles on this host: verify, apply "
                    "atomically; follow the controller (after `ztnet enroll`), or a bundle file "
                    "reloaded on SIGHUP or when it changes.",
                    "ztnet daemon --controller ctl.example:7443 --state /var/lib/ztnet\n"
                    "  ztnet daemon --trust /etc/ztnet/signing.pub --bundle "
                    "/etc/ztnet/bundle.json", handle_daemon)
    instance_option(p)
    p.add_argument("--controller", metavar="ADDR[,ADDR…]", type=controller_addresses,
                   help="controller HOST:PORT to subscribe to (credentials, trust and host "
                   "name come from the enrolled --state); several replicas: a comma-"
                   "separated list, or one name with an address per replica, tried in turn")
    p.add_argument("--trust", action="append", type=Path, metavar="PUBKEY", default=[],
                   help="grant-signing public key to trust (repeat for key rotation; "
                   "needed without --controller)")
    p.add_argument("--bundle", type=Path, help="signed bundle file to enforce and watch")
    p.add_argument("--state", type=Path, default=None,
                   help="state directory (default /var/lib/ztnet[-INSTANCE])")
    p.add_argument("--host", default=None, help="this host's name (default: hostname); must "
                   "match the bundle's audience")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--resync", type=float, default=30.0, metavar="SECONDS",
                   help="period of the level-triggered re-install (default 30)")
    p.add_argument("--backoff-max", type=float, default=30.0, metavar="SECONDS",
                   help="longest wait between reconnects to the controller (default 30)")
    p.add_argument("--metrics", metavar="ADDR", default=None,
                   help="serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464)")
    p.add_argument("--no-flows", action="store_true",
                   help="do not record flows (<state>/flows.jsonl) or the audit trail")
    p.add_argument("--spool-max", type=spool_size, default="64M", metavar="SIZE",
                   help="controller mode: bound of <state>/spool, the flow records not yet "
                   "acknowledged by the controller; when full the oldest are dropped and "
                   "counted (default 64M)")
    p.add_argument("--otlp-endpoint", metavar="HOST:PORT", default=None,
                   help="also export every flow record as an OTLP log record to the "
                   "OpenTelemetry collector at HOST:PORT (gRPC, no TLS; docs/flows.md)")
    p.add_argument("--request-socket", metavar="PATH|off", default=None,
                   help="controller mode: where `ztnet request-grant` asks for just-in-time "
                   "grants (default <state>/grant-requests.sock; off: none)")
    p.add_argument("--dns", action="store_true",
                   help="run ztnet's resolver for hostname grants: every agent's DNS is "
                   "redirected to it (docs/daemon.md)")
    p.add_argument("--dns-upstream", action="append", default=[], metavar="ADDR",
                   type=upstream, help="resolver to ask (ADDR or ADDR:PORT, repeatable; "
                   "default: the nameservers of /etc/resolv.conf); implies --dns")
    p.add_argument("--dns-floor", type=float, default=5.0, metavar="SECONDS",
                   help="shortest life of a learned address, whatever the answer's TTL "
                   "(default 5)")
    p.add_argument("--dns-max-addresses", type=int, default=32, metavar="N",
                   help="most addresses live at once per agent and name (default 32)")
    p.add_argument("--dns-max-entries", type=int, default=4096, metavar="N",
                   help="most learned-address entries (address x port x protocol) one agent "
                   "may hold in the kernel map all agents share (default 4096 of 65536)")


def spool_size(text: str) -> int:
    value = size(text)
    if value < MIN_SPOOL_BYTES:
        raise argparse.ArgumentTypeError(f"the spool needs at least 1M, not {text}")
    return value


def upstream(text: str) -> tuple[str, int]:
    from ztnet.daemon.resolverconf import parse_upstream

    try:
        return parse_upstream(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad resolver address {text!r}: {exc}") from None


def dns_settings(args: argparse.Namespace) -> object | None:
    """The resolver's settings (ztnet.daemon.resolverconf.ResolverSettings), or None if off."""
    if not args.dns and not args.dns_upstream:
        return None
    from ztnet.daemon.resolverconf import ResolverSettings, upstreams_from_resolv_conf
    from ztnet.datapath.abi import MAX_LEARNED

    if not 0 < args.dns_floor <= 3600 or not 0 < args.dns_max_addresses <= 1024:
        raise SystemExit("ztnet daemon: --dns-floor must be in (0, 3600] and "
                         "--dns-max-addresses in 1..1024")
    if not 0 < args.dns_max_entries <= MAX_LEARNED:
        raise SystemExit(f"ztnet daemon: --dns-max-entries must be in 1..{MAX_LEARNED} "
                         "(the kernel map all agents share)")
    return ResolverSettings(tuple(args.dns_upstream) or upstreams_from_resolv_conf(),
                            floor_seconds=args.dns_floor, max_addresses=args.dns_max_addresses,
                            max_entries_per_agent=args.dns_max_entries)


def handle_daemon(args: argparse.Namespace) -> int:
    return run_daemon(dns=dns_settings(args),
        instance=args.instance, state=daemon_state(args.state, args.instance),
        controller=args.controller, trust=args.trust, bundle=args.bundle, host=args.host,
        log_format=args.log_format, resync=args.resync, backoff_max=args.backoff_max,
        metrics=args.metrics, flows=not args.no_flows, spool_max=args.spool_max,
        otlp_endpoint=args.otlp_endpoint, request_socket=args.request_socket)


def run_daemon(*, instance: str | None, state: Path, controller: str | None,
               trust: list[Path], bundle: Path | None, host: str | None,
               log_format: str = "text", resync: float = 30.0, backoff_max: float = 30.0,
               metrics: str | None = None, flows: bool = True,
               spool_max: int | None = None, otlp_endpoint: str | None = None,
               request_socket: str | None = None, dns: object | None = None) -> int:
    """Run the daemon until it is stopped: following ``controller`` with the credentials
    enrolled in ``state``, else enforcing the ``bundle`` file signed by a ``trust`` key.
    ``spool_max``: the bound of the upload spool (default: the daemon's); ``otlp_endpoint``:
    the OpenTelemetry collector every flow record is also exported to;
    ``request_socket``: the grant-request socket's path, "off", or None (the default)."""
    import socket

    from ztnet import logs
    from ztnet.daemon.resolverconf import ResolverSettings
    from ztnet.daemon.service import Daemon, DaemonConfig
    from ztnet.daemon.spool import DEFAULT_MAX_BYTES

    assert dns is None or isinstance(dns, ResolverSettings)

    logs.setup(log_format)
    if otlp_endpoint is not None:  # a bad address fails here, before anything starts
        from ztnet.observe.otlp import parse_endpoint

        parse_endpoint(otlp_endpoint)
    if controller:
        from ztnet.daemon.credentials import controller_settings
        from ztnet.daemon.requests import SOCKET_NAME

        settings = controller_settings(state, host=host, bundle=bundle)
        sock = None if request_socket == "off" else Path(request_socket or state / SOCKET_NAME)
        config = DaemonConfig(trust=[settings.signing_key, *trust], bundle=None,
                              state=state, host=settings.host, instance=instance,
                              resync_seconds=resync, controller=controller,
                              trust_domain=settings.trust_domain,
                              backoff_cap=backoff_max, flows=flows,
                              metrics_listen=metrics, otlp_endpoint=otlp_endpoint,
                              spool_max_bytes=DEFAULT_MAX_BYTES if spool_max is None else spool_max,
                              request_socket=sock, dns=dns)
    else:
        config = DaemonConfig(trust=trust, bundle=bundle, state=state,
                              host=host or socket.gethostname(), instance=instance,
                              resync_seconds=resync, flows=flows, metrics_listen=metrics,
                              otlp_endpoint=otlp_endpoint, dns=dns)
    return Daemon(config).run()
