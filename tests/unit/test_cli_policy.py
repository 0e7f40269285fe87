"""`ztnet keys …` and `ztnet policy …` through ztnet.cli.main."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.unit.grant_factories import NOW, policy_text
from ztnet.cli import main
from ztnet.cli import policy as commands

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    return tmp_path / "keys"


def compile_example(tmp_path: Path, keys: Path, *extra: str) -> Path:
    out = tmp_path / "web-1.bundle"
    argv = [
        "policy",
        "compile",
        str(EXAMPLE),
        "--key",
        str(keys / "signing.key"),
        "--host",
        "web-1",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return out


def test_keys_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "init", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'k' / 'signing.key'} (private, mode 0600)" in out
    assert "key id " in out
    assert main(["keys", "init", str(tmp_path / "k")]) == 2
    assert "ztnet: keys: " in capsys.readouterr().err


def test_policy_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "trust domain example.org, 4 agents, 9 rules" in out
    assert "research-bot     0  tcp    10.0.2.0/24" in out
    assert "quarantined-bot  -" in out and "no network access" in out


def test_policy_check_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(policy_text('to = "10.0.2.1/24"\nports = "0"'))
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"ztnet: policy: {path}: agents.bot.allow[0].to: 10.0.2.1/24 has host bits set; "
        "did you mean 10.0.2.0/24?",
        f"policy: {path}: agents.bot.allow[0].ports: port 0 out of range 1-65535",
    ]


def test_policy_check_notes_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(
        policy_text('to = "10.0.0.1"\nports = "1"')
        + '[[agents.bot.allow]]\nto = "10.0.0.1/32"\nports = "1-1"\n'
    )
    assert main(["policy", "check", str(path)]) == 0
    assert "note: agents.bot.allow[1] repeats allow[0]" in capsys.readouterr().out


def test_compile_then_verify(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = int(time.time())
    out = compile_example(tmp_path, keys, "--ttl", "10m", "--issuer", "ci")
    assert "for host web-1, 9 grants" in capsys.readouterr().out
    assert set(json.loads(out.read_bytes())) == {"payloadType", "payload", "signatures"}
    argv = ["policy", "verify", str(out), "--trust", str(keys / "signing.pub"), "--host", "web-1"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "signature valid" in shown and "issuer:         ci" in shown
    assert "audience:       web-1\n" in shown
    version = int(shown.split("version:")[1].split()[0])
    assert before <= version <= time.time()  # default version: Unix seconds
    assert "research-bot  tcp    10.0.2.0/24" in shown
    assert "(in 9m59s)" in shown or "(in 10m)" in shown  # --ttl applies to rules without one


def test_verify_without_host_shows_audience_unchecked(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = compile_example(tmp_path, keys, "--version", "42")
    assert main(["policy", "verify", str(out), "--trust", str(keys / "signing.pub")]) == 0
    shown = capsys.readouterr().out
    assert "web-1 (not checked: no --host)" in shown and "version:        42" in shown


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--host", "web-2"], "ztnet: bundle: this bundle is for host web-1, this host is web-2"),
        (["--min-version", "43"], "ztnet: bundle: version 42 is older than version 43"),
    ],
)
def test_verify_rejections(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = compile_example(tmp_path, keys, "--version", "42")
    capsys.readouterr()
    argv = ["policy", "verify", str(out), "--trust", str(keys / "signing.pub"), *extra]
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.out == ""


def test_verify_with_untrusted_key(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = compile_example(tmp_path, keys)
    assert main(["keys", "init", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert main(["policy", "verify", str(out), "--trust", str(tmp_path / "other/signing.pub")]) == 3
    assert "ztnet: bundle: signed by untrusted key" in capsys.readouterr().err
    # Trusting both keys (rotation) accepts it.
    argv = [
        "policy",
        "verify",
        str(out),
        "--trust",
        str(tmp_path / "other/signing.pub"),
        "--trust",
        str(keys / "signing.pub"),
    ]
    assert main(argv) == 0


def test_verify_tampered_bundle(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = compile_example(tmp_path, keys)
    envelope = json.loads(out.read_bytes())
    payload = envelope["payload"]
    envelope["payload"] = payload[:10] + ("B" if payload[10] != "B" else "C") + payload[11:]
    out.write_text(json.dumps(envelope))
    assert main(["policy", "verify", str(out), "--trust", str(keys / "signing.pub")]) == 3
    assert "ztnet: bundle: signature by key" in capsys.readouterr().err


def test_verify_expired_bundle(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "old.bundle"
    commands.policy_compile(
        EXAMPLE,
        key_path=keys / "signing.key",
        host="web-1",
        out_path=out,
        version=1,
        now=NOW - 86400 * 365 * 2,
    )
    capsys.readouterr()
    assert main(["policy", "verify", str(out), "--trust", str(keys / "signing.pub")]) == 3
    assert "refusing a stale policy" in capsys.readouterr().err


def test_compile_errors(tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["policy", "compile", str(EXAMPLE), "--host", "web-1", "--out", str(tmp_path / "b")]
    assert main([*base, "--key", str(keys / "signing.pub")]) == 2
    assert "is not a PEM private key (that is a public key)" in capsys.readouterr().err
    assert main([*base, "--key", str(keys / "signing.key"), "--version", "0"]) == 2
    assert "ztnet: bundle: version must be between" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit) as info:
        main([*base, "--key", str(keys / "signing.key"), "--ttl", "5 minutes"])
    assert info.value.code == 2
    assert "bad duration '5 minutes'" in capsys.readouterr().err


def test_verify_missing_file(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["policy", "verify", str(tmp_path / "none"), "--trust", str(keys / "signing.pub")]
    assert main(argv) == 2
    assert f"ztnet: bundle: cannot read {tmp_path / 'none'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["keys", "init"], ["policy", "check"], ["policy", "compile"], ["policy", "delta"],
     ["policy", "verify"]],
)
def test_help_has_an_example(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert f"example:\n  ztnet {' '.join(argv)}" in capsys.readouterr().out


def test_delta_from_an_edited_policy_chains_on_the_held_state(
        tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ztnet.errors import GrantError
    from ztnet.grants.bundle import verify_bundle
    from ztnet.grants.delta import DELTA_PAYLOAD_TYPE, HeldGrants, verify_delta
    from ztnet.grants.envelope import verify_envelope
    from ztnet.grants.keys import load_public_key

    base = compile_example(tmp_path, keys, "--version", "10")
    text = EXAMPLE.read_text()
    edited = tmp_path / "edited.toml"
    # one rule more: a new grant; the held ones stay
    edited.write_text(text + '\n[[agents.research-bot.allow]]\nto = "192.0.2.7/32"\n'
                      'ports = "8443"\nproto = "tcp"\n')
    first = tmp_path / "1.delta"
    argv = ["policy", "delta", str(edited), "--base", str(base), "--key",
            str(keys / "signing.key"), "--out", str(first), "--version", "11"]
    assert main(argv) == 0
    assert "version 10 → 11 for host web-1, 1 added, 0 revoked, 10 grants" in \
        capsys.readouterr().out
    # back to the original policy, on top of that delta: the new grant is revoked
    second = tmp_path / "2.delta"
    assert main(["policy", "delta", str(EXAMPLE), "--base", str(base), "--after", str(first),
                 "--key", str(keys / "signing.key"), "--out", str(second),
                 "--version", "12"]) == 0
    assert "1 added" not in capsys.readouterr().out
    trusted = [load_public_key(keys / "signing.pub")]
    state = verify_bundle(base.read_bytes(), trusted=trusted, host="web-1", min_version=1,
                          now=time.time())
    held = HeldGrants(state)
    for path in (first, second):
        signed = verify_envelope(path.read_bytes(), trusted=trusted,
                                 payload_type=DELTA_PAYLOAD_TYPE)
        applied = verify_delta(signed, base=state, held=held, now=time.time())
        state = applied.apply_to(state)
        held.apply(applied.delta)
    assert (state.version, len(state.grants)) == (12, 9)
    # a delta on the wrong base is an error that names the file
    with pytest.raises(GrantError, match=r"2\.delta: delta: applies to version 11"):
        commands.policy_delta(EXAMPLE, base_path=base, after=[second], key_path=keys /
                              "signing.key", out_path=tmp_path / "3.delta", version=13)
