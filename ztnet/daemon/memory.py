"""Keep the daemon's resident memory close to what it holds.

A 100,000-grant bundle passes through a few buffers of 20-30 MB each (the
envelope, its base64 text, the payload, the signed message). glibc serves
such sizes with mmap and returns them on free, except that each free of an
mmapped chunk raises its mmap threshold (up to 32 MiB), after which the same
sizes come from the heap and stay resident when freed. Fixing the threshold
(``M_MMAP_THRESHOLD``) turns that dynamic behaviour off: every buffer of
1 MiB or more is mapped for its lifetime and unmapped when freed; a lower
``M_TRIM_THRESHOLD`` gives the heap's free top back sooner. Measured at
100,000 grants: about 50 MiB less resident after a bundle is applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def return_large_buffers(threshold: int = 1 << 20) -> bool:
    """Ask glibc to map every allocation of ``threshold`` bytes or more on its
    own. False where there is no glibc ``mallopt`` (then nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 4 * threshold))
