"""Page-table code of the guest kernel (Linux mm/memory.c, mm/mprotect.c, kernel/fork.c).

Every table access is a supervisor load or store through the direct map on the vCPU the
task runs on, so each edit of a table the shadow MMU shadows traps, is emulated, unsyncs a
leaf table or floods a directory, exactly as Linux's own edits do under KVM.

The functions are generators: each `yield` is a preemption point and follows at most one
guest store (or a zeroing/copy of one page). A task may migrate between vCPUs at any yield,
so the vCPU is always read from `task.vcpu` afresh and never kept across a yield.

The module depends on the kernel only through `MemKernel` and `MemTask`, the little it needs
of them, so that kernel.py imports this module and never the other way round.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Protocol

from mmud.guest.frames import FrameAllocator
from mmud.guest.hw import GuestVcpu
from mmud.guest.mm import MM, TASK_SIZE, VM_EXEC, VM_WRITE, VMA
from mmud.guest.pgtable import (
    LEVEL_ENTRY_SIZE,
    LEVEL_INDEX,
    PAGE_SIZE,
    PMD_SIZE,
    PTRS_PER_TABLE,
    entry_pfn,
    entry_present,
    mk_pte,
    mk_table_entry,
    pfn_to_virt,
    pte_index,
    pte_mkwrite,
    pte_same,
    pte_write,
    pte_wrprotect,
)
from mmud.x86 import paging as pg

# Table entries scanned between two preemption points when nothing is written.
SCAN_BATCH = 16


class MemTask(Protocol):
    """What page-table code needs of a task: the vCPU it runs on now, and its mm."""

    @property
    def vcpu(self) -> GuestVcpu: ...

    @property
    def mm(self) -> MM: ...


class MemKernel(Protocol):
    """What page-table code needs of the kernel: frames, the page cache and the counters."""

    @property
    def frames(self) -> FrameAllocator: ...

    @property
    def counters(self) -> dict[str, int]: ...

    @property
    def page_cache(self) -> dict[tuple[int, int], int]: ...

    def file_word(self, file: int, pgoff: int) -> int: ...


def read_entry(task: MemTask, table: int, index: int) -> int:
    return task.vcpu.read_u64(pfn_to_virt(table) + 8 * index)


def set_entry(task: MemTask, table: int, index: int, value: int) -> None:
    task.vcpu.write_u64(pfn_to_virt(table) + 8 * index, value)


def scan_entries(task: MemTask, table: int, index: int, n: int) -> tuple[int, int]:
    """Read entries index, index+1, … of a table, at most n, up to the first present one:
    how many were read, and the last (present, unless all n were absent)."""
    return task.vcpu.scan_u64(pfn_to_virt(table) + 8 * index, n, pg.PT_PRESENT_MASK)


def lookup_table(task: MemTask, mm: MM, addr: int, level: int) -> int | None:
    """Frame of the level-`level` table mapping addr, or None if an upper entry is absent."""
    table = mm.pgd
    for upper in range(4, level, -1):
        entry = read_entry(task, table, LEVEL_INDEX[upper](addr))
        if not entry_present(entry):
            return None
        table = entry_pfn(entry)
    return table


def alloc_zeroed_page(k: MemKernel, task: MemTask) -> Generator[None, None, int]:
    """A fresh frame, zeroed through the direct map (clear_page)."""
    pfn = k.frames.alloc()
    task.vcpu.clear_page(pfn_to_virt(pfn))
    yield
    return pfn


def pte_table_alloc(k: MemKernel, task: MemTask, mm: MM, addr: int) -> Generator[None, None, int]:
    """Walk to addr's PTE table, allocating missing pud/pmd/pte tables on the way."""
    table = mm.pgd
    for level in (4, 3, 2):
        index = LEVEL_INDEX[level](addr)
        entry = read_entry(task, table, index)
        if not entry_present(entry):
            child = yield from alloc_zeroed_page(k, task)
            # Another thread of the mm may have populated the entry while this one was
            # preempted (the pmd_populate re-check under the page-table lock).
            entry = read_entry(task, table, index)
            if entry_present(entry):
                k.frames.put_page(child)
            else:
                entry = mk_table_entry(child)
                set_entry(task, table, index, entry)
                k.counters["pt_pages_allocated"] += 1
                yield
        table = entry_pfn(entry)
    return table


