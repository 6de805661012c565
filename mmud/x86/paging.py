"""x86-64 4-level paging: entry bits, reserved bits, error codes and permission rules.

Architecture facts only (Intel SDM Vol. 3A ch. 4, AMD APM Vol. 2 ch. 5); no KVM policy lives
here. The simulated guest has MAXPHYADDR 46, 2 MiB pages and no 1 GiB pages (CPUID
Page1GB clear), so PDPTE.PS is reserved.
"""

from __future__ import annotations

import functools

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)  # the page-frame bits of an address (the kernel's PAGE_MASK)
PT64_ENT_PER_PAGE = 512
PT64_LEVEL_BITS = 9
PT64_ROOT_4LEVEL = 4
MAXPHYADDR = 46

# Paging-structure entry bits (the guest's gptes; sptes reuse the hardware ones).
PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_USER_MASK = 1 << 2
PT_PWT_MASK = 1 << 3
PT_PCD_MASK = 1 << 4
PT_ACCESSED_MASK = 1 << 5
PT_DIRTY_MASK = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7
PT_PAT_MASK = 1 << 7  # in a 4 KiB PTE bit 7 is PAT, not PS
PT_GLOBAL_MASK = 1 << 8
PT64_NX_MASK = 1 << 63

# Address field of a 4 KiB-aligned entry for this MAXPHYADDR.
PT64_BASE_ADDR_MASK = ((1 << MAXPHYADDR) - 1) & ~(PAGE_SIZE - 1)
PT64_LVL2_LARGE_ADDR_MASK = ((1 << MAXPHYADDR) - 1) & ~((1 << 21) - 1)

# Reserved bits of present entries (docs/x86-paging.md §4). Bits 51:MAXPHYADDR everywhere;
# bit 63 too when EFER.NXE=0 (added by rsvd_bits()).
_RSVD_ABOVE_MAXPHY = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)
RSVD_PML4E = _RSVD_ABOVE_MAXPHY | PT_PAGE_SIZE_MASK
RSVD_PDPTE = _RSVD_ABOVE_MAXPHY | PT_PAGE_SIZE_MASK  # no 1 GiB pages
RSVD_PDE_TABLE = _RSVD_ABOVE_MAXPHY
RSVD_PDE_2M = _RSVD_ABOVE_MAXPHY | (((1 << 21) - 1) & ~((1 << 13) - 1))  # bits 20:13
RSVD_PTE = _RSVD_ABOVE_MAXPHY

# Control-register bits.
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
MSR_EFER = 0xC0000080  # the MSR that holds EFER (WRMSR with ECX = MSR_EFER)
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
X86_EFLAGS_FIXED = 1 << 1
X86_EFLAGS_AC = 1 << 18
CR3_ADDR_MASK = PT64_BASE_ADDR_MASK

# Page-fault error code (docs/x86-paging.md §6).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_PK_MASK = 1 << 5

# KVM's access encoding (uwx, exec positive), shared by the walker and the shadow MMU.
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = 2
ACC_USER_MASK = 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK


# By level (1 = PT ... 5): the shift of a linear address's index in that level's table; the
# hot walks index this tuple instead of calling pt_index().
PT_INDEX_SHIFT = tuple(PAGE_SHIFT + (level - 1) * PT64_LEVEL_BITS for level in range(6))


def pt_index(addr: int, level: int) -> int:
    """Index of `addr` in the table of `level` (1 = PT ... 4 = PML4)."""
    return (addr >> PT_INDEX_SHIFT[level]) & (PT64_ENT_PER_PAGE - 1)


def is_canonical(addr: int) -> bool:
    """Bits 63:47 all equal (48-bit linear addresses)."""
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


def rsvd_bits(level: int, large: bool, nxe: bool) -> int:
    """Reserved-bit mask of a present entry at `level` (large = PS set at level 2)."""
    if level == 4:
        mask = RSVD_PML4E
    elif level == 3:
        mask = RSVD_PDPTE
    elif level == 2:
        mask = RSVD_PDE_2M if large else RSVD_PDE_TABLE
    else:
        mask = RSVD_PTE
    return mask if nxe else mask | PT64_NX_MASK


def gpte_access(gpte: int, nxe: bool) -> int:
    """The uwx rights one entry grants (exec is denied only by XD with NXE on)."""
    access = gpte & (PT_WRITABLE_MASK | PT_USER_MASK)  # same bit positions as ACC_*
    if not (nxe and gpte & PT64_NX_MASK):
        access |= ACC_EXEC_MASK
    return access


@functools.cache
def rsvd_table(nxe: bool) -> tuple[int, ...]:
    """rsvd_bits() for every (level, large) as one tuple, indexed by level * 2 + large."""
    return tuple(rsvd_bits(k >> 1, bool(k & 1), nxe) if k >= 2 else 0 for k in range(10))


@functools.cache
def permission_table(cr0_wp: bool, smep: bool, smap: bool, ac: bool) -> tuple[int, ...]:
    """KVM's mmu->permissions[]: for each access kind (write | user << 1 | fetch << 2) a
    bitmap over the uwx rights (0-7), bit set = that access with those rights faults."""
    table = []
    for kind in range(8):
        write, user, fetch = bool(kind & 1), bool(kind & 2), bool(kind & 4)
        faults = 0
        for access in range(8):
            if permission_fault(access, write=write, fetch=fetch, user=user,
                                cr0_wp=cr0_wp, smep=smep, smap=smap, ac=ac):
                faults |= 1 << access
        table.append(faults)
    return tuple(table)


def permission_fault(
    pte_access: int,
    *,
    write: bool,
    fetch: bool,
    user: bool,
    cr0_wp: bool,
    smep: bool,
    smap: bool,
    ac: bool,
) -> bool:
    """Whether an access with these effective uwx rights faults (docs/x86-paging.md §5).

    CR0.WP=0 relaxes supervisor writes only; SMEP forbids supervisor fetches from user
    addresses; SMAP forbids supervisor data accesses to user addresses unless RFLAGS.AC.
    """
    user_page = bool(pte_access & ACC_USER_MASK)
    if user:
        if not user_page:
            return True
        if write and not pte_access & ACC_WRITE_MASK:
            return True
        return fetch and not pte_access & ACC_EXEC_MASK
    if fetch:
        return not pte_access & ACC_EXEC_MASK or (smep and user_page)
    if smap and user_page and not ac:
        return True
    return write and cr0_wp and not pte_access & ACC_WRITE_MASK
