"""Shadow PTE encoding (legacy shadow paging, the v5.16 layout of arch/x86/kvm/mmu/spte.h).

Hardware bits are the x86 ones (P, R/W, U/S, A, D, PS, NX). The simulated host is a 46-bit
CPU (MAXPHYADDR 46, like the guest) that is vulnerable to L1TF, with A/D bits in its page
tables: the processor sets A (and D on a write) in a leaf spte it walks (vcpu.py). KVM's
software bits:

    bit  9  SPTE_HOST_WRITEABLE   the host mapping of the frame is writable
    bit 10  SPTE_MMU_WRITEABLE    the MMU may make this spte writable (no write protection)
    bit 11  SPTE_MMU_PRESENT      a shadow-present spte (never set in MMIO sptes)

Invariant: W ⇒ MMU-writable ⇒ Host-writable (checked by the audit's spte_bits check).
Dirty logging clears only W, so it can be undone locklessly (the fast page fault); write
protection of guest page tables clears W and MMU-writable together.

MMIO sptes: value = mask = BIT(51) | P, so any access faults with RSVD set. They hold
ACC_WRITE|ACC_USER in bits 1–2, a 19-bit memslot generation (gen bits 0–7 in spte bits 3–10,
gen bits 8–18 in spte bits 52–62) and the gpa, with the L1TF mitigation of
kvm_mmu_reset_all_pte_masks()/make_mmio_spte(): the top SHADOW_NONPRESENT_OR_RSVD_MASK_LEN bits
of the cache's physical-address width (41–45) are always set, so a speculative L1D access
through the non-present spte can only reach uncacheable addresses, and the gpa bits they hide
move 5 bits up (46–50). Update the layout checks at the end of this module together with any
bit you move.

Non-leaf sptes point at a child shadow page: its pool index is encoded as a host frame in
the SPT_PFN_BASE region, so `spte_to_pfn` works for both kinds, as in the kernel. Every host
frame (guest RAM backings below, shadow pages above) lies below MAXPHYADDR: an MMU-present
spte never has a reserved bit set (mmio.py checks that on every level, as get_mmio_spte()).
"""

from __future__ import annotations

import numpy as np

from mmud.kvm.memslot import BACKING_PFN_SHIFT, MAX_BACKINGS
from mmud.x86.paging import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    MAXPHYADDR,
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

# L1TF (kvm_mmu_reset_all_pte_masks): the host's x86_cache_bits is its MAXPHYADDR.
SHADOW_PHYS_BITS = MAXPHYADDR
SHADOW_NONPRESENT_OR_RSVD_MASK_LEN = 5
_LOW_PHYS_BITS = SHADOW_PHYS_BITS - SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
SHADOW_NONPRESENT_OR_RSVD_MASK = ((1 << SHADOW_PHYS_BITS) - 1) & ~((1 << _LOW_PHYS_BITS) - 1)
SHADOW_NONPRESENT_OR_RSVD_LOWER_GFN_MASK = ((1 << _LOW_PHYS_BITS) - 1) & ~((1 << PAGE_SHIFT) - 1)
# Where an MMIO spte keeps gpa bits: the low ones in place, the hidden ones 5 bits up.
MMIO_GPA_BITS = SHADOW_NONPRESENT_OR_RSVD_LOWER_GFN_MASK | (
    SHADOW_NONPRESENT_OR_RSVD_MASK << SHADOW_NONPRESENT_OR_RSVD_MASK_LEN)

# Host frames of shadow pages: pool index i lives at pfn SPT_PFN_BASE + i, the top half of
# the 46-bit physical address space. Guest RAM frames are below it (memslot backings, see
# memslot.py).
SPT_PFN_BASE = 1 << (SHADOW_PHYS_BITS - 1 - PAGE_SHIFT)

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


def spte_child_indices(sptes: np.ndarray) -> np.ndarray:
    """spte_child_index() of each of an array of non-leaf sptes, as int64."""
    addr = sptes & np.uint64(SPTE_BASE_ADDR_MASK)
    return (addr >> np.uint64(PAGE_SHIFT)).view(np.int64) - SPT_PFN_BASE


def make_nonleaf_spte(child_index: int) -> int:
    return ((SPT_PFN_BASE + child_index) << PAGE_SHIFT) | _NONLEAF_BITS


