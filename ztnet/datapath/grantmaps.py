"""Both generations of the grant trie (zt_grants_v1) and the level table
(zt_levels_v1), read and written in bulk.

Entries travel as packed struct bytes (``abi.pack_grant_key``), keys with
their generation byte cleared, so one generation's contents are a plain
``dict[bytes, bytes]`` that compares, diffs and hashes in C. Reads use
BPF_MAP_LOOKUP_BATCH and writes BPF_MAP_UPDATE_BATCH / DELETE_BATCH (a few
syscalls for 100,000 entries; ``bpfsys`` falls back to element calls on a
kernel without them).
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import PinnedMap

Levels = dict[int, tuple[int, int, int, int]]
Contents = dict[bytes, bytes]
ZERO_LEVELS = (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Both generations as the kernel held them at one moment, and a digest of
    the raw dump (equal digests: nothing in the trie changed in between)."""

    contents: dict[int, Contents]
    levels: dict[int, Levels]
    digest: bytes


def _with_generation(keys: list[bytes], generation: int) -> bytes:
    """The keys back to back, each with its generation byte set."""
    packed = bytearray(b"".join(keys))
    if generation:
        packed[abi.GENERATION_OFFSET::abi.GRANT_KEY_SIZE] = bytes([generation]) * len(keys)
    return bytes(packed)


class GrantMaps:
    def __init__(self, trie: PinnedMap, levels: PinnedMap) -> None:
        self.trie = trie
        self.levels = levels

    def dump_raw(self) -> tuple[bytes, bytes]:
        return self.trie.dump()

    @staticmethod
    def digest(raw: tuple[bytes, bytes]) -> bytes:
        hasher = hashlib.blake2b(raw[0], digest_size=16)
        hasher.update(raw[1])
        return hasher.digest()

    def entries(self) -> Iterator[tuple[int, int, tuple[int, ...]]]:
        """(agent index, generation, struct zt_grant_value's fields) of every entry,
        straight from one dump (no per-entry objects beyond the tuples)."""
        keys, values = self.dump_raw()
        agent_at, generation_at = abi.ZtGrantKey.agent.offset, abi.GENERATION_OFFSET
        ksize = abi.GRANT_KEY_SIZE
        for index, value in enumerate(abi.iter_grant_values(values)):
            base = index * ksize
            agent = int.from_bytes(keys[base + agent_at:base + agent_at + 4], "little")
            # the value also holds the byte budgets (ABI v2): only the window and id here
            yield agent, keys[base + generation_at], value[:3]

    def snapshot(self, raw: tuple[bytes, bytes] | None = None,
                 generation: int | None = None) -> Snapshot:
        """Both generations, or only ``generation`` (the others' contents left out: at
        100,000 entries each decoded one is 200,000 short-lived objects)."""
        raw = self.dump_raw() if raw is None else raw
        keys, values = raw
        ksize, vsize, offset = abi.GRANT_KEY_SIZE, abi.GRANT_VALUE_SIZE, abi.GENERATION_OFFSET
        contents: dict[int, Contents] = {0: {}, 1: {}}
        for index in range(len(keys) // ksize):
            base = index * ksize
            held_in = keys[base + offset]
            if generation is not None and held_in != generation:
                continue
            key = keys[base:base + ksize] if not held_in else \
                keys[base:base + offset] + b"\0" + keys[base + offset + 1:base + ksize]
            contents.setdefault(held_in, {})[key] = values[index * vsize:(index + 1) * vsize]
        return Snapshot(contents, self.read_levels(), self.digest(raw))

    def read_levels(self) -> dict[int, Levels]:
        """Non-zero level masks of both generations, by agent index."""
        keys, values = self.levels.dump()
        found: dict[int, Levels] = {0: {}, 1: {}}
        size = ctypes.sizeof(abi.ZtLevels)
        for index in range(len(keys) // 4):
            slot = int.from_bytes(keys[index * 4:index * 4 + 4], "little")
            masks = abi.ZtLevels.from_buffer_copy(values, index * size).mask
            if any(masks):
                generation, agent = divmod(slot, abi.MAX_AGENTS)
                found.setdefault(generation, {})[agent] = (masks[0], masks[1], masks[2],
                                                           masks[3])
        return found

    def write(self, generation: int, current: Mapping[bytes, bytes], have_levels: Levels,
              packed: Mapping[bytes, bytes], levels: Mapping[int, tuple[int, int, int, int]],
              ) -> tuple[int, int]:
        """Make one generation hold ``packed`` and ``levels``: a diff against
        ``current``/``have_levels``, what it holds now. Returns (written, deleted)."""
        changed = [key for key, value in packed.items() if current.get(key) != value]
        if changed:
            self.trie.update_batch(_with_generation(changed, generation),
                                   b"".join(packed[key] for key in changed))
        removed = [key for key in current.keys() - packed.keys()]
        if removed:
            self.trie.delete_batch(_with_generation(removed, generation))
        for index in have_levels.keys() | levels.keys():
            want = levels.get(index, ZERO_LEVELS)
            if have_levels.get(index, ZERO_LEVELS) != want:
                self._set_levels(generation, index, want)
        return len(changed), len(removed)

    def write_changes(self, generation: int, writes: Mapping[bytes, bytes],
                      deletes: list[bytes], have_levels: Levels,
                      levels: Mapping[int, tuple[int, int, int, int]]) -> None:
        """Change some entries of a generation that may be live: levels widened first
        (each agent's old and new masks together), then entries written, then deleted,
        then levels narrowed to the new masks, so that no lookup ever misses an entry
        that is in the old set and the new one."""
        for index, want in levels.items():
            have = have_levels.get(index, ZERO_LEVELS)
            wider = tuple(old | new for old, new in zip(have, want, strict=True))
            if wider != have:
                self._set_levels(generation, index, wider)
        if writes:
            self.trie.update_batch(_with_generation(list(writes), generation),
                                   b"".join(writes.values()))
        if deletes:
            self.trie.delete_batch(_with_generation(deletes, generation))
        for index, want in levels.items():
            have = have_levels.get(index, ZERO_LEVELS)
            if tuple(old | new for old, new in zip(have, want, strict=True)) != want:
                self._set_levels(generation, index, want)

    def _set_levels(self, generation: int, index: int, masks: tuple[int, ...]) -> None:
        slot = ctypes.c_int(generation * abi.MAX_AGENTS + index)
        self.levels.update(slot, abi.ZtLevels((ctypes.c_uint32 * 4)(*masks)))
