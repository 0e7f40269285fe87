"""Host labels and host selectors (ztnet.policy.selectors): strict validation, parsing
from the policy file, and which agents a host's bundle carries."""

from __future__ import annotations

import pytest

from ztnet.errors import PolicyError
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle
from ztnet.policy.selectors import (
    MAX_LABELS,
    HostSelector,
    check_labels,
    decode_labels,
    encode_labels,
    for_host,
    parse_label,
    parse_labels,
)
from ztnet.policy.summary import summarize

POLICY = """trust_domain = "test.example"
[agents.everywhere]
[[agents.everywhere.allow]]
to = "10.0.0.1"
ports = "443"

[agents.trainer]
hosts = { env = "prod", role = "gpu" }
[[agents.trainer.allow]]
to = "10.0.0.2"
ports = "443"

[agents.pinned]
hosts = ["web-1", "web-2"]
[[agents.pinned.allow]]
to = "10.0.0.3"
ports = "22"
"""


@pytest.mark.parametrize("text", ["env=prod", "a=b", "k8s.io_x-y=Some.Value_1",
                                  f"{'k' * 63}={'V' * 63}"])
def test_good_labels(text: str) -> None:
    key, value = parse_label(text)
    assert f"{key}={value}" == text


@pytest.mark.parametrize("text, problem", [
    ("env", "KEY=VALUE"),
    ("=prod", "label key"),
    ("Env=prod", "label key"),             # keys are lower case: no two spellings of one key
    ("env =prod", "label key"),
    ("env= prod", "value"),
    ("env=", "value"),
    ("env=prod,role=gpu", "value"),       # the stored form's separator
    ("-env=prod", "label key"),
    ("env-=prod", "label key"),
    ("env=prod-", "value"),
    (f"{'k' * 64}=v", "label key"),
    (f"k={'v' * 64}", "value"),
    ("env=pr\x1bod", "value"),
    ("env=prød", "value"),
    ("ënv=prod", "label key"),
    ("env=a=b", "value"),
])
def test_bad_labels_are_refused_naming_the_part(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_label(text)


def test_label_sets_are_bounded_and_keys_unique() -> None:
    with pytest.raises(ValueError, match="given twice"):
        parse_labels(["env=prod", "env=dev"])
    with pytest.raises(ValueError, match=f"at most {MAX_LABELS}"):
        check_labels({f"k{i}": "v" for i in range(MAX_LABELS + 1)})
    labels = {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert decode_labels(encode_labels(labels)) == labels
    assert encode_labels({"role": "gpu", "env": "prod"}) == "env=prod,role=gpu"
    assert decode_labels("") == {}


def test_selectors_from_the_policy_file() -> None:
    policy = parse_policy(POLICY, "p.toml")
    trainer, pinned = policy.agent("trainer"), policy.agent("pinned")
    assert trainer is not None and pinned is not None
    assert trainer.hosts == HostSelector(labels=(("env", "prod"), ("role", "gpu")))
    assert pinned.hosts == HostSelector(names=("web-1", "web-2"))
    assert policy.agent("everywhere").hosts is None  # type: ignore[union-attr]
    summary = summarize(policy)
    assert "agents.trainer is sent only to hosts with env=prod,role=gpu" in summary
    assert "agents.pinned is sent only to hosts web-1,web-2" in summary


@pytest.mark.parametrize("hosts, problem", [
    ("{}", "empty selector would match every host"),
    ("[]", "empty list matches no host"),
    ('"web-1"', "expected a table of labels"),
    ('{ env = 1 }', "expected a string value"),
    ('{ Env = "prod" }', "label key"),
    ('{ env = "a b" }', "value"),
    ('["Web-1"]', "write it as 'web-1'"),
    ('["web-1", "web-1"]', "listed twice"),
    ('["not a host"]', "not a host name"),
    ('[1]', "host names are strings"),
])
def test_bad_selectors_name_the_agent_and_field(hosts: str, problem: str) -> None:
    text = f'trust_domain = "test.example"\n[agents.bot]\nhosts = {hosts}\n'
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.toml")
    assert "policy: p.toml: agents.bot.hosts: " in str(caught.value)
    assert problem in str(caught.value)


def test_a_misspelt_hosts_key_is_refused() -> None:
    text = 'trust_domain = "test.example"\n[agents.bot]\nhost = ["web-1"]\n'
    with pytest.raises(PolicyError, match="did you mean 'hosts'"):
        parse_policy(text, "p.toml")


@pytest.mark.parametrize("host, labels, expected", [
    ("web-1", {}, {"everywhere", "pinned"}),
    ("web-3", {"env": "prod"}, {"everywhere"}),
    ("web-3", {"env": "prod", "role": "gpu"}, {"everywhere", "trainer"}),
    ("web-2", {"env": "prod", "role": "gpu", "zone": "a"}, {"everywhere", "trainer", "pinned"}),
    ("web-3", {"env": "dev", "role": "gpu"}, {"everywhere"}),
])
def test_a_hosts_bundle_carries_exactly_the_agents_selecting_it(
        host: str, labels: dict[str, str], expected: set[str]) -> None:
    policy = parse_policy(POLICY, "p.toml")
    assert {a.name for a in for_host(policy, host, labels).agents} == expected
    bundle = issue_bundle(policy, host=host, version=1, now=1000.0, issuer="t", labels=labels)
    assert {record.grant.agent for record in bundle.grants} == expected
    # without labels (None) nothing is selected away: what an epoch is sized by
    unselected = issue_bundle(policy, host=host, version=1, now=1000.0, issuer="t")
    assert {record.grant.agent for record in unselected.grants} == {
        "everywhere", "trainer", "pinned"}
