"""Shadow PTE encoding (legacy shadow paging, the ≈v5.16 layout of arch/x86/kvm/mmu/spte.h).

Hardware bits are the x86 ones (P, R/W, U/S, A, D, PS, NX). KVM's software bits:

    bit  9  SPTE_HOST_WRITEABLE   the host mapping of the frame is writable
    bit 10  SPTE_MMU_WRITEABLE    the MMU may make this spte writable (no write protection)
    bit 11  SPTE_MMU_PRESENT      a shadow-present spte (never set in MMIO sptes)

Invariant: W ⇒ MMU-writable ⇒ Host-writable (checked by the audit's spte_bits check).
Dirty logging clears only W, so it can be undone locklessly (the fast page fault); write
protection of guest page tables clears W and MMU-writable together.

MMIO sptes: value = mask = BIT(51) | P, so any access faults with RSVD set. They hold the gfn
in the address bits, ACC_WRITE|ACC_USER in bits 1–2 and a 19-bit memslot generation: gen bits
0–7 in spte bits 3–10, gen bits 8–18 in spte bits 52–62. Update the layout checks at the end
of this module together with any bit you move.

Non-leaf sptes point at a child shadow page: its pool index is encoded as a host frame in
the SPT_PFN_BASE region, so `spte_to_pfn` works for both kinds, as in the kernel.
"""

from __future__ import annotations

from mmud.x86.paging import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PAGE_SHIFT,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
)

SPTE_HOST_WRITEABLE = 1 << 9
SPTE_MMU_WRITEABLE = 1 << 10
SPTE_MMU_PRESENT = 1 << 11
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)
SPTE_PERM_MASK = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK | PT64_NX_MASK

SHADOW_MMIO_VALUE = (1 << 51) | PT_PRESENT_MASK
SHADOW_MMIO_MASK = SHADOW_MMIO_VALUE
SHADOW_MMIO_ACCESS_MASK = ACC_WRITE_MASK | ACC_USER_MASK
MMIO_SPTE_GEN_LOW_SHIFT = 3
MMIO_SPTE_GEN_LOW_BITS = 8
MMIO_SPTE_GEN_HIGH_SHIFT = 52
MMIO_SPTE_GEN_HIGH_BITS = 11
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1
_MMIO_GEN_LOW_SPTE = ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_SHIFT
_MMIO_GEN_HIGH_SPTE = ((1 << MMIO_SPTE_GEN_HIGH_BITS) - 1) << MMIO_SPTE_GEN_HIGH_SHIFT
MMIO_GFN_MASK = ((1 << 51) - 1) & ~((1 << PAGE_SHIFT) - 1)

# Host frames of shadow pages: pool index i lives at pfn SPT_PFN_BASE + i. Guest RAM frames
# are below it (memslot backings, see memslot.py), MMIO bit 51 is above it.
SPT_PFN_BASE = 1 << 38

# A non-leaf spte grants everything; restrictions live in the leaves (link_shadow_page).
_NONLEAF_BITS = (
    PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK | PT_ACCESSED_MASK | SPTE_MMU_PRESENT
)


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT)


def is_mmio_spte(spte: int) -> bool:
    return spte & SHADOW_MMIO_MASK == SHADOW_MMIO_VALUE


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == 1 or bool(spte & PT_PAGE_SIZE_MASK)


def is_mmu_writable_spte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_WRITEABLE)


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def spte_child_index(spte: int) -> int:
    """Pool index of the shadow page a non-leaf spte points at."""
    return ((spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT) - SPT_PFN_BASE


def make_nonleaf_spte(child_index: int) -> int:
    return ((SPT_PFN_BASE + child_index) << PAGE_SHIFT) | _NONLEAF_BITS


def make_leaf_spte(pfn: int, pte_access: int, level: int, host_writable: bool) -> int:
    """A present leaf spte for `pte_access` (uwx). W is added by the caller (set_spte)."""
    spte = PT_PRESENT_MASK | PT_ACCESSED_MASK | SPTE_MMU_PRESENT | (pfn << PAGE_SHIFT)
    if not pte_access & ACC_EXEC_MASK:
        spte |= PT64_NX_MASK
    if pte_access & ACC_USER_MASK:
        spte |= PT_USER_MASK
    if level > 1:
        spte |= PT_PAGE_SIZE_MASK
    if host_writable:
        spte |= SPTE_HOST_WRITEABLE
    return spte


def spte_access(spte: int) -> int:
    """The uwx rights a present leaf spte grants."""
    access = spte & (PT_WRITABLE_MASK | PT_USER_MASK)
    if not spte & PT64_NX_MASK:
        access |= ACC_EXEC_MASK
    return access


# --- MMIO sptes ---------------------------------------------------------------------------

def make_mmio_spte(gfn: int, access: int, gen: int) -> int:
    gen &= MMIO_SPTE_GEN_MASK
    spte = SHADOW_MMIO_VALUE | (gfn << PAGE_SHIFT) | (access & SHADOW_MMIO_ACCESS_MASK)
    spte |= (gen & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)) << MMIO_SPTE_GEN_LOW_SHIFT
    spte |= (gen >> MMIO_SPTE_GEN_LOW_BITS) << MMIO_SPTE_GEN_HIGH_SHIFT
    return spte


def get_mmio_spte_gfn(spte: int) -> int:
    return (spte & MMIO_GFN_MASK) >> PAGE_SHIFT


def get_mmio_spte_access(spte: int) -> int:
    return spte & SHADOW_MMIO_ACCESS_MASK


def get_mmio_spte_generation(spte: int) -> int:
    low = (spte >> MMIO_SPTE_GEN_LOW_SHIFT) & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = (spte >> MMIO_SPTE_GEN_HIGH_SHIFT) & ((1 << MMIO_SPTE_GEN_HIGH_BITS) - 1)
    return low | (high << MMIO_SPTE_GEN_LOW_BITS)


# --- layout checks (the kernel's static asserts) ------------------------------------------
_SOFTWARE_BITS = SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE | SPTE_MMU_PRESENT
assert not _SOFTWARE_BITS & (SPTE_BASE_ADDR_MASK | PT_PAGE_SIZE_MASK | PT_DIRTY_MASK)
assert not _MMIO_GEN_LOW_SPTE & (SHADOW_MMIO_MASK | MMIO_GFN_MASK | SHADOW_MMIO_ACCESS_MASK)
assert not _MMIO_GEN_HIGH_SPTE & (SHADOW_MMIO_MASK | MMIO_GFN_MASK)
assert not SPTE_MMU_PRESENT & SHADOW_MMIO_VALUE
assert (SPT_PFN_BASE << PAGE_SHIFT) < (1 << 51)  # shadow-page frames never look like MMIO
