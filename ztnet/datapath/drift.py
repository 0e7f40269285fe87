"""Drift: how the kernel's grant maps differ from what this process installed.

The periodic resync dumps the active generation from the kernel (never a
copy kept in memory) and compares it with the desired state last written
there. Anything else was written by someone other than the daemon: another
process with CAP_BPF, a bug, a half-done write of a crashed predecessor.
Cilium's ``syncPolicyMapWithDump`` does the same for its policy maps. This
module is the pure part: what differs, counted by kind, with a few examples
for the log and the audit trail.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from ztnet.datapath.abi import EntryKey, EntryValue

Levels = Mapping[int, tuple[int, int, int, int]]
MAX_SAMPLES = 5
DRIFT_KINDS = ("extra", "missing", "changed", "levels", "generation")


@dataclass(frozen=True, slots=True)
class Drift:
    """Entries the kernel holds that were not installed (``extra``), installed
    entries it lacks (``missing``), entries whose window or grant differ
    (``changed``), agents whose level masks differ (``levels``), and a
    generation flipped by someone else (``generation``)."""

    extra: int = 0
    missing: int = 0
    changed: int = 0
    levels: int = 0
    generation: int = 0
    samples: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.extra + self.missing + self.changed + self.levels + self.generation

    def __add__(self, other: Drift) -> Drift:
        return Drift(self.extra + other.extra, self.missing + other.missing,
                     self.changed + other.changed, self.levels + other.levels,
                     self.generation + other.generation,
                     (self.samples + other.samples)[:MAX_SAMPLES])

    def counts(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in DRIFT_KINDS}


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What this process wrote into a generation it no longer keeps a copy of (the one
    a whole install left: at 100,000 entries the copy was 22 MiB): the entry count, the
    sum of the entries' hashes, which does not depend on their order, and the level
    masks. Python's bytes hash is seeded per process, so a fingerprint is compared only
    within the process that took it; it finds drift, but cannot itemize it."""

    generation: int
    entries: int
    digest: int
    levels: Levels

    @classmethod
    def of(cls, generation: int, packed: Mapping[bytes, bytes], levels: Levels) -> Fingerprint:
        return cls(generation, len(packed), sum(map(hash, packed.items())), dict(levels))

    def drift(self, kernel: Mapping[bytes, bytes] | None, kernel_levels: Levels) -> Drift:
        """How the generation read back from the kernel differs from what was written
        (``kernel``: its entries, None to compare only the level masks)."""
        where = f"gen {self.generation} "
        drift = find_drift({}, kernel_levels, {}, self.levels, where)
        if kernel is None or (len(kernel) == self.entries
                              and sum(map(hash, kernel.items())) == self.digest):
            return drift
        extra, missing = max(0, len(kernel) - self.entries), max(0, self.entries - len(kernel))
        return drift + Drift(extra, missing, 0 if extra or missing else 1, samples=(
            f"{where}holds {len(kernel)} entries, {self.entries} were written there, "
            "not all the same (not itemized: only its fingerprint is kept)",))


def describe(key: EntryKey, value: EntryValue | None) -> str:
    """One entry in words, for logs: agent index, protocol, destination, port block."""
    address = ipaddress.ip_address(key.addr)
    text = (f"agent#{key.agent} proto {key.proto} {address}/{key.addr_bits} "
            f"port {key.port}/{key.port_bits}")
    if value is not None:
        text += f" grant {value.grant_id:#x} until boot+{value.not_after_ns / 1e9:.0f}s"
    return text


def find_drift(kernel: Mapping[EntryKey, EntryValue], kernel_levels: Levels,
               installed: Mapping[EntryKey, EntryValue], installed_levels: Levels,
               where: str = "") -> Drift:
    extra = kernel.keys() - installed.keys()
    missing = installed.keys() - kernel.keys()
    changed = {key for key in kernel.keys() & installed.keys() if kernel[key] != installed[key]}
    zero = (0, 0, 0, 0)
    levels = {index for index in kernel_levels.keys() | installed_levels.keys()
              if kernel_levels.get(index, zero) != installed_levels.get(index, zero)}
    samples = [f"extra {where}{describe(key, kernel[key])}" for key in sorted(extra, key=repr)]
    samples += [f"missing {where}{describe(key, installed[key])}"
                for key in sorted(missing, key=repr)]
    samples += [f"changed {where}{describe(key, kernel[key])}"
                for key in sorted(changed, key=repr)]
    samples += [f"levels {where}of agent#{index}" for index in sorted(levels)]
    return Drift(len(extra), len(missing), len(changed), len(levels),
                 samples=tuple(samples[:MAX_SAMPLES]))
