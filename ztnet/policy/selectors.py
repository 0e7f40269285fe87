"""Host labels and host selectors: which hosts an agent's rules are sent to.

A host carries labels (``env=prod``, ``role=gpu``) given at enrollment (`controller token
create --label`) and changed by an admin (`ztnet label`). An agent's table may say::

    [agents.trainer]
    hosts = { env = "prod", role = "gpu" }    # every listed label must match
    # or
    hosts = ["gpu-1", "gpu-2"]                # these host names

and a host's bundle then carries the agent's grants only if the selector matches it. An
agent without ``hosts`` is sent to every host.

Labels are strict, because they travel in certificates' companions (the database, the
admin API, terminals) and select who gets which access: a key is 1-63 characters of
lower-case letters, digits, ``.``, ``_`` and ``-``, starting and ending with a letter or
digit; a value the same, with upper-case letters allowed too; at most
:data:`MAX_LABELS` labels per host. Nothing is trimmed or case-folded silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ztnet.grants.payload import normalize_host

if TYPE_CHECKING:
    from ztnet.policy.document import Policy

MAX_LABELS = 32
MAX_LABEL_LENGTH = 63
MAX_SELECTOR_HOSTS = 1000

_KEY_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?\Z")
_VALUE_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z")

Labels = Mapping[str, str]


def check_label_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ValueError(f"label key {key[:80]!r} must be 1-{MAX_LABEL_LENGTH} lower-case "
                         "letters, digits, '.', '_' or '-', starting and ending with a "
                         "letter or digit")
    return key


def check_label_value(key: str, value: str) -> str:
    if not _VALUE_RE.match(value):
        raise ValueError(f"label {key}: value {value[:80]!r} must be 1-{MAX_LABEL_LENGTH} "
                         "letters, digits, '.', '_' or '-', starting and ending with a "
                         "letter or digit")
    return value


def check_labels(labels: Labels) -> dict[str, str]:
    """``labels`` validated (ValueError naming the first bad one), as a sorted dict."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels: a host may have at most {MAX_LABELS}")
    checked: dict[str, str] = {}
    for key in sorted(labels):
        value = labels[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("labels are strings: key=value")
        checked[check_label_key(key)] = check_label_value(key, value)
    return checked


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (as on a command line) → (key, value)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"label {text[:80]!r}: expected KEY=VALUE, like env=prod")
    return check_label_key(key), check_label_value(key, value)


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` options; a key given twice is an error."""
    labels: dict[str, str] = {}
    for item in items:
        key, value = parse_label(item)
        if key in labels:
            raise ValueError(f"label {key} given twice")
        labels[key] = value
    return check_labels(labels)


def encode_labels(labels: Labels) -> str:
    """The stored form: ``k=v`` joined by commas, sorted (neither can hold a comma)."""
    return ",".join(f"{key}={value}" for key, value in sorted(check_labels(labels).items()))


def decode_labels(text: str) -> dict[str, str]:
    return parse_labels(text.split(",")) if text else {}


def format_labels(labels: Labels) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or "-"


@dataclass(frozen=True, slots=True)
class HostSelector:
    """Labels that must all match, or host names (exactly one of them is non-empty)."""

    labels: tuple[tuple[str, str], ...] = ()
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.labels) == bool(self.names):
            raise ValueError("a host selector has either labels or host names")
        check_labels(dict(self.labels))
        for name in self.names:
            if normalize_host(name) != name:
                raise ValueError(f"host name {name!r} is not in canonical (lower-case) form")

    def matches(self, host: str, labels: Labels) -> bool:
        if self.names:
            return host in self.names
        return all(labels.get(key) == value for key, value in self.labels)

    def describe(self) -> str:
        if self.names:
            return "hosts " + ",".join(self.names)
        return "hosts with " + ",".join(f"{k}={v}" for k, v in self.labels)


def parse_selector(raw: object) -> HostSelector:
    """The value of an agent's ``hosts`` key: a table of labels or an array of host
    names. ValueError with what a person needs to fix it."""
    if isinstance(raw, dict):
        if not raw:
            raise ValueError("an empty selector would match every host: leave hosts out "
                             "for that, or name labels like hosts = { env = \"prod\" }")
        for key, value in raw.items():
            if not isinstance(value, str):
                raise ValueError(f"label {key}: expected a string value, like "
                                 f'{key} = "prod"')
        return HostSelector(labels=tuple(sorted(check_labels(raw).items())))
    if isinstance(raw, list):
        if not raw:
            raise ValueError("an empty list matches no host: leave hosts out to mean every "
                             'host, or name them like hosts = ["web-1"]')
        if len(raw) > MAX_SELECTOR_HOSTS:
            raise ValueError(f"at most {MAX_SELECTOR_HOSTS} host names")
        names: list[str] = []
        for item in raw:
            if not isinstance(item, str):
                raise ValueError("host names are strings, like hosts = [\"web-1\"]")
            name = normalize_host(item)
            if name != item:
                raise ValueError(f"host name {item!r}: write it as {name!r}")
            if name in names:
                raise ValueError(f"host {name} is listed twice")
            names.append(name)
        return HostSelector(names=tuple(sorted(names)))
    raise ValueError('expected a table of labels (hosts = { env = "prod" }) or an array of '
                     'host names (hosts = ["web-1"])')


def for_host(policy: Policy, host: str, labels: Labels) -> Policy:
    """``policy`` with only the agents whose selector matches ``host`` (with
    ``labels``): what that host may learn. Agents of other hosts leave no trace."""
    agents = tuple(agent for agent in policy.agents
                   if agent.hosts is None or agent.hosts.matches(host, labels))
    return replace(policy, agents=agents)
