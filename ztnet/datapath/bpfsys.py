"""Thin ctypes bindings to the system libbpf for what bcc does not offer:
pinned maps opened by path, querying and detaching the programs attached to
a cgroup. Every failure becomes a DatapathError naming the object."""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import mmap
import os
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, cast

from ztnet.errors import DatapathError, MapUpdateError

BPF_ANY = 0
BPF_F_ALLOW_MULTI = 2
_MAX_PROGS = 64
_BATCH = 8192  # entries per batch call: bounds the buffers, not the map
# A kernel without batch operations for a map type (before 5.6; LPM tries got them
# in 5.6 too) answers EINVAL or ENOTSUPP: then the element calls are used.
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: the kernel's ENOTSUPP

S = TypeVar("S")
T = TypeVar("T", bound=ctypes.Structure | ctypes.c_uint64)


class AttachType(enum.IntEnum):
    """enum bpf_attach_type (uapi/linux/bpf.h), the ones ztnet uses."""

    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET_SOCK_RELEASE = 34


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise DatapathError(f"datapath: cannot load libbpf ({name}): {exc}") from exc
    vp, i, u32, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    signatures = {
        "bpf_obj_get": ([ctypes.c_char_p], i),
        "bpf_map_lookup_elem": ([i, vp, vp], i),
        "bpf_map_update_elem": ([i, vp, vp, u64], i),
        "bpf_map_delete_elem": ([i, vp], i),
        "bpf_map_get_next_key": ([i, vp, vp], i),
        "bpf_prog_query": ([i, i, u32, ctypes.POINTER(u32), ctypes.POINTER(u32),
                            ctypes.POINTER(u32)], i),
        "bpf_prog_get_fd_by_id": ([u32], i),
        "bpf_prog_attach": ([i, i, i, ctypes.c_uint], i),
        "bpf_prog_detach2": ([i, i, i], i),
        "bpf_obj_get_info_by_fd": ([i, vp, ctypes.POINTER(u32)], i),
        "bpf_obj_pin": ([i, ctypes.c_char_p], i),
        "bpf_map_update_batch": ([i, vp, vp, ctypes.POINTER(u32), vp], i),
        "bpf_map_delete_batch": ([i, vp, ctypes.POINTER(u32), vp], i),
        "bpf_map_lookup_batch": ([i, vp, vp, vp, vp, ctypes.POINTER(u32), vp], i),
    }
    for fn_name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, fn_name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


def obj_get(path: Path, what: str = "object") -> int:
    """An fd for the bpffs pin at ``path`` (a map or a program)."""
    fd = _lib().bpf_obj_get(str(path).encode())
    if fd < 0:
        raise DatapathError(f"datapath: cannot open pinned {what} {path}: "
                            f"{os.strerror(_err(fd))}")
    return int(fd)


def obj_pin(fd: int, path: Path) -> None:
    rc = _lib().bpf_obj_pin(fd, str(path).encode())
    if rc < 0:
        raise DatapathError(f"datapath: cannot pin {path}: {os.strerror(_err(rc))}")


def _err(result: int) -> int:
    """libbpf 1.x returns -errno; older builds return -1 and set errno."""
    if result == -1:
        return ctypes.get_errno() or errno.EPERM
    return -result


@cache
def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


