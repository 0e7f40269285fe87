"""`ztnet policy plan` and `ztnet policy suggest` without the kernel: grouping records into
attempts, replaying them against a candidate, and drafting a policy that parses and allows
exactly what went ahead."""

from __future__ import annotations

import io
import ipaddress
import json
from pathlib import Path

import pytest

from tests.unit.test_observe_records import NOW, make_ctx, make_event
from ztnet.cli.policy_review import Flows, local_flows, policy_plan, policy_suggest
from ztnet.datapath.abi import ZtEventKind, ZtFamily, ZtReason, ZtVerdict
from ztnet.grants.evaluate import Decision, decide
from ztnet.observe.evidence import group_flows
from ztnet.observe.records import FlowRecord, from_event, to_json
from ztnet.observe.replay import plan, to_dict
from ztnet.observe.suggest import Collapse, suggest
from ztnet.policy.compile import compile_grants
from ztnet.policy.document import parse_policy

_cookie = [1000]


def record(destination: str, port: int = 443, *, verdict: ZtVerdict = ZtVerdict.ALLOWED,
           proto: int = 6, kind: ZtEventKind = ZtEventKind.CONNECT, agent_index: int = 1,
           host: str = "web-1", cookie: int | None = None, offset: float = 0.0) -> FlowRecord:
    _cookie[0] += 1
    family = ZtFamily.V6 if ":" in destination else ZtFamily.V4
    reason = ZtReason.GRANTED if verdict == ZtVerdict.ALLOWED else ZtReason.NO_GRANT
    event = make_event(destination=destination, destination_port=port, verdict=verdict,
                       reason=reason, proto=proto, family=family, kind=kind,
                       agent_index=agent_index, grant_id=0xABC if reason == 0 else 0,
                       cookie=_cookie[0] if cookie is None else cookie, time=NOW + offset)
    return from_event(event, make_ctx(host=host))


CANDIDATE = """trust_domain = "example.org"
[agents.bot]
[[agents.bot.allow]]
to = "10.0.2.0/24"
ports = "443"
[[agents.bot.allow]]
to = "10.9.0.0/16"
ports = "22"
comment = "never used"
[agents.other]
mode = "audit"
"""


def test_attempts_are_grouped_and_flow_ends_count_only_for_sockets_no_hook_saw() -> None:
    connect = record("10.0.2.7", cookie=1)
    end_of_it = record("10.0.2.7", kind=ZtEventKind.FLOW_END, cookie=1, offset=1)
    raw_end = record("10.0.3.1", 0, proto=1, kind=ZtEventKind.FLOW_END, cookie=2)
    not_agent = record("10.0.2.7", agent_index=0)
    groups = group_flows([connect, end_of_it, raw_end, not_agent,
                          record("10.0.2.7", offset=5)])
    assert {(k.destination, k.port, g.count) for k, g in groups.items()} == \
        {("10.0.2.7", 443, 2), ("10.0.3.1", None, 1)}
    group = next(g for k, g in groups.items() if k.port == 443)
    assert group.first_ns < group.last_ns and group.record_ids[0] == connect.uuid


def test_plan_lists_what_would_be_refused_allowed_audited_and_unused() -> None:
    records = [
        record("10.0.2.7"),                                   # covered: unchanged
        record("10.0.5.5", 8443, verdict=ZtVerdict.AUDIT),     # went ahead, now refused
        record("10.0.2.9", 443, verdict=ZtVerdict.DENIED),     # refused, now allowed
        record("10.7.7.7", 80, agent_index=2),                 # other: audit mode
        record("169.254.169.254", 80, agent_index=2, verdict=ZtVerdict.AUDIT),
    ]
    result = plan(records, parse_policy(CANDIDATE, "c.toml"), now=NOW)
    by_agent = {a.agent: a for a in result.agents}
    bot, other = by_agent["bot"], by_agent["other"]
    assert [o.group.key.destination for o in bot.refused] == ["10.0.5.5"]
    assert [o.group.key.destination for o in bot.allowed] == ["10.0.2.9"]
    assert bot.unchanged == 1
    assert [str(g.network) for g in bot.unused] == ["10.9.0.0/16"]
    assert [o.group.key.destination for o in other.audited] == ["10.7.7.7"]
    # audit mode never opens the metadata service: refused even though it went ahead
    assert [o.group.key.destination for o in other.refused] == ["169.254.169.254"]
    document = to_dict(result, "test")
    assert document["agents"][0]["refused"][0]["recorded"] == {"AUDIT": 1}
    assert document["agents"][0]["unused_grants"][0]["to"] == "10.9.0.0/16"


