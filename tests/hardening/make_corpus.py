"""Regenerate the seed corpora in tests/hardening/corpus/ (deterministic but for the
signatures' key, which is kept: corpus/keys/). Run from the repository root:

    .venv/bin/python -m tests.hardening.make_corpus

Seeds named ``itemN-…`` reproduce a bug that item N of issue 10 fixed: regression seeds.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.controller.flow_support import make_record
from ztnet.grants.bundle import BUNDLE_PAYLOAD_TYPE, sign_bundle
from ztnet.grants.envelope import sign_envelope
from ztnet.observe.records import EventType, Verdict, to_json
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
ISSUED = 1_900_000_000.0  # bundles are verified "now" = ISSUED + 10 s
HOST = "web-1"
SMALL_POLICY = """trust_domain = "example.org"
[agents.bot]
[[agents.bot.allow]]
to = "10.0.0.1"
ports = "443"
proto = "tcp"
ttl = "5m"
"""


def signing_key() -> Ed25519PrivateKey:
    path = CORPUS / "keys" / "signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    (CORPUS / "keys" / "signing.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def write(target: str, name: str, data: bytes) -> None:
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def policies() -> None:
    write("policy", "example.toml", (ROOT / "examples" / "policy.toml").read_bytes())
    write("policy", "small.toml", SMALL_POLICY.encode())
    write("policy", "ranges-v6.toml", b'trust_domain = "t.example"\n[agents.a-1]\n'
          b'[[agents.a-1.allow]]\nto = "2001:db8::/32"\nports = "1-65535"\nproto = "udp"\n'
          b'[[agents.a-1.allow]]\nto = "0.0.0.0/0"\nproto = "icmp"\nttl = "365d"\n')
    write("policy", "bad-unknown-key.toml", SMALL_POLICY.replace('ttl = "5m"',
          'ttl = "5m"\nevil = 1').encode())
    write("policy", "bad-terminal-escape.toml", SMALL_POLICY.replace(
        "[agents.bot]", '[agents."\x1b[8mbot"]').encode())
    write("policy", "bad-deep-nesting.toml", b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n")


def envelopes() -> None:
    key = signing_key()
    policy = parse_policy((ROOT / "examples" / "policy.toml").read_text(), "example.toml")
    bundle = issue_bundle(policy, host=HOST, version=3, now=ISSUED, issuer="ctl",
                          bundle_ttl=3600.0)
    good = sign_bundle(bundle, key)
    write("envelope", "good-example.json", good)
    small = issue_bundle(parse_policy(SMALL_POLICY, "small.toml"), host=HOST, version=1,
                         now=ISSUED, issuer="ctl", bundle_ttl=3600.0)
    write("envelope", "good-small.json", sign_bundle(small, key))
    document = json.loads(good)
    document["payloadType"] = "\ud800"  # a lone surrogate (item 8 of issue 10)
    write("envelope", "item8-lone-surrogate-payloadtype.json",
          json.dumps(document).encode())
    document = json.loads(good)
    document["signatures"][0]["sig"] = base64.b64encode(b"\0" * 64).decode()
    write("envelope", "bad-signature.json", json.dumps(document).encode())
    write("envelope", "bad-payload-not-json.json",
          sign_envelope(b"[" * 100, BUNDLE_PAYLOAD_TYPE, key))


def flows() -> None:
    records = [
        make_record(HOST, time_ns=int(ISSUED * 1e9), cookie=1),
        make_record(HOST, time_ns=int(ISSUED * 1e9), cookie=2, verdict=Verdict.DENIED,
                    port=22),
        make_record(HOST, time_ns=int(ISSUED * 1e9), cookie=3, event_type=EventType.FLOW_END),
        make_record(HOST, time_ns=int(ISSUED * 1e9), cookie=4, destination="2001:db8::1"),
    ]
    for index, record in enumerate(records):
        write("flows", f"good-{index}.json", to_json(record).encode())
    hostile = make_record(HOST, time_ns=int(ISSUED * 1e9), cookie=5, destination="\x1b[8m")
    write("flows", "item4-escape-as-destination.json", to_json(hostile).encode())
    # found by test_flow_ingest_mutated: the record uuid is computed from the destination
    # before it is validated, and a lone surrogate makes uuid5 raise UnicodeEncodeError
    good = to_json(records[0]).replace('"destination":"10.0.0.1"',
                                       '"destination":"\\ud80010.0.0.1"')
    write("flows", "item4-lone-surrogate-destination.json", good.encode())


if __name__ == "__main__":
    policies()
    envelopes()
    flows()