def handle_mm_fault(
    k: MemKernel, task: MemTask, vma: VMA, addr: int, write: bool
) -> Generator[None, None, None]:
    """Resolve a fault the VMA permits: demand-map, break COW, or accept a spurious fault."""
    table = yield from pte_table_alloc(k, task, task.mm, addr)
    index = pte_index(addr)
    pte = read_entry(task, table, index)
    if not entry_present(pte):
        if vma.file is None:
            yield from do_anonymous_page(k, task, vma, table, addr)
        else:
            yield from do_read_fault(k, task, (vma.file, vma.pgoff(addr)), table, addr)
    elif write and not pte_write(pte):
        yield from do_wp_page(k, task, vma, table, addr, pte)
    else:
        # Already mapped with the rights asked for: another thread won the race, or the
        # fault came from a translation the #PF itself has invalidated.
        k.counters["spurious_faults"] += 1


def _install_pte(
    k: MemKernel, task: MemTask, table: int, addr: int, pfn: int, pte: int
) -> Generator[None, None, None]:
    """Set a not-present PTE to pte, unless another thread mapped the page meanwhile."""
    index = pte_index(addr)
    if entry_present(read_entry(task, table, index)):
        k.frames.put_page(pfn)
        return
    set_entry(task, table, index, pte)
    task.mm.rss += 1
    yield


def do_anonymous_page(
    k: MemKernel, task: MemTask, vma: VMA, table: int, addr: int
) -> Generator[None, None, None]:
    pfn = yield from alloc_zeroed_page(k, task)
    k.counters["anon_faults"] += 1
    pte = mk_pte(pfn, write=bool(vma.flags & VM_WRITE), exec_=bool(vma.flags & VM_EXEC))
    yield from _install_pte(k, task, table, addr, pfn, pte)


def do_read_fault(
    k: MemKernel, task: MemTask, key: tuple[int, int], table: int, addr: int
) -> Generator[None, None, None]:
    """Map page `key` (file, page offset) of a program image from the page cache, filling
    it on first use. The caller resolved the VMA to the key: only file mappings get here."""
    pfn = k.page_cache.get(key)
    if pfn is None:
        pfn = yield from alloc_zeroed_page(k, task)
        task.vcpu.write_u64(pfn_to_virt(pfn), k.file_word(*key))
        k.page_cache[key] = pfn
        yield
    k.frames.get_page(pfn)
    k.counters["file_faults"] += 1
    yield from _install_pte(k, task, table, addr, pfn, mk_pte(pfn, write=False, exec_=True))


def do_wp_page(
    k: MemKernel, task: MemTask, vma: VMA, table: int, addr: int, pte: int
) -> Generator[None, None, None]:
    """Write fault on a present read-only PTE of a writable VMA: copy-on-write."""
    index = pte_index(addr)
    old = entry_pfn(pte)
    if k.frames.page_count(old) == 1:
        # Last user of the page: take it over (wp_page_reuse); a permission increase needs
        # no flush.
        set_entry(task, table, index, pte_mkwrite(pte))
        k.counters["cow_reuses"] += 1
        yield
        return
    new = k.frames.alloc()
    task.vcpu.copy_page(pfn_to_virt(new), pfn_to_virt(old))
    yield
    if not pte_same(read_entry(task, table, index), pte):
        k.frames.put_page(new)
        return
    set_entry(task, table, index, mk_pte(new, write=True, exec_=bool(vma.flags & VM_EXEC)))
    flush_tlb_page(k, task, addr)
    k.frames.put_page(old)
    k.counters["cow_copies"] += 1
    yield


def flush_tlb_page(k: MemKernel, task: MemTask, addr: int) -> None:
    task.vcpu.invlpg(addr)
    k.counters["invlpg"] += 1


def flush_tlb_local(k: MemKernel, task: MemTask) -> None:
    """Flush the whole TLB by reloading CR3 (what Linux does above 33 pages)."""
    task.vcpu.cr3 = task.vcpu.cr3
    k.counters["tlb_flushes"] += 1


