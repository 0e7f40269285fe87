"""The agent's environment: a short documented list, never the operator's.

Root's environment carries tokens and cloud credentials (AWS_*, GITHUB_TOKEN, SSH_AUTH_SOCK,
KUBECONFIG …). An agent gets only :data:`BASE_NAMES` plus the variables the operator names
with ``--env NAME`` (docs/agents.md):

    PATH      /usr/local/bin:/usr/bin:/bin
    HOME      the user's home directory (``/`` for a dynamic user)
    USER, LOGNAME   the user's name (``ztnet-AGENT`` for a dynamic user)
    LANG      C.UTF-8
    TERM      the caller's TERM, only when the agent runs on a terminal of its own
    ZTNET_AGENT     the agent's name
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ztnet.errors import IdentityError
from ztnet.identity.uids import AgentUser

AGENT_PATH = "/usr/local/bin:/usr/bin:/bin"
BASE_NAMES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "ZTNET_AGENT")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
TERM_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")


def check_env_names(names: Sequence[str], source: Mapping[str, str]) -> list[str]:
    """Names given with --env: well formed and set in the caller's environment."""
    for name in names:
        if not ENV_NAME_RE.match(name):
            raise IdentityError(f"identity: --env {name!r} is not a variable name "
                                "(letters, digits and '_', not starting with a digit)")
        if name not in source:
            raise IdentityError(f"identity: --env {name}: the variable is not set in "
                                "ztnet run's environment")
    return list(names)


def agent_environment(user: AgentUser, agent: str, passed: Sequence[str],
                      source: Mapping[str, str], *, on_terminal: bool) -> dict[str, str]:
    env = {"PATH": AGENT_PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name,
           "LANG": "C.UTF-8", "ZTNET_AGENT": agent}
    term = source.get("TERM", "")
    if on_terminal and TERM_RE.match(term):
        env["TERM"] = term
    for name in check_env_names(passed, source):
        env[name] = source[name]
    return env
