"""Byte budgets (issue 12): policy syntax, the signed bundle's encoding, the kernel entries."""

from __future__ import annotations

import pytest

from tests.unit.grant_factories import NOW, make_bundle, make_grant
from ztnet.datapath.compile import BootClock, compile_desired_state
from ztnet.errors import BundleRejected, PolicyError
from ztnet.grants.bundle import decode_payload, encode_payload
from ztnet.grants.fastpayload import decode_canonical
from ztnet.grants.model import ByteBudget
from ztnet.policy.compile import compile_grants
from ztnet.policy.document import parse_policy

MiB = 1 << 20
POLICY = """
trust_domain = "example.org"
[agents.bot]
[[agents.bot.allow]]
to = "10.0.2.0/24"
ports = "443"
{budget}
"""


def parse(budget: str) -> ByteBudget | None:
    policy = parse_policy(POLICY.format(budget=budget), "p.toml")
    return policy.agents[0].allow[0].budget


def errors(budget: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse(budget)
    return str(info.value)


def test_policy_budgets_per_connection_and_per_window() -> None:
    assert parse("") is None
    assert parse('max_bytes_out = "50MB"') == ByteBudget(50 * MiB)
    assert parse('max_bytes_out_window = "1G"\nbudget_window = "1h"') == ByteBudget(
        0, 1 << 30, 3600)
    assert parse('max_bytes_out = "1M"\nmax_bytes_out_window = "5M"\nbudget_window = "10m"') \
        == ByteBudget(MiB, 5 * MiB, 600)


@pytest.mark.parametrize("budget, message", [
    ('max_bytes_out = "lots"', "agents.bot.allow[0].max_bytes_out: bad size 'lots'"),
    ('max_bytes_out = "0"', "max_bytes_out: must be at least one byte"),
    ("max_bytes_out = 5", "max_bytes_out: expected a string"),
    ('max_bytes_out_window = "1G"', 'budget_window: missing: max_bytes_out_window needs'),
    ('budget_window = "1h"', "budget_window: only means something with max_bytes_out_window"),
    ('max_bytes_out_window = "1G"\nbudget_window = "forever"', "budget_window: bad duration"),
])
def test_bad_budgets_are_refused_naming_the_field(budget: str, message: str) -> None:
    assert message in errors(budget)


def test_compiled_grants_carry_the_rules_budget() -> None:
    policy = parse_policy(POLICY.format(budget='max_bytes_out = "1M"'), "p.toml")
    [grant] = compile_grants(policy, now=NOW)
    assert grant.budget == ByteBudget(MiB)


def test_the_budget_is_signed_in_the_bundle_and_decodes_back() -> None:
    budgeted = make_grant(budget=ByteBudget(MiB, 5 * MiB, 600))
    bundle = make_bundle(budgeted, make_grant(grant_id=0x99))
    payload = encode_payload(bundle)
    assert (b'"budget":{"max_bytes_out":1048576,"max_bytes_out_window":5242880,'
            b'"window_ms":600000}') in payload
    assert decode_payload(payload) == bundle
    assert decode_canonical(payload, 10) is None  # the fast decoder leaves it to the strict one
    # a grant without a budget keeps the bytes it always had
    assert b"budget" not in encode_payload(make_bundle(make_grant()))


@pytest.mark.parametrize("budget, message", [
    (b'{"max_bytes_out":0,"max_bytes_out_window":0,"window_ms":0}', "needs max_bytes_out"),
    (b'{"max_bytes_out":1,"max_bytes_out_window":0,"window_ms":1500}', "whole number of seconds"),
    (b'{"max_bytes_out":1,"max_bytes_out_window":0}', "window_ms"),
    (b'{"max_bytes_out":1,"max_bytes_out_window":1,"window_ms":0}', "go together"),
])
def test_a_bad_budget_in_a_payload_is_rejected(budget: bytes, message: str) -> None:
    payload = encode_payload(make_bundle(make_grant(budget=ByteBudget(7))))
    good = b'{"max_bytes_out":7,"max_bytes_out_window":0,"window_ms":0}'
    assert good in payload
    with pytest.raises(BundleRejected, match=message):
        decode_payload(payload.replace(good, budget))


def test_kernel_entries_carry_the_budget_of_the_grant_they_report() -> None:
    budgeted = make_grant(grant_id=1, budget=ByteBudget(MiB, 5 * MiB, 600))
    plain = make_grant(grant_id=2, ports=None)
    state = compile_desired_state([budgeted, plain], {"bot": 1}, now=NOW + 1,
                                  clock=BootClock(0), bundle_expires=NOW + 3600)
    values = {value.grant_id: value for value in state.entries.values()}
    assert (values[1].max_bytes_conn, values[1].max_bytes_window, values[1].window_ns) == (
        MiB, 5 * MiB, 600 * 10**9)
    assert (values[2].max_bytes_conn, values[2].max_bytes_window, values[2].window_ns) == (
        0, 0, 0)


def test_policy_check_shows_the_budget() -> None:
    from ztnet.policy.summary import summarize

    policy = parse_policy(POLICY.format(
        budget='max_bytes_out = "50MB"\nmax_bytes_out_window = "1G"\nbudget_window = "1h"'),
        "p.toml")
    assert ("note: agents.bot.allow[0] has a byte budget: 50 MiB out per connection; "
            "1 GiB out per 1h over all its connections") in summarize(policy)
