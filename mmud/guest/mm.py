"""Address spaces of the guest kernel: `MM` (struct mm_struct) and `VMA` (vm_area_struct).

Pure bookkeeping, no guest memory access: which ranges a process may touch and with which
rights, plus `expected`, the oracle of what the process stored in its memory. The page-table
code (memory.py) consults the VMAs; the user programs check every load against `expected`, so
a wrong translation anywhere in the MMU shows up as a data error.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mmud.guest.pgtable import PAGE_SIZE

VM_READ = 1
VM_WRITE = 2
VM_EXEC = 4

# User address-space layout (x86-64 Linux, non-PIE binary): a text image at 4 MiB, data right
# after it, the heap at 16 MiB, mmap areas top-down from below the stack. The layout spreads a
# process over several pgd/pud/pmd entries, so each address space has a real tree of tables.
TEXT_START = 0x400000
HEAP_START = 0x1000000
STACK_TOP = 0x7FFFFFFFF000
MMAP_TOP = 0x7F0000000000
MMAP_FLOOR = 0x100000000
TASK_SIZE = 1 << 47


@dataclass
class VMA:
    start: int
    end: int
    flags: int
    # Page-cache identity of a file-backed mapping (the program image); None for anonymous.
    file: int | None = None
    # Whether munmap/mprotect may pick it (mmap areas, not the image, heap or stack).
    mapped: bool = False

    @property
    def nr_pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    def permits(self, write: bool, fetch: bool) -> bool:
        if write:
            return bool(self.flags & VM_WRITE)
        if fetch:
            return bool(self.flags & VM_EXEC)
        return bool(self.flags & VM_READ)

    def pgoff(self, addr: int) -> int:
        return (addr - self.start) // PAGE_SIZE


@dataclass
class MM:
    """One address space. `pgd` is the frame of its top-level table.

    Invariant: a multi-threaded mm only ever gains mappings. The kernel has no TLB
    shootdown, so only single-threaded processes unmap, downgrade or fork.
    """

    pgd: int
    vmas: list[VMA] = field(default_factory=list)
    # User word address -> the value last stored there; absent words read as zero.
    expected: dict[int, int] = field(default_factory=dict)
    rss: int = 0
    users: int = 1

    def find_vma(self, addr: int) -> VMA | None:
        """The VMA containing addr (unlike Linux's, not the next one above it)."""
        i = bisect.bisect_right(self._starts(), addr) - 1
        if i >= 0 and addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    def intersects(self, start: int, end: int) -> bool:
        """Whether any VMA overlaps [start, end): its page tables are still needed."""
        i = bisect.bisect_left(self._starts(), end) - 1
        return i >= 0 and self.vmas[i].end > start

    def insert_vma(self, vma: VMA) -> None:
        bisect.insort(self.vmas, vma, key=lambda v: v.start)

    def split(self, start: int, end: int) -> list[VMA]:
        """Cut VMAs at start and end (split_vma); return those now inside [start, end)."""
        for cut in (start, end):
            vma = self.find_vma(cut)
            if vma is not None and vma.start < cut:
                tail = VMA(cut, vma.end, vma.flags, vma.file, vma.mapped)
                vma.end = cut
                self.insert_vma(tail)
        return [v for v in self.vmas if start <= v.start and v.end <= end]

    def remove_vmas(self, start: int, end: int) -> None:
        """Drop the VMAs inside [start, end) and forget what the process stored there."""
        inside = self.split(start, end)
        self.vmas = [v for v in self.vmas if v not in inside]
        for addr in [a for a in self.expected if start <= a < end]:
            del self.expected[addr]

    def get_unmapped_area(self, length: int) -> int | None:
        """Highest free gap of `length` bytes below MMAP_TOP (top-down allocation)."""
        top = MMAP_TOP
        for vma in reversed(self.vmas):
            if vma.start >= MMAP_TOP:
                continue
            if vma.end <= top - length:
                break
            top = min(top, vma.start)
        return top - length if top - length >= MMAP_FLOOR else None

    def _starts(self) -> list[int]:
        return [v.start for v in self.vmas]
