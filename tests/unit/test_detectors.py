"""The detectors and the engine (pure): each fires on its scripted behaviour and stays quiet
on a benign replay of the lab's traffic."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from ztnet.controller.detect import detectors
from ztnet.controller.detect.baseline import Baseline, from_policy, learning
from ztnet.controller.detect.engine import REALERT_SECONDS, Engine, _plan
from ztnet.controller.detect.observation import Observation
from ztnet.errors import PolicyError
from ztnet.policy.detection import DETECTORS, Detection, Thresholds
from ztnet.policy.document import parse_policy

S = 1_000_000_000
T0 = 1_800_000_000 * S
API, DNS, EXFIL = "10.77.0.10", "10.77.0.53", "10.77.0.66"
_ids = itertools.count()


def obs(destination: str = API, port: int = 443, *, allowed: bool = True, kind: str = "connect",
        at: float = 0.0, proto: int = 6, host: str = "host-a", agent: str = "bot",
        **extra: object) -> Observation:
    return Observation(f"u{next(_ids)}", T0 + int(at * S), host, agent, kind, allowed, proto,
                       destination, port, **extra)  # type: ignore[arg-type]


def benign_replay(minutes: int = 30) -> list[Observation]:
    """The lab's allowed traffic, as research-bot and ops-bot make it: a DNS query and an API
    call with its flow end every few seconds, a ping now and then."""
    out = []
    for second in range(0, minutes * 60, 3):
        out.append(obs(DNS, 53, kind="sendmsg", proto=17, at=second))
        out.append(obs(API, 443, at=second + 0.1))
        out.append(obs(API, 443, kind="flow_end", at=second + 0.2, bytes_out=420, bytes_in=9000))
        if second % 30 == 0:
            out.append(obs(API, 8443, agent="ops", host="host-b", at=second))
            out.append(obs(API, 0, proto=1, kind="flow_end", agent="ops", host="host-b",
                           at=second + 0.1, bytes_out=64, bytes_in=64))
    return out


def run(observations: list[Observation], detection: Detection | None = None,
        baseline: Baseline | None = None, now: float = T0 / S) -> list[detectors.Finding]:
    engine = Engine(lambda agent: baseline if baseline and baseline.agent == agent else None)
    return engine.observe(observations, detection or Detection(), now)


def test_a_benign_replay_of_the_lab_raises_nothing_while_learning_or_after() -> None:
    replay = benign_replay()
    engine = Engine(lambda agent: None)
    assert engine.observe(replay, Detection(learning=600.0), T0 / S) == []
    # the learning window is over: the same traffic again, judged against what was learnt
    assert engine.observe(replay, Detection(learning=600.0), T0 / S + 3600) == []
    assert (6, API, 443) in engine.baselines["bot"].targets


def test_denied_burst_fires_at_its_threshold_counting_suppressed_events() -> None:
    burst = [obs(EXFIL, 9000, allowed=False, at=i * 0.1) for i in range(19)]
    assert not [f for f in run(burst) if f.detector == "denied-burst"]
    found = [f for f in run([*burst, obs(EXFIL, 9000, allowed=False, at=2)])
             if f.detector == "denied-burst"]
    assert len(found) == 1 and len(found[0].evidence) == 20
    assert found[0].first_evidence_ns == burst[0].time_ns
    # one record standing for 25 suppressed denials is a burst on its own
    flood = [obs(EXFIL, 9000, allowed=False, attempts=26)]
    assert [f.detector for f in run(flood)] == ["denied-burst"]
    # spread over more than the window: quiet
    slow = [obs(EXFIL, 9000, allowed=False, at=i * 1.0) for i in range(40)]
    assert not [f for f in run(slow) if f.detector == "denied-burst"]


def test_fan_out_fires_on_a_port_scan_and_not_on_repeats() -> None:
    scan = [obs(EXFIL, port, allowed=False, at=port * 0.01) for port in range(1, 21)]
    found = [f for f in run(scan) if f.detector == "fan-out"]
    assert len(found) == 1 and "20 distinct targets (1 addresses)" in found[0].summary
    repeats = [obs(API, 443, at=i * 0.01) for i in range(200)]
    assert run(repeats) == []
    spread = [obs(EXFIL, port, allowed=False, at=port * 5.0) for port in range(1, 40)]
    assert not [f for f in run(spread) if f.detector == "fan-out"]


def test_new_destination_fires_only_once_the_baseline_is_complete() -> None:
    base = learning("bot", T0 / S - 100, 50)
    base.learn(6, API, 443)
    assert run([obs(API, 443)], baseline=base) == []
    found = run([obs("10.77.0.99", 443)], baseline=base)
    assert [f.detector for f in found] == ["new-destination"]
    still_learning = learning("bot", T0 / S, 3600)
    assert run([obs("10.77.0.99", 443)], baseline=still_learning) == []


def test_a_baseline_seeded_from_the_policy_is_complete_and_covers_the_rules() -> None:
    policy = parse_policy('trust_domain = "lab.example"\n[[agents.bot.allow]]\n'
                          'to = "10.77.0.0/24"\nports = "440-450"\nproto = "tcp"\n', "p")
    agent = policy.agent("bot")
    assert agent is not None
    seeded = from_policy(agent, T0 / S)
    assert seeded.complete(T0 / S) and seeded.covers(6, "10.77.0.9", 443)
    assert not seeded.covers(17, "10.77.0.9", 443) and not seeded.covers(6, "10.78.0.1", 443)
    assert Baseline.from_json(seeded.to_json()) == seeded
    assert [f.detector for f in run([obs("10.77.0.9", 22)], baseline=seeded)] == [
        "new-destination"]


def test_egress_volume_fires_above_the_baseline_and_on_a_lopsided_flow() -> None:
    base = learning("bot", 0, 1)
    base.peak_bytes_per_minute = 1 << 20
    t = Thresholds(egress_floor=4 << 20)
    upload = [obs(kind="flow_end", at=i, bytes_out=2 << 20, bytes_in=2 << 20) for i in range(6)]
    found = [f for f in run(upload, baseline=base, detection=Detection(thresholds=t))
             if f.detector == "egress-volume"]
    assert len(found) == 1 and "above 10485760" in found[0].summary
    lopsided = [obs(kind="flow_end", bytes_out=50 << 20, bytes_in=1000)]
    assert "ratio" in run(lopsided)[0].summary
    assert run([obs(kind="flow_end", bytes_out=50 << 20, bytes_in=40 << 20)]) == []


@pytest.mark.parametrize("destination", ["169.254.169.254", "127.0.0.1", "fe80::1", "::1",
                                         "fd00:ec2::254", "169.254.10.1"])
def test_refused_attempts_toward_metadata_link_local_or_loopback_fire(destination: str) -> None:
    found = run([obs(destination, 80, allowed=False)])
    assert "sensitive-destination" in [f.detector for f in found]
    assert run([obs(destination, 80, allowed=True)]) == []  # a grant allowed it: not news


def test_dns_detectors_fire_on_tunnelling_patterns_and_are_inert_without_dns_fields() -> None:
    tunnel = [obs(DNS, 53, kind="sendmsg", proto=17, at=i * 0.1,
                  dns_name=f"{i:04x}q8zk3v0pl2m9xw7r5t1y6u4.exfil.example", dns_rcode="NOERROR")
              for i in range(60)]
    names = {f.detector for f in run(tunnel)}
    assert {"dns-entropy", "dns-subdomains"} <= names
    failing = [obs(DNS, 53, kind="sendmsg", proto=17, at=i * 0.1, dns_name=f"h{i}.corp.example",
                   dns_rcode="NXDOMAIN" if i % 3 else "NOERROR") for i in range(30)]
    assert "dns-failures" in {f.detector for f in run(failing)}
    plain = [replace(o, dns_name="", dns_rcode="") for o in tunnel]
    assert not {f.detector for f in run(plain)} & {"dns-entropy", "dns-subdomains",
                                                    "dns-failures"}
    assert detectors.entropy("aaaa") == 0.0 and detectors.entropy("ab") == 1.0


def test_repeats_are_held_back_and_off_disables_a_detector() -> None:
    engine = Engine(lambda agent: None)
    burst = [obs(EXFIL, 9000, allowed=False, at=i * 0.01) for i in range(60)]
    first = engine.observe(burst, Detection(), T0 / S)
    assert [f.detector for f in first].count("denied-burst") == 1
    assert engine.held_back >= 2
    again = engine.observe(burst, Detection(), T0 / S + REALERT_SECONDS + 1)
    assert [f.detector for f in again].count("denied-burst") == 1
    off = parse_policy('trust_domain = "x.example"\n[detection.actions]\n'
                       'denied-burst = "off"\nfan-out = "off"\n', "p").detection
    assert Engine(lambda agent: None).observe(burst, off, T0 / S) == []


def test_the_engine_runs_every_detector_a_policy_can_name() -> None:
    """A detector added to the policy's list but not to the engine's table would be
    accepted in `[detection.actions]` and never run."""
    off_but = {name: parse_policy(
        'trust_domain = "x.example"\n[detection.actions]\n'
        + "".join(f'{other} = "off"\n' for other in DETECTORS if other != name), "p").detection
        for name in DETECTORS}
    for name, settings in off_but.items():
        assert len(_plan(settings.for_agent("bot"))[1]) == 1, name
    assert len(_plan(Detection().for_agent("bot"))[1]) == len(DETECTORS)


def test_each_agent_runs_the_detectors_its_own_actions_leave_on() -> None:
    """One batch, two agents: the engine works out each agent's detectors once per
    batch, and one agent's settings never stand in for the other's."""
    burst = [obs(EXFIL, 9000, allowed=False, at=i * 0.01, agent=agent)
             for i in range(30) for agent in ("quiet-bot", "bot")]
    settings = parse_policy('trust_domain = "x.example"\n'
                            '[detection.agents.quiet-bot.actions]\ndenied-burst = "off"\n',
                            "p").detection
    found = Engine(lambda agent: None).observe(burst, settings, T0 / S)
    assert [(f.agent, f.detector) for f in found] == [("bot", "denied-burst")]
    assert [(f.agent, f.detector) for f in Engine(lambda agent: None).observe(
        burst, Detection(), T0 / S)] == [("quiet-bot", "denied-burst"), ("bot", "denied-burst")]


def test_the_detection_table_is_validated_whole_with_every_problem_named() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy('trust_domain = "x.example"\n[detection]\nfan_out = 0\n'
                     'cooldown = 5\nlearnig = "1h"\n[detection.actions]\nscan = "quarantine"\n'
                     'fan-out = "nuke"\n[detection.agents."Bad Name"]\n', "p.toml")
    message = str(info.value)
    for needle in ("detection.fan_out: must be above 0", "detection.cooldown",
                   "did you mean 'learning'", "detection.actions.scan",
                   "detection.actions.fan-out: 'nuke'", "not an agent name"):
        assert needle in message, needle
    policy = parse_policy('trust_domain = "x.example"\n[detection]\nfan_out = 5\n'
                          'egress_floor = "1M"\n[detection.agents.bot]\nfan_out = 9\n'
                          'actions = { fan-out = "quarantine" }\n', "p")
    assert policy.detection.for_agent("bot").thresholds.fan_out == 9
    assert policy.detection.for_agent("bot").thresholds.egress_floor == 1 << 20
    assert policy.detection.for_agent("bot").action("fan-out") == "quarantine"
    assert policy.detection.for_agent("other").action("fan-out") == "alert"
    assert policy.detection.for_agent("other").thresholds.fan_out == 5
    assert set(DETECTORS) == {name for name, _ in Detection().actions}
    hash(policy)  # a policy stays hashable
