"""``bpfsys.MappedRing``'s walk over a ring's memory, on a memory file laid out as the kernel
lays out a BPF ring buffer's maps: the consumer page, the producer page, the data twice in a
row. The real rings are read in tests/kernel/test_flows.py (with exact loss accounting).
Here: runs of records, a record that wraps round the end, a record still being written, a
discarded one and one of another size."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from ztnet.datapath.bpfsys import RINGBUF_HEADER, MappedRing

PAGE = mmap.PAGESIZE
SIZE = PAGE  # the smallest ring the kernel allows
RECORD = 20  # bytes of a record (plus its 8-byte header: 32 with padding)
BUSY, DISCARD = 1 << 31, 1 << 30


class FakeRing:
    """A memory file with a ring buffer's layout, and the writes a BPF program makes."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.memory = mmap.mmap(self.fd, 2 * PAGE + 2 * SIZE)
        self.producer = 0
        self.map = SimpleNamespace(fd=self.fd, name="zt_test", info=SimpleNamespace(
            max_entries=SIZE))

    def put(self, payload: bytes, *, flags: int = 0, length: int | None = None) -> None:
        length = len(payload) if length is None else length
        record = struct.pack("<II", length | flags, 0) + payload
        record += bytes(-len(record) % 8)
        for copy in (0, SIZE):  # the kernel maps the data twice: write both views
            start = self.producer % SIZE
            first = record[:SIZE - start]
            self.memory[2 * PAGE + copy + start:2 * PAGE + copy + start + len(first)] = first
            rest = record[len(first):]
            self.memory[2 * PAGE + copy:2 * PAGE + copy + len(rest)] = rest
        self.producer += len(record)
        self.memory[PAGE:PAGE + 8] = struct.pack("<Q", self.producer)

    def commit_at(self, position: int, length: int) -> None:
        for copy in (0, SIZE):
            at = 2 * PAGE + copy + position % SIZE
            self.memory[at:at + 4] = struct.pack("<I", length)

    @property
    def consumer(self) -> int:
        return int(struct.unpack_from("<Q", self.memory, 0)[0])

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


@pytest.fixture
def ring() -> Iterator[tuple[FakeRing, MappedRing]]:
    fake = FakeRing()
    mapped = MappedRing(fake.map, RECORD)  # type: ignore[arg-type]
    yield fake, mapped
    mapped.close()
    fake.close()


def payload(n: int) -> bytes:
    return n.to_bytes(4, "little") * (RECORD // 4)


def records(chunk: bytes) -> list[int]:
    stride = (RECORD + RINGBUF_HEADER + 7) & ~7
    assert len(chunk) % stride == 0
    out = []
    for at in range(0, len(chunk), stride):
        length, _ = struct.unpack_from("<II", chunk, at)
        assert length == RECORD
        out.append(int.from_bytes(chunk[at + 8:at + 12], "little"))
    return out


def test_a_run_of_records_is_one_copy_and_gives_its_space_back(
        ring: tuple[FakeRing, Any]) -> None:
    fake, mapped = ring
    assert mapped.take(100) == b""
    for n in range(10):
        fake.put(payload(n))
    assert records(mapped.take(4)) == [0, 1, 2, 3]
    assert fake.consumer == 4 * 32
    assert records(mapped.take(100)) == list(range(4, 10))
    assert fake.consumer == fake.producer and mapped.waiting() == 0


def test_records_that_wrap_round_the_end_come_whole(ring: tuple[FakeRing, Any]) -> None:
    fake, mapped = ring
    seen: list[int] = []
    for n in range(3 * SIZE // 32 + 5):  # round the ring three times
        fake.put(payload(n))
        if n % 7 == 6:
            seen += records(mapped.take(1000))
    seen += records(mapped.take(1000))
    assert seen == list(range(3 * SIZE // 32 + 5))


def test_reading_stops_before_a_record_still_being_written(
        ring: tuple[FakeRing, Any]) -> None:
    fake, mapped = ring
    fake.put(payload(0))
    busy_at = fake.producer
    fake.put(payload(1), flags=BUSY)
    fake.put(payload(2))  # committed by another CPU, after the busy one
    assert records(mapped.take(100)) == [0]
    assert mapped.take(100) == b"" and fake.consumer == busy_at
    fake.commit_at(busy_at, RECORD)
    assert records(mapped.take(100)) == [1, 2]


def test_discarded_records_and_records_of_another_size_are_skipped(
        ring: tuple[FakeRing, Any]) -> None:
    fake, mapped = ring
    fake.put(payload(0))
    fake.put(payload(1), flags=DISCARD)
    fake.put(bytes(44))  # another size: skipped by its own length, counted
    fake.put(payload(3))
    assert records(mapped.take(100)) == [0]
    assert records(mapped.take(100)) == [3]
    assert mapped.malformed == 1 and fake.consumer == fake.producer


def test_a_map_that_is_not_a_ring_is_refused() -> None:
    fake = FakeRing()
    try:
        fake.map.info.max_entries = 3 * PAGE
        with pytest.raises(Exception, match="not a ring buffer"):
            MappedRing(fake.map, RECORD)  # type: ignore[arg-type]
    finally:
        fake.close()