class _MapInfo(ctypes.Structure):
    """The leading fields of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 160),
    ]


BPF_MAP_TYPE_PERCPU_ARRAY = 6


def map_id(fd: int) -> int:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        raise DatapathError(f"datapath: cannot inspect map fd {fd}: {os.strerror(_err(rc))}")
    return int(info.id)


class PinnedMap:
    """A map opened from its bpffs pin; keys and values are ctypes structs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        fd = obj_get(path, "map")
        self.fd = fd
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        rc = _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
        if rc < 0:
            os.close(fd)
            raise DatapathError(f"datapath: cannot inspect map {path}: {os.strerror(_err(rc))}")
        self.info = info
        self.percpu = info.type == BPF_MAP_TYPE_PERCPU_ARRAY

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_layout(self, key_type: type[Any], value_type: type[Any]) -> None:
        if (self.info.key_size, self.info.value_size) != (
            ctypes.sizeof(key_type), ctypes.sizeof(value_type)
        ):
            raise DatapathError(
                f"datapath: map {self.path} has key/value size "
                f"{self.info.key_size}/{self.info.value_size}, expected "
                f"{ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}: ABI mismatch"
            )

    def lookup(self, key: ctypes._CData, value: ctypes._CData) -> bool:
        rc = _lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if rc < 0:
            if _err(rc) == errno.ENOENT:
                return False
            raise DatapathError(f"datapath: lookup in {self.name} failed: {os.strerror(_err(rc))}")
        return True

    def update(self, key: ctypes._CData, value: ctypes._CData) -> None:
        rc = _lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY)
        if rc < 0:
            raise MapUpdateError(
                f"datapath: update of {self.name} failed: {os.strerror(_err(rc))}",
                self.name, key,
            )

    def delete(self, key: ctypes._CData) -> bool:
        rc = _lib().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc < 0:
            if _err(rc) == errno.ENOENT:
                return False
            raise MapUpdateError(
                f"datapath: delete from {self.name} failed: {os.strerror(_err(rc))}",
                self.name, key,
            )
        return True

    @property
    def key_size(self) -> int:
        return int(self.info.key_size)

    @property
    def value_size(self) -> int:
        return int(self.info.value_size)

    def update_batch(self, keys: bytes, values: bytes) -> None:
        """Write many entries (keys and values packed back to back) with
        BPF_MAP_UPDATE_BATCH, a few syscalls for any number of entries."""
        count = len(keys) // self.key_size
        if len(values) != count * self.value_size:
            raise ValueError(f"{self.name}: {count} keys but {len(values)} value bytes")
        done = 0
        while done < count:
            chunk = min(_BATCH, count - done)
            key_chunk = keys[done * self.key_size:(done + chunk) * self.key_size]
            value_chunk = values[done * self.value_size:(done + chunk) * self.value_size]
            processed = ctypes.c_uint32(chunk)
            rc = _lib().bpf_map_update_batch(self.fd, key_chunk, value_chunk,
                                             ctypes.byref(processed), None)
            if rc < 0:
                if _err(rc) in _NO_BATCH and processed.value == 0:
                    self._update_each(key_chunk, value_chunk)
                else:
                    key = key_chunk[processed.value * self.key_size:][:self.key_size]
                    raise MapUpdateError(f"datapath: update of {self.name} failed: "
                                         f"{os.strerror(_err(rc))}", self.name, key)
            done += chunk

    def _update_each(self, keys: bytes, values: bytes) -> None:
        for index in range(len(keys) // self.key_size):
            key = (ctypes.c_char * self.key_size).from_buffer_copy(keys, index * self.key_size)
            value = (ctypes.c_char * self.value_size).from_buffer_copy(
                values, index * self.value_size)
            self.update(key, value)

    def delete_batch(self, keys: bytes) -> None:
        """Delete many entries (keys packed back to back); absent keys fail."""
        count = len(keys) // self.key_size
        done = 0
        while done < count:
            chunk = min(_BATCH, count - done)
            key_chunk = keys[done * self.key_size:(done + chunk) * self.key_size]
            processed = ctypes.c_uint32(chunk)
            rc = _lib().bpf_map_delete_batch(self.fd, key_chunk, ctypes.byref(processed), None)
            if rc < 0:
                if _err(rc) in _NO_BATCH and processed.value == 0:
                    for index in range(chunk):
                        self.delete((ctypes.c_char * self.key_size).from_buffer_copy(
                            key_chunk, index * self.key_size))
                else:
                    key = key_chunk[processed.value * self.key_size:][:self.key_size]
                    raise MapUpdateError(f"datapath: delete from {self.name} failed: "
                                         f"{os.strerror(_err(rc))}", self.name, key)
            done += chunk

    def dump(self) -> tuple[bytes, bytes]:
        """Every key and value, packed back to back (BPF_MAP_LOOKUP_BATCH; the
        element calls where the kernel has no batch lookup for this map type)."""
        key_size, value_size = self.key_size, self.value_size
        keys = (ctypes.c_char * (key_size * _BATCH))()
        values = (ctypes.c_char * (value_size * _BATCH))()
        tokens = [(ctypes.c_char * max(key_size, 8))() for _ in range(2)]
        key_parts: list[bytes] = []
        value_parts: list[bytes] = []
        first = True
        while True:
            count = ctypes.c_uint32(_BATCH)
            rc = _lib().bpf_map_lookup_batch(self.fd, None if first else tokens[0], tokens[1],
                                             keys, values, ctypes.byref(count), None)
            error = _err(rc) if rc < 0 else 0
            if error and error != errno.ENOENT:
                if first and error in _NO_BATCH:
                    return self._dump_each()
                raise DatapathError(f"datapath: reading {self.name} failed: "
                                    f"{os.strerror(error)}")
            key_parts.append(keys.raw[:count.value * key_size])
            value_parts.append(values.raw[:count.value * value_size])
            if error == errno.ENOENT:
                return b"".join(key_parts), b"".join(value_parts)
            ctypes.memmove(tokens[0], tokens[1], len(tokens[1]))
            first = False

    def _dump_each(self) -> tuple[bytes, bytes]:
        key_type = ctypes.c_char * self.key_size
        key_parts, value_parts = [], []
        for key in list(self.keys(key_type)):
            value = (ctypes.c_char * self.value_size)()
            if self.lookup(key, value):
                key_parts.append(key.raw)
                value_parts.append(value.raw)
        return b"".join(key_parts), b"".join(value_parts)

    def keys(self, key_type: Callable[[], S]) -> Iterator[S]:
        """All keys. Collect them before deleting any: deleting while walking
        restarts a hash map walk."""
        current: S | None = None
        while True:
            nxt = key_type()
            rc = _lib().bpf_map_get_next_key(
                self.fd, ctypes.byref(cast(Any, current)) if current is not None else None,
                ctypes.byref(cast(Any, nxt)),
            )
            if rc < 0:
                if _err(rc) == errno.ENOENT:
                    return
                raise DatapathError(f"datapath: walking {self.name} failed: "
                                    f"{os.strerror(_err(rc))}")
            yield nxt
            current = nxt

    def percpu_values(self, index: int, value_type: type[T]) -> list[T]:
        """The per-CPU slots of one per-CPU array entry."""
        slot = (ctypes.sizeof(value_type) + 7) & ~7
        buffer = (ctypes.c_uint8 * (slot * possible_cpus()))()
        if not self.lookup(ctypes.c_int(index), buffer):
            return []
        return [cast(T, value_type.from_buffer_copy(buffer, cpu * slot))
                for cpu in range(possible_cpus())]


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info, up to run_cnt."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("_lens", ctypes.c_uint32 * 2),
        ("_insns", ctypes.c_uint64 * 2),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("_middle", ctypes.c_uint8 * 112),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("_rest", ctypes.c_uint8 * 64),
    ]


