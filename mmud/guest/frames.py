"""Guest physical frame allocator with per-frame reference counts (struct page's _refcount).

A LIFO free list, like the per-CPU page lists of Linux's allocator: the frame freed last is
handed out first. That reuse is what the shadow MMU must survive — a page-table page freed by
one process comes back at once as another process's data page or table, while stale shadow
pages of its old role may still exist.

Nothing in it is sized by RAM, so that a 1 TiB guest costs what it touches: frames never
handed out are a watermark walking up the RAM ranges (lowest first, as a fresh boot hands
them out), and only frames freed since sit on the LIFO stack.
"""

from __future__ import annotations

from collections.abc import Sequence


class OutOfMemory(Exception):
    """No free guest frame (the kernel answers with an OOM kill)."""


class BadPage(Exception):
    """A reference to a frame that is not allocated: a corrupted page table (Linux's
    "BUG: Bad page map"). The kernel treats it as an oops, not as a simulator failure."""


class FrameAllocator:
    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        """ranges: the free frames at boot, [first, end) pfns in ascending order."""
        self._ranges = [(first, end) for first, end in ranges if first < end]
        self._range = 0  # the range the watermark is in
        self._next = self._ranges[0][0] if self._ranges else 0  # the watermark
        self._fresh = self.nr_frames = sum(end - first for first, end in self._ranges)
        self._freed: list[int] = []
        self._refcount: dict[int, int] = {}

    @property
    def nr_free(self) -> int:
        return self._fresh + len(self._freed)

    def alloc(self) -> int:
        """A frame with reference count 1; its contents are stale until the caller zeroes it.
        The frame freed last, or else the lowest never handed out."""
        if self._freed:
            pfn = self._freed.pop()
        elif self._fresh:
            pfn = self._next
            self._fresh -= 1
            self._next += 1
            if self._next == self._ranges[self._range][1] and self._fresh:
                self._range += 1
                self._next = self._ranges[self._range][0]
        else:
            raise OutOfMemory
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
            self._freed.append(pfn)

    def page_count(self, pfn: int) -> int:
        return self._refcount.get(pfn, 0)

    def _count(self, pfn: int) -> int:
        count = self._refcount.get(pfn)
        if count is None:
            raise BadPage(f"bad page map: pfn {pfn:#x} is not allocated")
        return count