def _present_ptes(
    task: MemTask, mm: MM, start: int, end: int
) -> Iterator[tuple[int, int, int] | None]:
    """(table, addr, pte) of each present PTE in [start, end), skipping absent tables.

    Yields None after every SCAN_BATCH entries read without a hit, so that a long scan of a
    sparse range still leaves preemption points to its caller.
    """
    addr = start
    scanned = 0
    while addr < end:
        table = lookup_table(task, mm, addr, 1)
        next_table = (addr // PMD_SIZE + 1) * PMD_SIZE
        stop = min(end, next_table)
        if table is not None:
            while addr < stop:
                n = min(SCAN_BATCH - scanned, (stop - addr) // PAGE_SIZE)
                read, pte = scan_entries(task, table, pte_index(addr), n)
                addr += (read - 1) * PAGE_SIZE
                if entry_present(pte):
                    yield table, addr, pte
                    scanned = 0
                else:
                    scanned += read
                    if scanned == SCAN_BATCH:
                        scanned = 0
                        yield None
                addr += PAGE_SIZE
        addr = stop


def zap_pte_range(
    k: MemKernel, task: MemTask, mm: MM, start: int, end: int, *, flush: bool
) -> Generator[None, None, None]:
    """Clear the PTEs of [start, end) and drop their pages; INVLPG each if the mm is live."""
    for hit in _present_ptes(task, mm, start, end):
        if hit is not None:
            table, addr, pte = hit
            set_entry(task, table, pte_index(addr), 0)
            if flush:
                flush_tlb_page(k, task, addr)
            k.frames.put_page(entry_pfn(pte))
            mm.rss -= 1
        yield


def change_protection(
    k: MemKernel, task: MemTask, mm: MM, start: int, end: int, write: bool
) -> Generator[None, None, None]:
    """mprotect's PTE pass: write-enable pages this mm owns alone, or write-protect all."""
    for hit in _present_ptes(task, mm, start, end):
        if hit is not None:
            table, addr, pte = hit
            exclusive = k.frames.page_count(entry_pfn(pte)) == 1
            new = pte_mkwrite(pte) if write and exclusive else pte_wrprotect(pte)
            if new == pte:
                continue
            set_entry(task, table, pte_index(addr), new)
            flush_tlb_page(k, task, addr)
        yield


def free_pgd_range(
    k: MemKernel, task: MemTask, mm: MM, start: int, end: int
) -> Generator[None, None, bool]:
    """Free the page tables over [start, end) that no VMA needs any more; True if any."""
    return (yield from _free_tables(k, task, mm, mm.pgd, 4, 0, start, min(end, TASK_SIZE)))


def _free_tables(
    k: MemKernel, task: MemTask, mm: MM, table: int, level: int, base: int, start: int, end: int
) -> Generator[None, None, bool]:
    size = LEVEL_ENTRY_SIZE[level]
    first = (max(start, base) - base) // size
    last = min((end - 1 - base) // size, PTRS_PER_TABLE - 1)
    freed = False
    index = first - 1
    while index < last:
        read, entry = scan_entries(task, table, index + 1, last - index)
        index += read
        if not entry_present(entry):
            continue
        region = base + index * size
        child = entry_pfn(entry)
        if level > 2:
            freed |= yield from _free_tables(k, task, mm, child, level - 1, region, start, end)
        if mm.intersects(region, region + size):
            continue
        set_entry(task, table, index, 0)
        k.frames.put_page(child)
        k.counters["pt_pages_freed"] += 1
        freed = True
        yield
    return freed


def copy_page_range(
    k: MemKernel, task: MemTask, parent: MM, child: MM, vma: VMA
) -> Generator[None, None, bool]:
    """fork's copy of one VMA: share every page, both sides read-only where writable.

    Returns whether a parent PTE was write-protected (the parent's TLB needs a flush).
    """
    cow = bool(vma.flags & VM_WRITE)
    wrprotected = False
    for hit in _present_ptes(task, parent, vma.start, vma.end):
        if hit is not None:
            table, addr, pte = hit
            if cow and pte_write(pte):
                pte = pte_wrprotect(pte)
                set_entry(task, table, pte_index(addr), pte)
                wrprotected = True
                yield
            child_table = yield from pte_table_alloc(k, task, child, addr)
            set_entry(task, child_table, pte_index(addr), pte & ~pg.PT_ACCESSED_MASK)
            k.frames.get_page(entry_pfn(pte))
            child.rss += 1
        yield
    return wrprotected


def replace_pte_table(k: MemKernel, task: MemTask, addr: int) -> Generator[None, None, bool]:
    """Move addr's PTE table to a new frame and repoint its pmd (page-table migration).

    The pmd is rewritten with a new non-zero value, which the shadow MMU must handle as a
    changed directory entry; the old table frame is freed after a full flush.
    """
    mm = task.mm
    pmd_table = lookup_table(task, mm, addr, 2)
    if pmd_table is None:
        return False
    index = LEVEL_INDEX[2](addr)
    pmd = read_entry(task, pmd_table, index)
    if not entry_present(pmd):
        return False
    new = k.frames.alloc()
    task.vcpu.copy_page(pfn_to_virt(new), pfn_to_virt(entry_pfn(pmd)))
    yield
    set_entry(task, pmd_table, index, mk_table_entry(new))
    yield
    flush_tlb_local(k, task)
    k.frames.put_page(entry_pfn(pmd))
    yield
    return True


def exit_mmap(k: MemKernel, task: MemTask, mm: MM) -> Generator[None, None, None]:
    """Tear down an address space no vCPU has loaded: pages, tables, then the pgd."""
    for vma in mm.vmas:
        yield from zap_pte_range(k, task, mm, vma.start, vma.end, flush=False)
    mm.vmas.clear()
    mm.expected.clear()
    yield from free_pgd_range(k, task, mm, 0, TASK_SIZE)
    k.frames.put_page(mm.pgd)
