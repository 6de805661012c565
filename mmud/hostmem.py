"""The host process's memory: the allocator's settings, and arrays committed as touched.

`lazy_zeros` gives the per-page arrays of a memslot (guest RAM, rmap heads, the dirty
bitmap) address space only: the host commits their pages as they are written, so that a
slot of up to 2^31 pages costs what the guest touches.

The allocator is set for arrays that come and go every few milliseconds.

A full audit (and a dirty-log harvest) builds a few dozen numpy arrays of a few MiB each and
frees them at the end of the run. With glibc's defaults each such array is a fresh mmap
whose pages fault in on first touch and are unmapped again at free, so a run pays the page
faults of every temporary every time: at 1 GiB of guest RAM that was half of the full
audit's time (bench/bench_audit.py, `audit_full_sptes_per_s`). A fixed mmap threshold keeps
arrays up to 32 MiB in the heap, and a high trim threshold keeps freed heap memory for the
next run; the cost is that the process's resident size stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MAP_NORESERVE = 0x4000  # <sys/mman.h> on x86-64; Python's mmap module does not export it
MMAP_THRESHOLD = 32 << 20  # the largest fixed threshold glibc accepts on 64-bit
TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_freed_arrays() -> bool:
    """Set the thresholds once per process; False where the C library has no mallopt()."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def lazy_zeros(n: int, dtype: npt.DTypeLike) -> np.ndarray:
    """A zeroed array whose pages the host commits only as they are written: a private
    anonymous MAP_NORESERVE mapping, which needs neither memory nor the heuristic
    overcommit's consent (it refuses one plain mapping larger than the host's RAM)."""
    size = n * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    return np.frombuffer(buf, dtype=dtype, count=n)


PAGE = mmap.PAGESIZE
RESIDENT_CHUNK = 1 << 30  # bytes asked of mincore() at a time: a 256 KiB vector


@functools.cache
def _mincore() -> Callable[[int, int, int], int]:
    fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).mincore
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return fn


def resident_pages(array: np.ndarray) -> np.ndarray:
    """The host pages of a `lazy_zeros` array that are mapped (mincore(2)), ascending, by
    index: every page written, and any page read, since the array was made. The others
    hold zeroes and were never looked at, so a scan of what the array holds can skip
    them without touching them (reading a page maps it)."""
    address, size = array.ctypes.data, array.nbytes
    assert address % PAGE == 0, "a lazy_zeros array starts on a page"
    vector = np.empty(RESIDENT_CHUNK // PAGE, dtype=np.uint8)
    found = []
    for offset in range(0, size, RESIDENT_CHUNK):
        length = min(RESIDENT_CHUNK, size - offset)
        if _mincore()(address + offset, length, vector.ctypes.data):
            raise OSError(ctypes.get_errno(), "mincore")
        pages = np.flatnonzero(vector[:-(-length // PAGE)] & 1)
        if len(pages):
            found.append(pages + offset // PAGE)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