def test_an_agent_missing_from_the_candidate_loses_everything() -> None:
    other = parse_policy('trust_domain = "example.org"\n[agents.other]\n', "c.toml")
    result = plan([record("10.0.2.7")], other, now=NOW)
    bot = next(a for a in result.agents if a.agent == "bot")
    assert not bot.in_candidate and len(bot.refused) == 1


def test_host_selectors_apply_with_the_hosts_labels() -> None:
    text = CANDIDATE.replace("[agents.bot]\n", '[agents.bot]\nhosts = { env = "prod" }\n')
    candidate = parse_policy(text, "c.toml")
    records = [record("10.0.2.7", host="web-1"), record("10.0.2.7", host="db-1")]
    result = plan(records, candidate, now=NOW,
                  host_labels={"web-1": {"env": "prod"}, "db-1": {"env": "dev"}})
    bot = next(a for a in result.agents if a.agent == "bot")
    assert [o.group.key.host for o in bot.refused] == ["db-1"]
    assert not plan(records, candidate, now=NOW).refused  # labels unknown: not applied


def test_plan_output_in_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "candidate.toml"
    path.write_text(CANDIDATE)
    flows = Flows([record("10.0.5.5", 8443, verdict=ZtVerdict.AUDIT)], "flow log x", None)
    out = io.StringIO()
    assert policy_plan(path, flows, since="24h", now=NOW, out=out) == 0
    text = out.getvalue()
    assert "1 attempts would start being refused" in text
    assert "tcp 10.0.5.5:8443" in text and "1 AUDIT" in text
    assert "grants nobody used:" in text and "10.9.0.0/16 ports 22" in text
    out = io.StringIO()
    policy_plan(path, flows, now=NOW, as_json=True, out=out)
    assert json.loads(out.getvalue())["agents"][0]["refused"][0]["port"] == 8443


# --- suggest ------------------------------------------------------------------------------

SUGGEST_RECORDS = [
    record("10.0.2.7", 443), record("10.0.2.7", 443, offset=3),
    record("10.0.2.7", 444, verdict=ZtVerdict.AUDIT),
    record("10.0.2.8", 8080, verdict=ZtVerdict.AUDIT), record("10.0.2.7", 53, proto=17),
    record("fd00::5", 0, proto=1, verdict=ZtVerdict.AUDIT),
    record("10.0.9.9", 22, verdict=ZtVerdict.DENIED),
    record("10.4.4.4", 0, proto=47, kind=ZtEventKind.FLOW_END, verdict=ZtVerdict.AUDIT),
]


def _allows(text: str, destination: str, port: int | None, proto: int) -> bool:
    policy = parse_policy(text, "suggested.toml")
    grants = compile_grants(policy, now=NOW)
    decision, _ = decide(grants, "bot", policy.agents[0].mode, proto,
                         ipaddress.ip_address(destination), port, NOW + 1)
    return decision is Decision.ALLOWED


def test_suggest_allows_what_went_ahead_and_nothing_refused() -> None:
    text = suggest(SUGGEST_RECORDS, "bot", "example.org", source="test", now_ns=int(NOW * 1e9))
    assert text.startswith("# SUGGESTED POLICY FOR HUMAN REVIEW")
    for went in (("10.0.2.7", 443, 6), ("10.0.2.7", 444, 6), ("10.0.2.8", 8080, 6),
                 ("10.0.2.7", 53, 17), ("fd00::5", None, 58), ("10.4.4.4", None, 47)):
        assert _allows(text, *went), went
    for never in (("10.0.9.9", 22, 6), ("10.0.2.7", 445, 6), ("10.0.2.9", 443, 6),
                  ("10.0.2.7", 53, 6), ("10.0.2.8", 8081, 6)):
        assert not _allows(text, *never), never
    assert 'ports = "443-444"' in text  # contiguous observed ports merge
    assert "# Refused while recorded" in text and "tcp 10.0.9.9:22" in text


def test_every_rule_carries_its_evidence() -> None:
    text = suggest(SUGGEST_RECORDS, "bot", "example.org")
    lines = text.splitlines()
    rule_starts = [i for i, line in enumerate(lines) if line == "[[agents.bot.allow]]"]
    assert len(rule_starts) == 5
    for i in rule_starts:
        assert lines[i - 1].startswith("# evidence: ")
    first = lines[rule_starts[0] - 1]
    assert SUGGEST_RECORDS[0].uuid in first and "3 records (2 ALLOWED, 1 AUDIT)" in first
    assert all('comment = "observed ' in "\n".join(lines[i:i + 6]) for i in rule_starts)
    policy = parse_policy(text, "s.toml")
    assert all(rule.comment.startswith("observed ") for rule in policy.agents[0].allow)


