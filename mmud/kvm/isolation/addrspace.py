"""The KVM address space (`kvm_mm`): which kernel ranges it maps, and its page-table entries.

A mapping covers whole pages, as the series' kvm_copy_ptes() copies page-table entries: a
request for part of a page maps the page.  Ranges are kept sorted and merged, so the check
on every touch is one bisect.

The initial set is what the series maps before any user action, pared back as its reviewers
asked (kernel text, not the whole kernel image):
- kernel text and the kvm module's text: the code that runs must be mapped;
- the cpu_entry_area (GDT, entry stacks) and each vCPU thread's task_struct and stack;
- the per-CPU area of each CPU running a vCPU (kvm_copy_percpu_mapping);
- `struct kvm` and each `struct kvm_vcpu` (kvm_isolation_init_vm/init_vcpu) and the
  memslots array `struct kvm_memslots` (the last patch of the series).
What the MMU allocates on its own — rmap and page-track arrays, the mmu page hash, shadow
page headers and tables — is left out: those are what the fault log shows.
"""

from __future__ import annotations

import bisect
import errno

from mmud.kvm.isolation.layout import KERNEL_TEXT, PAGE_OFFSET, SymbolTable
from mmud.uapi.isolation import MapRequest
from mmud.x86.paging import PAGE_SIZE

INITIAL_SYMBOLS = ("_stext", "kvm_text", "cpu_entry_area", "kvm", "kvm_memslots")
INITIAL_VCPU_SYMBOLS = ("vcpu{i}", "vcpu{i}_task", "vcpu{i}_stack", "cpu{i}_per_cpu")


# x86-64 4-level paging: the shift of the range each level's entry covers.
_LEVELS = (("PGD", 39), ("P4D", 39), ("PUD", 30), ("PMD", 21), ("PTE", 12))
_PAGE_TABLE = 0x63  # _KERNPG_TABLE: present, writable, accessed, dirty
_PAGE_KERNEL = 0x8000000000000163  # present, writable, accessed, dirty, global, NX
_PFN_MASK = (1 << 28) - 1  # table frames are numbered below 1 TiB


class KvmAddressSpace:
    """The set of kernel pages mapped in the KVM address space."""

    PGD = 0xFFFF88810A5E0000  # kvm_mm.pgd
    KERNEL_PGD = 0xFFFFFFFF8280A000  # init_mm.pgd (init_top_pgt)

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.named: list[tuple[int, int, str]] = []  # (start, end, what) in mapping order

    def is_mapped(self, address: int) -> bool:
        k = bisect.bisect_right(self._starts, address) - 1
        return k >= 0 and address < self._ends[k]

    def map(self, start: int, size: int, what: str) -> None:
        end = -(-(start + size) // PAGE_SIZE) * PAGE_SIZE  # from the unrounded start
        start &= ~(PAGE_SIZE - 1)
        self.named.append((start, end, what))
        ranges = sorted(zip(self._starts, self._ends, strict=True)) + [(start, end)]
        ranges.sort()
        merged: list[list[int]] = []
        for s, e in ranges:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def apply(self, req: MapRequest, symbols: SymbolTable) -> None:
        """Map what a request names; EINVAL for a symbol the kernel does not know.

        A range whose every page is mapped already is a no-op, as copying page-table
        entries that are there changes nothing: no second `mappings` line, however often
        the same symbol is written.
        """
        if req.symbol is None:
            start, size, what = req.start, req.size, ""
        else:
            region = symbols.lookup(req.symbol)
            if region is None or region.size == 0:
                raise OSError(errno.EINVAL, f"unknown symbol {req.symbol!r}")
            start, size, what = region.start, region.size, region.name
        if not self._all_mapped(start, start + size):
            self.map(start, size, what)

    def _all_mapped(self, lo: int, hi: int) -> bool:
        """Whether every page of [lo, hi) is mapped (the ranges are merged: one must hold it)."""
        k = bisect.bisect_right(self._starts, lo) - 1
        return k >= 0 and hi <= self._ends[k]

    def lines(self) -> tuple[str, ...]:
        """kvm/isolation/mappings: one `start-end size what` line per mapping made."""
        return tuple(f"{s:016x}-{e:016x} {e - s:>12} {what}".rstrip() for s, e, what in self.named)

    def _covers(self, lo: int, hi: int) -> bool:
        """Whether any mapped page lies in [lo, hi)."""
        k = bisect.bisect_left(self._ends, lo + 1)
        return k < len(self._starts) and self._starts[k] < hi

    def dump_pagetable(self, address: int, kernel: bool) -> str:
        """kvm_dump_pagetable(): `BASE <pgd> PGD <e> P4D <e> PUD <e> PMD <e> PTE <e>`.

        The kernel's tables map every kernel address; kvm_mm's entries are present only
        down the path of mapped pages.  Table frames are numbered from the walk, so two
        dumps of the same state print the same entries.
        """
        base = self.KERNEL_PGD if kernel else self.PGD
        parts = [f"BASE {base:016x}"]
        table_pfn = (base - PAGE_OFFSET) >> 12 if not kernel else (base - KERNEL_TEXT) >> 12
        entry = 0
        for name, shift in _LEVELS:
            if name == "P4D":  # folded into the PGD with 4-level paging: the same entry
                parts.append(f"P4D {entry:x}")
                continue
            lo = address >> shift << shift
            if not (kernel or self._covers(lo, lo + (1 << shift))):
                parts.append(f"{name} 0")
                break
            if name == "PTE":
                entry = ((address - PAGE_OFFSET) >> 12 & _PFN_MASK) << 12 | _PAGE_KERNEL
            else:
                table_pfn = (table_pfn * 512 + (address >> shift & 511)) & _PFN_MASK | 1 << 28
                entry = table_pfn << 12 | _PAGE_TABLE
            parts.append(f"{name} {entry:x}")
        return " ".join(parts)
