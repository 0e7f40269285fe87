"""The pure parts of `ztnet run`: the agent environment, `ztnet run` flags, the filter's rules."""

from __future__ import annotations

import pytest

from ztnet.errors import IdentityError
from ztnet.identity.environment import AGENT_PATH, BASE_NAMES, agent_environment
from ztnet.identity.launch import DYNAMIC_USER, run_user_flags
from ztnet.identity.uids import AgentUser

USER = AgentUser(1234, 1234, "rbot", "/home/rbot")
CALLER = {"PATH": "/root/bin:/usr/sbin", "AWS_SECRET_ACCESS_KEY": "x", "TERM": "xterm-256color",
          "OPENAI_API_KEY": "sk-1", "SSH_AUTH_SOCK": "/tmp/ssh"}


def test_environment_is_the_documented_minimum() -> None:
    env = agent_environment(USER, "bot", [], CALLER, on_terminal=False)
    assert env == {"PATH": AGENT_PATH, "HOME": "/home/rbot", "USER": "rbot", "LOGNAME": "rbot",
                   "LANG": "C.UTF-8", "ZTNET_AGENT": "bot"}
    assert set(env) <= set(BASE_NAMES)


def test_term_only_on_a_terminal_and_only_if_plain() -> None:
    assert agent_environment(USER, "bot", [], CALLER, on_terminal=True)["TERM"] == \
        "xterm-256color"
    hostile = {**CALLER, "TERM": "xterm\x1b]0;owned\x07"}
    assert "TERM" not in agent_environment(USER, "bot", [], hostile, on_terminal=True)


def test_named_variables_pass_and_bad_names_are_refused() -> None:
    env = agent_environment(USER, "bot", ["OPENAI_API_KEY"], CALLER, on_terminal=False)
    assert env["OPENAI_API_KEY"] == "sk-1" and "AWS_SECRET_ACCESS_KEY" not in env
    with pytest.raises(IdentityError, match="not set"):
        agent_environment(USER, "bot", ["GITHUB_TOKEN"], CALLER, on_terminal=False)
    for bad in ("1X", "A=B", "", "X Y"):
        with pytest.raises(IdentityError, match="not a variable name"):
            agent_environment(USER, "bot", [bad], CALLER, on_terminal=False)


def test_run_user_flags() -> None:
    assert run_user_flags(None) == ["--allow-root"]
    assert run_user_flags(DYNAMIC_USER) == ["--dynamic-user"]
    assert run_user_flags("rbot") == ["--user", "rbot"]


def test_root_is_root_by_uid_or_gid() -> None:
    assert AgentUser(0, 5, "r", "/").is_root and AgentUser(5, 0, "g", "/").is_root
    assert not USER.is_root


def test_agent_filter_builds() -> None:
    seccomp = pytest.importorskip("seccomp", reason="needs python3-seccomp")
    from ztnet.identity import seccomp as agent_filter

    assert isinstance(agent_filter.build_filter(), seccomp.SyscallFilter)