def make_leaf_spte(pfn: int, pte_access: int, level: int, host_writable: bool, accessed: bool) -> int:
    """A present leaf spte for `pte_access` (uwx), without W (the caller, make_spte, adds W
    and D). A prefetched spte starts without A: the processor sets it on first use."""
    spte = PT_PRESENT_MASK | SPTE_MMU_PRESENT | (pfn << PAGE_SHIFT)
    if accessed:
        spte |= PT_ACCESSED_MASK
    if not pte_access & ACC_EXEC_MASK:
        spte |= PT64_NX_MASK
    if pte_access & ACC_USER_MASK:
        spte |= PT_USER_MASK
    if level > 1:
        spte |= PT_PAGE_SIZE_MASK
    if host_writable:
        spte |= SPTE_HOST_WRITEABLE
    return spte


def spte_can_locklessly_be_made_writable(spte: int) -> bool:
    """Host- and MMU-writable: only dirty logging keeps W clear (v5.16 spte.h)."""
    return spte & (SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE) == SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE


def spte_update_needs_flush(old: int, new: int) -> bool:
    """mmu_spte_update() (v5.16): overwriting a present spte needs a remote TLB flush when a
    writable-capable spte loses W, or when A or D is cleared."""
    if not old & SPTE_MMU_PRESENT:
        return False
    if spte_can_locklessly_be_made_writable(old) and not new & PT_WRITABLE_MASK:
        return True
    return bool(old & ~new & (PT_ACCESSED_MASK | PT_DIRTY_MASK))


def spte_access(spte: int) -> int:
    """The uwx rights a present leaf spte grants."""
    access = spte & (PT_WRITABLE_MASK | PT_USER_MASK)
    if not spte & PT64_NX_MASK:
        access |= ACC_EXEC_MASK
    return access


# --- MMIO sptes ---------------------------------------------------------------------------

def make_mmio_spte(gfn: int, access: int, gen: int) -> int:
    gen &= MMIO_SPTE_GEN_MASK
    gpa = gfn << PAGE_SHIFT
    spte = SHADOW_MMIO_VALUE | (access & SHADOW_MMIO_ACCESS_MASK)
    spte |= (gen & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)) << MMIO_SPTE_GEN_LOW_SHIFT
    spte |= (gen >> MMIO_SPTE_GEN_LOW_BITS) << MMIO_SPTE_GEN_HIGH_SHIFT
    spte |= gpa | SHADOW_NONPRESENT_OR_RSVD_MASK
    spte |= (gpa & SHADOW_NONPRESENT_OR_RSVD_MASK) << SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
    return spte


def get_mmio_spte_gfn(spte: int) -> int:
    gpa = spte & SHADOW_NONPRESENT_OR_RSVD_LOWER_GFN_MASK
    gpa |= (spte >> SHADOW_NONPRESENT_OR_RSVD_MASK_LEN) & SHADOW_NONPRESENT_OR_RSVD_MASK
    return gpa >> PAGE_SHIFT


def get_mmio_spte_access(spte: int) -> int:
    return spte & SHADOW_MMIO_ACCESS_MASK


def get_mmio_spte_generation(spte: int) -> int:
    low = (spte >> MMIO_SPTE_GEN_LOW_SHIFT) & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = (spte >> MMIO_SPTE_GEN_HIGH_SHIFT) & ((1 << MMIO_SPTE_GEN_HIGH_BITS) - 1)
    return low | (high << MMIO_SPTE_GEN_LOW_BITS)


# --- layout checks (the kernel's static asserts) ------------------------------------------
_SOFTWARE_BITS = SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE | SPTE_MMU_PRESENT
assert not _SOFTWARE_BITS & (SPTE_BASE_ADDR_MASK | PT_PAGE_SIZE_MASK | PT_DIRTY_MASK)
_MMIO_FIELDS = (SHADOW_MMIO_MASK, MMIO_GPA_BITS, SHADOW_NONPRESENT_OR_RSVD_MASK, SHADOW_MMIO_ACCESS_MASK,
                _MMIO_GEN_LOW_SPTE, _MMIO_GEN_HIGH_SPTE)
assert all(not a & b for k, a in enumerate(_MMIO_FIELDS) for b in _MMIO_FIELDS[k + 1:])
assert not SPTE_MMU_PRESENT & SHADOW_MMIO_VALUE
assert not SHADOW_MMIO_VALUE & SHADOW_NONPRESENT_OR_RSVD_MASK << SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
# Shadow-page frames lie below MAXPHYADDR (no reserved bit in a non-leaf spte) and never look
# like MMIO.
assert (SPT_PFN_BASE << PAGE_SHIFT) < (1 << SHADOW_PHYS_BITS) < SHADOW_MMIO_VALUE
assert MAX_BACKINGS << BACKING_PFN_SHIFT <= SPT_PFN_BASE  # RAM frames below shadow-page frames
