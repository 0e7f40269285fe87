"""RecordDecoder, the batch decoder of flow records (the controller's ingest, flow logs read
back): on any input it gives what the typed decoder gives, the same record or the same error,
also after it has shared the parts of earlier records."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_observe_records import denied_event, flow_end_event, make_ctx, make_event
from ztnet.controller import flows
from ztnet.datapath.abi import ZtEventKind, ZtFamily
from ztnet.observe import records
from ztnet.observe.records import RecordDecoder, from_event, to_dict, to_json

BASES = [to_dict(from_event(event, make_ctx())) for event in (
    make_event(), denied_event(suppressed=3), flow_end_event(),
    make_event(kind=ZtEventKind.SENDMSG, proto=17),
    make_event(proto=1, family=ZtFamily.V6, destination="fd00::1", destination_port=0),
    make_event(proto=132))]
BASES.append({**BASES[0], "destination_names": ["api.example.org"]})


def outcome(decode: Any, line: bytes) -> tuple[str, object]:
    try:
        return "record", decode(line)
    except ValueError as exc:
        return "error", str(exc)


def typed(line: bytes) -> object:
    """The reference: every field through its typed accessor."""
    return records._decoded(orjson.loads(line))


def paths(value: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a decoded record, objects and leaves."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    return found


ALL_PATHS = sorted({p for base in BASES for p in paths(base)})

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.sampled_from(["TCP", "UDP", "OTHER", "IPv4", "IPv6", "connect", "dns", "ALLOWED",
                     "GRANTED", "g-0000000000000abc", "10.0.2.7", "2027-01-15T08:00:00Z"]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def twin(value: object) -> object:
    """A value equal to ``value`` under == and hash but of another JSON type (1 and true,
    7 and 7.0): what a cache keyed by values would confuse."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return True if value == 1 else float(value)
    return value


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid line, and that record with one key removed or its value replaced."""
    base = draw(st.sampled_from(BASES))
    data = copy.deepcopy(base)
    path = draw(st.sampled_from([p for p in ALL_PATHS if _has(data, p)]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["delete", "replace", "twin"]))
    if how == "delete":
        del parent[path[-1]]
    elif how == "twin":
        parent[path[-1]] = twin(parent[path[-1]])
    else:
        parent[path[-1]] = draw(json_value)
    return orjson.dumps(base), json.dumps(data).encode()


def _has(data: object, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


@settings(max_examples=600, deadline=None)
@given(mutated())
def test_a_mutated_record_decodes_as_the_typed_decoder_decodes_it(
        lines: tuple[bytes, bytes]) -> None:
    valid, line = lines
    decoder = RecordDecoder()
    decoder.decode(valid)  # its process, agent and grant are now shared: a cache to confuse
    assert outcome(decoder.decode, line) == outcome(typed, line)


@pytest.mark.parametrize("base", BASES, ids=lambda b: f"{b['event_type']}-{b['IP']['ipVersion']}")
def test_every_kind_decodes_to_the_record_it_was_made_from(base: dict[str, Any]) -> None:
    line = orjson.dumps(base)
    decoder = RecordDecoder()
    first, second = decoder.decode(line), decoder.decode(line)
    assert first == second == typed(line)
    assert to_json(first) == line.decode()
    assert first.process is second.process and first.agent is second.agent


def test_a_true_policy_version_is_refused_after_a_grant_of_version_one() -> None:
    base = copy.deepcopy(BASES[0])
    base["grant"]["policy_version"] = 1
    decoder = RecordDecoder()
    decoder.decode(orjson.dumps(base))
    base["grant"]["policy_version"] = True
    with pytest.raises(ValueError, match="grant.policy_version is not a non-negative integer"):
        decoder.decode(orjson.dumps(base))


def test_a_batch_is_stored_in_the_daemons_form_whatever_form_it_came_in() -> None:
    """Keys reordered, spaces, escapes: each row holds to_json of its record."""
    made = [from_event(event, make_ctx()) for event in (make_event(), flow_end_event())]
    received = max(r.time_ns for r in made) + 1
    odd = json.dumps(dict(reversed(list(to_dict(made[0]).items()))), indent=1,
                     ensure_ascii=True).encode()
    rows = flows.decode_batch("web-1", [odd, to_json(made[1]).encode()], received)
    assert [row.record for row in rows] == [to_json(r) for r in made]
