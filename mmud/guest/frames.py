"""Guest physical frame allocator with per-frame reference counts (struct page's _refcount).

A LIFO free list, like the per-CPU page lists of Linux's allocator: the frame freed last is
handed out first. That reuse is what the shadow MMU must survive — a page-table page freed by
one process comes back at once as another process's data page or table, while stale shadow
pages of its old role may still exist.
"""

from __future__ import annotations


class OutOfMemory(Exception):
    """No free guest frame (the kernel answers with an OOM kill)."""


class BadPage(Exception):
    """A reference to a frame that is not allocated: a corrupted page table (Linux's
    "BUG: Bad page map"). The kernel treats it as an oops, not as a simulator failure."""


class FrameAllocator:
    def __init__(self, first_pfn: int, end_pfn: int) -> None:
        # Reversed so that pop() hands out ascending frames on a fresh boot.
        self._free: list[int] = list(range(end_pfn - 1, first_pfn - 1, -1))
        self._refcount: dict[int, int] = {}
        self.nr_frames = end_pfn - first_pfn

    @property
    def nr_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        """A frame with reference count 1; its contents are stale until the caller zeroes it."""
        if not self._free:
            raise OutOfMemory
        pfn = self._free.pop()
        self._refcount[pfn] = 1
        return pfn

    def get_page(self, pfn: int) -> None:
        self._refcount[pfn] = self._count(pfn) + 1

    def put_page(self, pfn: int) -> None:
        """Drop one reference; the last one returns the frame to the free list."""
        count = self._count(pfn) - 1
        if count:
            self._refcount[pfn] = count
        else:
            del self._refcount[pfn]
            self._free.append(pfn)

    def page_count(self, pfn: int) -> int:
        return self._refcount.get(pfn, 0)

    def _count(self, pfn: int) -> int:
        count = self._refcount.get(pfn)
        if count is None:
            raise BadPage(f"bad page map: pfn {pfn:#x} is not allocated")
        return count
