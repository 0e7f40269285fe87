"""GrantInfos (ztnet.daemon.flows): what flow records learn about grant ids is what
``{**before, **bundle's}`` gave, bundle after bundle."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ztnet.daemon.flows import GrantInfos
from ztnet.observe.context import GrantInfo, grant_infos


@given(st.lists(st.sets(st.integers(1, 30), max_size=12), max_size=6))
def test_a_view_per_bundle_reads_like_the_merged_dicts(bundles: list[set[int]]) -> None:
    view, merged = GrantInfos(), {}
    for version, ids in enumerate(bundles, start=1):
        view = view.applied({i: None for i in ids}, GrantInfo(version, f"k{version}"))
        merged = {**merged, **grant_infos(ids, version, f"k{version}")}
        assert dict(view.items()) == merged and len(view) == len(merged)
        assert view.get(999) is None
