"""A grant's audit record fields from the template are the bytes the canonical encoder
gives (the audit chain hashes those bytes, so one differing byte breaks verification)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.grant_factories import NOW, labels, make_grant, networks, port_ranges
from ztnet.daemon.flows import grant_fields, grant_fields_json
from ztnet.grants.model import MAX_GRANT_ID, Grant, Proto
from ztnet.observe.audit import canonical

times = st.one_of(st.integers(-2**53, 2**53), st.floats(-1e18, 1e18, allow_nan=False))


@st.composite
def grants(draw: st.DrawFn) -> Grant:
    proto = draw(st.sampled_from(list(Proto)))
    start = draw(times)
    return Grant(draw(st.integers(1, MAX_GRANT_ID)), draw(labels), proto, draw(networks()),
                 None if proto is Proto.ICMP else draw(port_ranges()), start,
                 draw(st.one_of(st.just(start + 300), times.filter(lambda t: t > start))))


@given(grants())
def test_the_template_writes_the_canonical_encoding(grant: Grant) -> None:
    assert grant_fields_json(grant) == canonical(grant_fields(grant)).decode()


@pytest.mark.parametrize("first, then", [(NOW, int(NOW)), (int(NOW), NOW), (0.0, -0.0),
                                         (-0.0, 0.0), (0, 0.0)])
def test_window_bounds_equal_in_value_are_still_written_as_themselves(first: float,
                                                                       then: float) -> None:
    # 1 and 1.0, 0.0 and -0.0 compare equal: each is written as itself, one after the other
    for grant in (make_grant(not_before=first, not_after=first + 300),
                  make_grant(not_before=then, not_after=then + 300)):
        assert grant_fields_json(grant) == canonical(grant_fields(grant)).decode()


@pytest.mark.parametrize("not_before, not_after", [
    (NOW, math.inf), (-math.inf, NOW), (math.nan, NOW), (NOW, math.nan)])
def test_a_grant_window_must_be_finite(not_before: float, not_after: float) -> None:
    with pytest.raises(ValueError, match="not_after must be later|must be finite"):
        make_grant(not_before=not_before, not_after=not_after)