class ProgramStats:
    __slots__ = ("prog_id", "name", "run_time_ns", "run_cnt")

    def __init__(self, prog_id: int, name: str, run_time_ns: int, run_cnt: int) -> None:
        self.prog_id, self.name = prog_id, name
        self.run_time_ns, self.run_cnt = run_time_ns, run_cnt


def prog_info(prog_fd: int) -> ProgramStats:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = _lib().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        raise DatapathError(f"datapath: cannot inspect program: {os.strerror(_err(rc))}")
    return ProgramStats(info.id, info.name.decode(errors="replace"), info.run_time_ns,
                        info.run_cnt)


def attached_prog_ids(cgroup_fd: int, attach_type: AttachType) -> list[int]:
    ids = (ctypes.c_uint32 * _MAX_PROGS)()
    count = ctypes.c_uint32(_MAX_PROGS)
    flags = ctypes.c_uint32(0)
    rc = _lib().bpf_prog_query(cgroup_fd, int(attach_type), 0, ctypes.byref(flags), ids,
                               ctypes.byref(count))
    if rc < 0:
        raise DatapathError(
            f"datapath: querying {attach_type.name} programs failed: {os.strerror(_err(rc))}"
        )
    return list(ids[: count.value])


def prog_fd_by_id(prog_id: int) -> int:
    fd = _lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise DatapathError(f"datapath: program {prog_id} is gone: {os.strerror(_err(fd))}")
    return int(fd)


def attach(prog_fd: int, cgroup_fd: int, attach_type: AttachType, cgroup: Path) -> None:
    from ztnet.errors import AttachError

    rc = _lib().bpf_prog_attach(prog_fd, cgroup_fd, int(attach_type), BPF_F_ALLOW_MULTI)
    if rc < 0:
        raise AttachError(
            f"datapath: attach {attach_type.name} to {cgroup} failed: "
            f"{errno.errorcode.get(_err(rc), '?')} ({os.strerror(_err(rc))})",
            str(cgroup),
        )


def detach(prog_fd: int, cgroup_fd: int, attach_type: AttachType) -> None:
    rc = _lib().bpf_prog_detach2(prog_fd, cgroup_fd, int(attach_type))
    if rc < 0 and _err(rc) != errno.ENOENT:
        raise DatapathError(
            f"datapath: detach {attach_type.name} failed: {os.strerror(_err(rc))}"
        )


