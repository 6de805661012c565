"""The guest kernel's view of x86-64 page-table entries (Linux arch/x86/include/asm/pgtable*.h).

Only what the guest kernel model writes into its tables lives here: the direct-map base, the
entry flag sets it composes, the per-level index helpers and the entry predicates. The bit
values themselves come from the architecture layer, so there is one definition of each bit.
"""

from __future__ import annotations

from mmud.x86 import paging as pg

PAGE_SHIFT = pg.PAGE_SHIFT
PAGE_SIZE = pg.PAGE_SIZE
PTRS_PER_TABLE = pg.PT64_ENT_PER_PAGE

# Linux PAGE_OFFSET without KASLR: every guest frame is mapped at PAGE_OFFSET + its gpa.
PAGE_OFFSET = 0xFFFF888000000000
PMD_SIZE = 1 << 21
PUD_SIZE = 1 << 30
PGDIR_SIZE = 1 << 39
# First pgd slot of the kernel half: pgds share entries from here on (pgd_ctor).
KERNEL_PGD_BOUNDARY = PTRS_PER_TABLE // 2

_PAGE_PRESENT = pg.PT_PRESENT_MASK
_PAGE_RW = pg.PT_WRITABLE_MASK
_PAGE_USER = pg.PT_USER_MASK
_PAGE_ACCESSED = pg.PT_ACCESSED_MASK
_PAGE_DIRTY = pg.PT_DIRTY_MASK
_PAGE_PSE = pg.PT_PAGE_SIZE_MASK
_PAGE_NX = pg.PT64_NX_MASK
# Bits the MMU sets behind the kernel's back; comparisons of entries ignore them.
_PAGE_HW_AD = _PAGE_ACCESSED | _PAGE_DIRTY
PTE_PFN_MASK = pg.PT64_BASE_ADDR_MASK

# Upper-level entries of user tables carry every right (the leaf decides), and A preset as
# Linux's _PAGE_TABLE does, so the MMU never has to set it.
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
_KERNPG_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY
# Direct-map 2 MiB leaves: supervisor read/write, never executable (__PAGE_KERNEL_LARGE
# without the global bit: this guest has no global pages).
_PAGE_KERNEL_LARGE = _KERNPG_TABLE | _PAGE_PSE | _PAGE_NX


def pfn_to_virt(pfn: int) -> int:
    """Direct-map virtual address of a guest frame (Linux __va(PFN_PHYS(pfn)))."""
    return PAGE_OFFSET + (pfn << PAGE_SHIFT)


def pgd_index(addr: int) -> int:
    return pg.pt_index(addr, 4)


def pud_index(addr: int) -> int:
    return pg.pt_index(addr, 3)


def pmd_index(addr: int) -> int:
    return pg.pt_index(addr, 2)


def pte_index(addr: int) -> int:
    return pg.pt_index(addr, 1)


# Index functions by table level (4 = pgd ... 1 = pte), for walks that loop over levels.
LEVEL_INDEX = {4: pgd_index, 3: pud_index, 2: pmd_index, 1: pte_index}
# Bytes of address space one entry of a table at this level covers.
LEVEL_ENTRY_SIZE = {4: PGDIR_SIZE, 3: PUD_SIZE, 2: PMD_SIZE, 1: PAGE_SIZE}


def entry_present(entry: int) -> bool:
    return bool(entry & _PAGE_PRESENT)


def entry_pfn(entry: int) -> int:
    return (entry & PTE_PFN_MASK) >> PAGE_SHIFT


def mk_table_entry(pfn: int) -> int:
    """Entry pointing at a user page-table page (pgd/pud/pmd populate)."""
    return (pfn << PAGE_SHIFT) | _PAGE_TABLE


def mk_pte(pfn: int, *, write: bool, exec_: bool) -> int:
    """A present user PTE; A/D are left to the MMU."""
    entry = (pfn << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_USER
    if write:
        entry |= _PAGE_RW
    if not exec_:
        entry |= _PAGE_NX
    return entry


def pte_write(entry: int) -> bool:
    return bool(entry & _PAGE_RW)


def pte_wrprotect(entry: int) -> int:
    return entry & ~_PAGE_RW


def pte_mkwrite(entry: int) -> int:
    return entry | _PAGE_RW


def pte_same(a: int, b: int) -> bool:
    """Equal but for the accessed/dirty bits the MMU may have set meanwhile."""
    return (a ^ b) & ~_PAGE_HW_AD == 0
