"""Where one ztnet instance keeps its state in the kernel and on disk.

An instance owns a cgroup subtree, a bpffs directory and a state directory.
The default instance uses ``<cg2>/ztnet``, ``/sys/fs/bpf/ztnet`` and
``/var/lib/ztnet``; a named one (``--instance host-a``: several daemons sharing
a kernel, as in the lab) uses ``<cg2>/ztnet-host-a``, ``/sys/fs/bpf/ztnet-host-a``
and ``/var/lib/ztnet-host-a``, so two instances never touch each other's
programs, maps, agents or records.

The daemon's state directory (``--state``, default :attr:`Instance.state_dir`)
holds its flow log (``FLOWS_FILE``) and audit trail (``AUDIT_FILE``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ztnet.errors import ConfigError, UnsupportedKernel

# ZT_ABI_VERSION of bpf/ztnet.h (the pins live under v<ABI_VERSION>/); mirrored by
# ztnet.datapath.abi and checked against the header by tests/unit/test_abi.py.
ABI_VERSION = 2
BPFFS = Path("/sys/fs/bpf")
STATE_ROOT = Path("/var/lib")
FLOWS_FILE = "flows.jsonl"
AUDIT_FILE = "audit.jsonl"
INSTANCE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


def find_cgroup2_mount(mountinfo: str | None = None) -> Path:
    """The cgroup v2 mount point, read from /proc/self/mountinfo (it is
    /sys/fs/cgroup on pure-v2 hosts and /sys/fs/cgroup/unified on hybrid ones)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    for line in mountinfo.splitlines():
        # fields: id parent major:minor root mountpoint opts [optional…] - fstype src opts
        pre, sep, post = line.partition(" - ")
        if not sep or not post.startswith("cgroup2 "):
            continue
        mount_point = pre.split()[4]
        return Path(mount_point.replace("\\040", " "))
    raise UnsupportedKernel("identity: no cgroup v2 mount found in /proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class Instance:
    name: str
    cgroup_mount: Path

    @classmethod
    def resolve(cls, name: str | None = None, cgroup_mount: Path | None = None) -> Instance:
        name = name or "default"
        if not INSTANCE_NAME_RE.match(name):
            raise ConfigError(
                f"instance: bad instance name {name!r} (lower-case letters, digits, '-', "
                "at most 31 characters)"
            )
        return cls(name, cgroup_mount or find_cgroup2_mount())

    @property
    def _suffix(self) -> str:
        return "" if self.name == "default" else f"-{self.name}"

    @property
    def cgroup_root(self) -> Path:
        """Where the programs are attached; covers every agent below it."""
        return self.cgroup_mount / f"ztnet{self._suffix}"

    @property
    def agents_dir(self) -> Path:
        return self.cgroup_root / "agents"

    def agent_cgroup(self, agent: str) -> Path:
        return self.agents_dir / agent

    @property
    def agent_level(self) -> int:
        """cgroup v2 level of an agent cgroup (the mount root is level 0)."""
        return len(self.agent_cgroup("x").relative_to(self.cgroup_mount).parts)

    @property
    def bpffs_dir(self) -> Path:
        return BPFFS / f"ztnet{self._suffix}"

    @property
    def pin_dir(self) -> Path:
        return self.bpffs_dir / f"v{ABI_VERSION}"

    @property
    def run_dir(self) -> Path:
        return Path("/run") / f"ztnet{self._suffix}"

    @property
    def state_dir(self) -> Path:
        """The daemon's default ``--state``: credentials, flow log, audit trail, spool."""
        return STATE_ROOT / f"ztnet{self._suffix}"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "datapath.lock"