def test_collapse_widens_addresses_only_when_asked() -> None:
    exact = suggest(SUGGEST_RECORDS, "bot", "example.org")
    assert 'to = "10.0.2.7/32"' in exact
    wide = suggest(SUGGEST_RECORDS, "bot", "example.org", collapse=Collapse.parse("/24,/64"))
    assert 'to = "10.0.2.0/24"' in wide and 'to = "fd00::/64"' in wide
    assert _allows(wide, "10.0.2.200", 8080, 6)
    assert Collapse.parse("v6=/48") == Collapse(None, 48)
    for bad in ("24", "/7", "/129", "v5=/24", "/x"):
        with pytest.raises(ValueError, match="--collapse"):
            Collapse.parse(bad)


def test_dns_evidence_is_used_only_when_the_policy_takes_host_names() -> None:
    from ztnet.observe.suggest import hostname_rules_supported

    text = suggest(SUGGEST_RECORDS, "bot", "example.org", dns={"10.0.2.7": ("api.example.org",)})
    if hostname_rules_supported():
        assert 'to = "api.example.org"' in text
    else:
        assert "DNS evidence found, but this ztnet's policy takes no host names" in text
        assert 'to = "10.0.2.7/32"' in text


def test_an_agent_with_only_refused_attempts_gets_no_rules() -> None:
    text = suggest([record("10.0.9.9", 22, verdict=ZtVerdict.DENIED)], "bot", "example.org")
    assert parse_policy(text, "s.toml").agents[0].allow == ()
    assert "no network access at all" in text


def test_suggest_cli_learns_the_trust_domain_and_writes_the_file(tmp_path: Path) -> None:
    log = tmp_path / "flows.jsonl"
    log.write_text("".join(to_json(r) + "\n" for r in SUGGEST_RECORDS) + "not json\n")
    flows = local_flows(log, agent="bot")
    assert len(flows.records) == len(SUGGEST_RECORDS)
    out = tmp_path / "bot.toml"
    assert policy_suggest(flows, agent="bot", since="24h", out_path=out) == 0
    assert parse_policy(out.read_text(), "bot.toml").trust_domain == "example.org"


def test_suggest_without_records_needs_a_trust_domain() -> None:
    from ztnet.errors import ConfigError

    with pytest.raises(ConfigError, match="give --trust-domain"):
        policy_suggest(Flows([], "x", None), agent="bot")
    out = io.StringIO()
    policy_suggest(Flows([], "x", None), agent="bot", trust_domain="example.org", out=out)
    assert "[agents.bot]" in out.getvalue()


# --- the commands, through ztnet.cli.main -------------------------------------------------


def _log(tmp_path: Path) -> Path:
    log = tmp_path / "flows.jsonl"
    log.write_text("".join(to_json(r) + "\n" for r in SUGGEST_RECORDS))
    return log


def test_plan_and_suggest_through_the_cli(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from ztnet.cli import main

    log = _log(tmp_path)
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(CANDIDATE)
    since = "2027-01-01T00:00:00Z"
    assert main(["policy", "plan", str(candidate), "--flows", str(log), "--since", since,
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    bot = next(a for a in document["agents"] if a["agent"] == "bot")
    assert {(o["destination"], o["port"]) for o in bot["refused"]} == {
        ("10.0.2.8", 8080), ("10.0.2.7", 444), ("10.0.2.7", 53), ("fd00::5", None),
        ("10.4.4.4", None)}
    out = tmp_path / "bot.toml"
    assert main(["policy", "suggest", "--agent", "bot", "--flows", str(log), "--since", since,
                 "--collapse", "/24", "--out", str(out)]) == 0
    assert "review it before applying it" in capsys.readouterr().err
    assert main(["policy", "check", str(out)]) == 0
    assert "1 agent, 5 rules" in capsys.readouterr().out
    # the suggestion, planned against the same records, refuses nothing that went ahead
    assert main(["policy", "plan", str(out), "--flows", str(log), "--since", since,
                 "--json"]) == 0
    replanned = json.loads(capsys.readouterr().out)
    assert all(not agent["refused"] for agent in replanned["agents"]
               if agent["agent"] == "bot")


@pytest.mark.parametrize("argv, message", [
    (["--flows", "F", "--controller", "ctl:1"], "give it or --controller, not both"),
    (["--flows", "F", "--since", "soon"], "--since: "),
    (["--flows", "F", "--collapse", "24"], "--collapse: '24' is not a prefix"),
])
def test_bad_suggest_arguments_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], message: str) -> None:
    from ztnet.cli import main

    argv = [str(_log(tmp_path)) if a == "F" else a for a in argv]
    with pytest.raises(SystemExit) as exited:
        main(["policy", "suggest", "--agent", "bot", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_flow_log_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ztnet.cli import main

    assert main(["policy", "suggest", "--agent", "bot", "--flows", str(tmp_path / "no")]) != 0
    assert f"flows: {tmp_path / 'no'}: no such flow log" in capsys.readouterr().err
