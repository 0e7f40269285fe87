"""AdminClient.flow_history (what `ztnet policy plan|suggest` read) against a real
controller: every matching record, however many pages it takes and in whatever order the
records arrived, and AUDIT records stored and filtered like the others."""

from __future__ import annotations

import time

import pytest

from tests.controller.flow_support import NS, make_record
from ztnet.errors import ControllerError
from ztnet.observe.records import Verdict, from_json
from ztnet.testing.controller import ControllerProcess
from ztnet.testing.flows import report
from ztnet.testing.nodes import enroll


def test_every_record_is_read_whatever_order_it_arrived_in(
        controller: ControllerProcess) -> None:
    identity = enroll(controller, "history-a")
    start = time.time_ns() // 1000 * 1000 - 600 * NS
    fresh = [make_record("history-a", agent="hist", time_ns=start + (100 + i) * NS)
             for i in range(5)]
    # a spool backlog after an outage: records dated earlier arrive later
    backlog = [make_record("history-a", agent="hist", time_ns=start + i * NS,
                           verdict=Verdict.AUDIT) for i in range(7)]
    late = [make_record("history-a", agent="hist", time_ns=start + (50 + i) * NS)
            for i in range(3)]
    assert report(controller, identity, [(1, fresh), (2, backlog), (3, late)]).acks == [1, 2, 3]
    expected = {r.uuid for r in fresh + backlog + late}
    with controller.admin() as admin:
        for page in (2, 3, 10_000):
            got = [from_json(data).uuid for data in admin.flow_history(agent="hist", page=page)]
            assert sorted(got) == sorted(expected), page  # all of them, each once
        since = [from_json(d) for d in admin.flow_history(agent="hist", since_ns=start + 50 * NS,
                                                          page=2)]
        assert {r.uuid for r in since} == {r.uuid for r in fresh + late}
        audited = admin.query_flows(agent="hist", verdict="audit", limit=100)
        assert {from_json(d).uuid for d in audited.records} == {r.uuid for r in backlog}
        with pytest.raises(ControllerError, match="more than 4 flow records match"):
            admin.flow_history(agent="hist", page=2, max_records=4)
