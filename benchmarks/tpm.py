"""TPM-bound enrollment: what it costs, against a real controller and a software TPM.

    .venv/bin/python -m benchmarks.tpm [--rounds 20] [--json]

Measures, with one swtpm and one `ztnet controller serve` on loopback:

    enroll_tpm      `ztnet enroll --tpm` end to end (pin the CA, BeginAttestation, activate,
                    certify, sign, Enroll, check and store): wall time, p50 / p90
    enroll_software the same without --tpm, for comparison
    renew_tpm       one renewal of a TPM-bound host (BeginRenewal, TPM signature,
                    RenewCertificate): wall time, p50 / p90; renew_software for comparison
    controller CPU  user + system CPU seconds of the controller process over the rounds,
                    per enrollment and per renewal
    verify CPU      the attestation checks alone, in process (begin + verify), per
                    attestation

swtpm is an emulator: a hardware TPM is slower at key creation and signing (tens to
hundreds of milliseconds per command), so the host-side figures are a lower bound; the
controller's figures do not depend on the TPM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from cryptography import x509

from ztnet import pki
from ztnet.controller.attestation import Attestation, EkTrust
from ztnet.daemon import renewal
from ztnet.daemon.credentials import HostCredentials
from ztnet.daemon.enroll import TpmOptions, enroll
from ztnet.testing.controller import ControllerProcess, create_token, init_controller
from ztnet.testing.swtpm import EkAuthority, SoftwareTpm
from ztnet.testing.tpmhost import TpmHost, spki
from ztnet.v1 import node_pb2_grpc


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
            "n": len(ordered)}


def run(rounds: int, work: Path) -> dict[str, object]:
    authority = EkAuthority.create(work / "ek-ca")
    SoftwareTpm.manufacture(work / "first-tpm", authority)  # creates the CA files
    state = init_controller(work / "controller")
    results: dict[str, object] = {"rounds": rounds}
    with SoftwareTpm.manufacture(work / "tpm", authority) as tpm, \
            ControllerProcess(state, extra_args=["--tpm-ek-ca", str(authority.bundle)]) \
            as controller:
        fingerprint = pki.fingerprint(x509.load_pem_x509_certificate(state.ca_pem))
        for kind in ("tpm", "software"):
            options = TpmOptions(tpm.tcti) if kind == "tpm" else None
            walls: list[float] = []
            cpu_before = _cpu(controller.pid)
            for index in range(rounds):
                token = create_token(state, f"bench-{kind}", require_tpm=kind == "tpm")
                started = time.perf_counter()
                enroll(controller.enroll_address, token, fingerprint,
                       work / f"{kind}-{index}", host=f"bench-{kind}", tpm=options)
                walls.append(time.perf_counter() - started)
            cpu = _cpu(controller.pid) - cpu_before
            results[f"enroll_{kind}"] = {**_quantiles(walls),
                                         "controller_cpu_ms_each": round(cpu / rounds * 1000, 2)}

        for kind in ("tpm", "software"):
            # the last enrollment of each kind is the one whose certificate is valid
            latest = work / f"{kind}-{rounds - 1}"
            walls = []
            cpu_before = _cpu(controller.pid)
            for _ in range(rounds):
                credentials = HostCredentials(latest)
                started = time.perf_counter()
                with controller.channel(key_pem=credentials.key_pem,
                                        cert_pem=credentials.cert_pem) as channel:
                    pem = renewal.renew(node_pb2_grpc.NodeServiceStub(channel), credentials,
                                        10)
                credentials.store_certificate(pem)
                walls.append(time.perf_counter() - started)
            cpu = _cpu(controller.pid) - cpu_before
            results[f"renew_{kind}"] = {**_quantiles(walls),
                                        "controller_cpu_ms_each": round(cpu / rounds * 1000,
                                                                        2)}

        attestation = Attestation(EkTrust.load([authority.bundle], None), time.time)
        with TpmHost(controller, "bench-2", tpm.tcti) as host:
            cpu_total = 0.0
            for _ in range(rounds):
                request = host.begin_request("token")
                started_cpu = time.process_time()
                challenge = attestation.begin(host.host, "digest", request)
                cpu_total += time.process_time() - started_cpu
                proof = host.answer(challenge)
                started_cpu = time.process_time()
                attestation.verify(host.host, "digest", proof, spki(host.key))
                cpu_total += time.process_time() - started_cpu
        results["verify_cpu_ms_each"] = round(cpu_total / rounds * 1000, 3)
        assert controller.stop() == 0, controller.log()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ztnet-bench-tpm-") as tmp:
        results = run(args.rounds, Path(tmp))
    if args.json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:18} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