# struct bpf_ringbuf_hdr (kernel/bpf/ringbuf.c): a u32 length whose top bits say the record
# is still being written (BUSY) or was given up (DISCARD), then a u32 page offset
RINGBUF_HEADER = 8
_RINGBUF_BUSY = 1 << 31
_RINGBUF_DISCARD = 1 << 30
_NOT_PLAIN = re.compile(rb"[^\x00]")  # a header's top byte: 0 unless BUSY or DISCARD


class MappedRing:
    """One pinned BPF_MAP_TYPE_RINGBUF, read from its memory maps as libbpf's consumer does
    (tools/lib/bpf/ringbuf.c), without a callback per record: the consumer position's page
    is mapped read-write, the producer position's page and the data read-only (the kernel
    maps the data twice in a row, so a record that wraps round is contiguous). For rings
    whose records all have one size (``record_size``: zt_events_v1, zt_denials_v1), so that
    a run of them is one copy and one ``struct.iter_unpack``. The map must stay open."""

    def __init__(self, ring: PinnedMap, record_size: int) -> None:
        size = int(ring.info.max_entries)
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise DatapathError(f"datapath: {ring.name}: {size} bytes is not a ring buffer")
        self.name, self.fd = ring.name, ring.fd
        self.record_size = record_size
        self.stride = (record_size + RINGBUF_HEADER + 7) & ~7
        self.malformed = 0  # records of another size, skipped
        self._mask = size - 1
        page = mmap.PAGESIZE
        try:
            self._consumer_map = mmap.mmap(ring.fd, page, mmap.MAP_SHARED,
                                           mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._data_map = mmap.mmap(ring.fd, page + 2 * size, mmap.MAP_SHARED,
                                       mmap.PROT_READ, offset=page)
        except OSError as exc:
            raise DatapathError(f"datapath: cannot map ring buffer {ring.name}: "
                                f"{exc.strerror or exc}") from None
        self._consumer = memoryview(self._consumer_map)[:8].cast("Q")
        self._producer = memoryview(self._data_map)[:8].cast("Q")
        self._data = memoryview(self._data_map)[page:]

    def waiting(self) -> int:
        """Bytes the kernel has reserved and this reader not consumed yet."""
        return int(self._producer[0] - self._consumer[0])

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` committed records from the consumer position on, each with its
        header, as one copy (``len // stride`` records); their space goes back to the kernel
        at once. Stops before the first record still being written. Headers are read before
        the data they cover (the kernel commits a record by clearing BUSY after writing it)."""
        consumer = self._consumer[0]
        while True:
            available = (self._producer[0] - consumer) // self.stride
            if available <= 0:
                return b""
            start = consumer & self._mask
            count = min(available, limit)
            # the top byte of each header in one strided copy: 0 for a plain committed record
            tops = self._data[start + 3:start + count * self.stride:self.stride].tobytes()
            odd = _NOT_PLAIN.search(tops)
            if odd is not None:
                count = odd.start()
            chunk = self._data[start:start + count * self.stride].tobytes() if count else b""
            count = self._same_size(chunk, count)
            if count == 0:
                length = int.from_bytes(self._data[start:start + 4], "little")
                if length & _RINGBUF_BUSY:
                    return b""
                consumer += self._skip(length)  # a discarded record, or one of another size
                self._consumer[0] = consumer
                continue
            self._consumer[0] = consumer + count * self.stride  # x86: a release store
            return chunk[:count * self.stride]

    def _same_size(self, chunk: bytes, count: int) -> int:
        """How many of the ``count`` records in ``chunk`` lead with a header of this ring's
        record size (the low bytes of each length, one strided comparison each)."""
        expected = self.record_size.to_bytes(4, "little")
        for i in range(3):
            column = chunk[i:count * self.stride:self.stride]
            if column != expected[i:i + 1] * count:
                count = next(k for k, byte in enumerate(column) if byte != expected[i])
        return count

    def _skip(self, length: int) -> int:
        """The bytes a record that is not a plain ``record_size`` one takes."""
        if not length & _RINGBUF_DISCARD:
            self.malformed += 1
        length &= ~(_RINGBUF_BUSY | _RINGBUF_DISCARD)
        return (length + RINGBUF_HEADER + 7) & ~7

    def close(self) -> None:
        for view in (self._consumer, self._producer, self._data):
            view.release()
        self._consumer_map.close()
        self._data_map.close()
