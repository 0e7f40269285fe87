"""Fuzzing the pure input parsers an attacker reaches: the policy parser (operator mistakes,
a hostile policy file), the envelope/bundle verifier (a hostile network or state directory),
and flow-record ingest (a compromised host). Every input is accepted or rejected with a
clear error from the error tree; none crashes, hangs or half-applies (these functions are
pure: a rejection returns nothing to apply).

Seeds: tests/hardening/corpus/ (regenerate with ``python -m tests.hardening.make_corpus``).
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from tests.hardening.fuzzing import (
    TOKENS,
    corpus,
    fuzz_settings,
    handled,
    mutated,
)
from tests.hardening.make_corpus import CORPUS, HOST, ISSUED
from ztnet.controller.flows import decode_batch
from ztnet.errors import ControllerError, PolicyError, ZtnetError
from ztnet.grants.bundle import BUNDLE_PAYLOAD_TYPE, VerifiedBundle, verify_bundle
from ztnet.grants.envelope import sign_envelope
from ztnet.policy.document import Policy, parse_policy


def seeds_of(target: str) -> list[object]:
    # Seeds named itemN-… reproduce a bug that item N of issue 10 fixed: regressions now.
    return [pytest.param(name, data, id=name) for name, data in corpus(target)]


# --- the policy parser -----------------------------------------------------------------

POLICY_SEEDS = [data for _, data in corpus("policy")]


def check_policy(data: bytes) -> Policy | BaseException:
    text = data.decode("utf-8", errors="surrogateescape")
    return handled(lambda: parse_policy(text, "fuzz.toml"), rejections=(PolicyError,),
                   prefix="policy: fuzz.toml")


@pytest.mark.parametrize(("name", "data"), seeds_of("policy"))
def test_policy_seed(name: str, data: bytes) -> None:
    result = check_policy(data)
    assert isinstance(result, PolicyError) == name.startswith("bad-"), result


@fuzz_settings(weight=1.0)
@given(mutated(POLICY_SEEDS))
def test_policy_parser_mutated(data: bytes) -> None:
    check_policy(data)


FIELD_VALUES = {
    "to": ["10.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/33", "0.0.0.0/0", "10.0.0.1/33",
           "10.0.0.256", "host.example", "", "10.0.0.1/24", "::ffff:10.0.0.1", "fe80::1%eth0"],
    "ports": ["443", "1-65535", "0", "65536", "100-1", "80,443", "any", "", "-1", "8000-8100"],
    "proto": ["tcp", "udp", "icmp", "any", "TCP", "sctp", ""],
    "ttl": ["5m", "1s", "365d", "366d", "0s", "-5m", "1ms", "10", "5 m", "1e9s"],
    "comment": ["fine", "\x1b[8m", "line\nbreak", "x" * 5000, ""],
}


@st.composite
def policy_documents(draw: st.DrawFn) -> bytes:
    """Structurally plausible policies whose fields mix valid and hostile values."""
    domain = draw(st.sampled_from(["example.org", "", "a b", "x" * 300]))
    lines = [f"trust_domain = {json.dumps(domain)}"]
    for agent in draw(st.lists(st.sampled_from(["bot", "a-1", "Bad Name", "\x1b", "x" * 80,
                                                 "ok_2"]), max_size=3, unique=True)):
        lines.append(f"[agents.{json.dumps(agent)}]")
        for _ in range(draw(st.integers(0, 3))):
            lines.append(f"[[agents.{json.dumps(agent)}.allow]]")
            for key, values in FIELD_VALUES.items():
                if draw(st.booleans()):
                    value = draw(st.one_of(st.sampled_from(values), st.text(max_size=12)))
                    lines.append(f"{key} = {json.dumps(value)}")
            if draw(st.integers(0, 9)) == 0:
                lines.append(f"{draw(st.sampled_from(['extra', 'to', 'ports']))} = "
                             f"{draw(st.sampled_from(['1', '[]', '{}', 'true', '1.5']))}")
    return "\n".join(lines).encode()


@fuzz_settings(weight=0.5)
@given(policy_documents())
def test_policy_parser_structured(data: bytes) -> None:
    check_policy(data)


# --- the envelope and bundle verifier ---------------------------------------------------

def _key() -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((CORPUS / "keys" / "signing.key").read_bytes(),
                                             None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


KEY = _key()
ENVELOPE_SEEDS = [data for name, data in corpus("envelope") if not name.startswith("item")]
PAYLOAD_SEEDS = [json.loads(data)["payload"] for data in ENVELOPE_SEEDS[-2:]]


def check_envelope(data: bytes) -> VerifiedBundle | BaseException:
    return handled(lambda: verify_bundle(data, trusted=[KEY.public_key()], host=HOST,
                                         min_version=0, now=ISSUED + 10),
                   rejections=(ZtnetError,), prefix="bundle: ")


@pytest.mark.parametrize(("name", "data"), seeds_of("envelope"))
def test_envelope_seed(name: str, data: bytes) -> None:
    result = check_envelope(data)
    assert isinstance(result, ZtnetError) != name.startswith("good-"), result


# A lone surrogate in payloadType crashed the verifier before item 8 of issue 10 (the seed
# item8-lone-surrogate-payloadtype.json reproduces it; the hardening run found it at random).
ENVELOPE_TOKENS = TOKENS


@fuzz_settings(weight=1.5)
@given(mutated(ENVELOPE_SEEDS, tokens=ENVELOPE_TOKENS))
def test_envelope_verifier_mutated(data: bytes) -> None:
    result = check_envelope(data)
    if isinstance(result, VerifiedBundle):  # only a signature-preserving change passes
        assert result.key_id and result.grants is not None


@st.composite
def signed_payloads(draw: st.DrawFn) -> bytes:
    """Payloads the signature covers, mutated and re-signed: the parser behind the
    signature check (a stolen signing key is out of scope, a crash is still a bug)."""
    import base64

    payload = base64.b64decode(draw(st.sampled_from(PAYLOAD_SEEDS)))
    payload = draw(mutated([payload]))
    return sign_envelope(payload, BUNDLE_PAYLOAD_TYPE, KEY)


@fuzz_settings(weight=1.5)
@given(signed_payloads())
def test_bundle_payload_parser_behind_a_valid_signature(data: bytes) -> None:
    check_envelope(data)


# --- flow-record ingest (what a compromised host uploads) -------------------------------

FLOW_SEEDS = [data for name, data in corpus("flows") if not name.startswith("item")]
INGEST_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}


# The controller's receive time for every fuzzed batch: fixed, a day after the seeds' records
# (2030-03-17), so that the seeds stay valid and a run does not depend on today's date.
RECEIVED_NS = 1_900_000_000 * 1_000_000_000 + 86_400 * 1_000_000_000


def check_batch(records: list[bytes]) -> object:
    result = handled(lambda: decode_batch(HOST, records, RECEIVED_NS),
                     rejections=(ControllerError,),
                     prefix="records[")
    if isinstance(result, ControllerError):
        assert getattr(result, "code", None) in INGEST_CODES, result
    else:
        assert isinstance(result, list) and len(result) == len(records)
    return result


@pytest.mark.parametrize(("name", "data"), seeds_of("flows"))
def test_flow_record_seed(name: str, data: bytes) -> None:
    result = check_batch([data])
    assert isinstance(result, ControllerError) != name.startswith("good-"), result


# A lone surrogate in a record crashed ingest before item 4 of issue 10 (the seed
# item4-lone-surrogate-destination.json reproduces it).
FLOW_TOKENS = TOKENS


@fuzz_settings(weight=1.5)
@given(st.lists(mutated(FLOW_SEEDS, max_mutations=3, tokens=FLOW_TOKENS), min_size=1,
                max_size=4))
def test_flow_ingest_mutated(records: list[bytes]) -> None:
    check_batch(records)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@st.composite
def edited_records(draw: st.DrawFn) -> bytes:
    """A valid record with fields replaced, removed or added (nested ones too)."""
    record = json.loads(draw(st.sampled_from(FLOW_SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        target = record
        keys = [k for k, v in record.items() if isinstance(v, dict)]
        if keys and draw(st.booleans()):
            target = record[draw(st.sampled_from(keys))]
        key = draw(st.sampled_from(sorted(target) + ["extra"]))
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(JSON_VALUES)
    return json.dumps(record, allow_nan=True).encode()


@fuzz_settings(weight=0.5)
@given(st.lists(edited_records(), min_size=1, max_size=3))
def test_flow_ingest_structured(records: list[bytes]) -> None:
    check_batch(records)


def test_far_future_and_huge_records_are_bounded() -> None:
    """A record time past 2262 or a field of a megabyte never reaches the store."""
    record = json.loads(FLOW_SEEDS[0])
    record["time"] = "2263-01-01T00:00:00.000000000Z"
    assert isinstance(check_batch([json.dumps(record).encode()]), ControllerError)
    started = time.monotonic()
    check_batch([b'{"a": "' + b"x" * (1 << 20) + b'"}'])
    assert time.monotonic() - started < 2


def test_memory_before_verification_is_bounded_by_the_input() -> None:
    """4 MiB of ``[{},…]`` as signatures cost ~100 MiB before any check (item 9)."""
    import tracemalloc

    signatures = b"[" + b",".join([b"{}"] * ((4 << 20) // 3)) + b"]"
    data = b'{"payloadType":"x","payload":"","signatures":' + signatures + b"}"
    tracemalloc.start()
    try:
        check_envelope(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * len(data), f"{peak >> 20} MiB to reject {len(data) >> 20} MiB"
