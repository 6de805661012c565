"""The fast page fault: a write to an spte write-protected only for dirty logging.

fast_page_fault() (mmu.c): a fault with P=1 and W=1 on a present spte that has
MMU-writable but not W was caused by dirty-log protection alone, so it is fixed without
the MMU lock: compare-and-exchange W into the spte, then mark_page_dirty(). In the kernel
this serves the direct-map MMUs; mmud applies it to the shadow MMU's leaf sptes, where
MMU-writable means the same thing (rmap_write_protect clears it for shadowed tables).

Between the compare-and-exchange and mark_page_dirty sits a preemption point
(`Kvm.preempt`): a harvest may run there. It is safe because the harvest takes its
snapshot before it write-protects: a snapshot that misses the late bit is followed by a
protection that makes the spte read-only again, and the bit is reported next time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import RET_PF_FIXED, RET_PF_INVALID, RET_PF_SPURIOUS
from mmud.x86.paging import (
    PAGE_SHIFT,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_WRITE_MASK,
    PT64_ENT_PER_PAGE,
    PT_INDEX_SHIFT,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
)

if TYPE_CHECKING:
    from mmud.kvm.mmu.page import ShadowPage
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

_MMU_PRESENT = S.SPTE_MMU_PRESENT
_ADDR = S.SPTE_BASE_ADDR_MASK
_SPT_PFN_BASE = S.SPT_PFN_BASE
_FAST_ERROR = PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_RSVD_MASK
_WANT = PFERR_PRESENT_MASK | PFERR_WRITE_MASK


def page_fault_can_be_fast(error_code: int) -> bool:
    """Only a write to a present, non-MMIO spte can be a dirty-logging fault."""
    return error_code & _FAST_ERROR == _WANT


def fast_page_fault(vmmu: VcpuMmu, gva: int, error_code: int) -> bool:
    """Fix a dirty-logging write fault locklessly; True if the access may be retried.

    The last spte of gva's shadow walk is looked at (fast_pf_get_last_sptep); the outcome is
    RET_PF_FIXED, RET_PF_SPURIOUS or RET_PF_INVALID (take the slow path), which the
    fast_page_fault tracepoint reports with the spte before and after.
    """
    mmu = vmmu.kvm_mmu
    sp = None
    i = old = 0
    ret = RET_PF_INVALID
    if vmmu.root is not None:
        sp, i, old = fast_pf_get_last_sptep(vmmu.root, mmu.pool.pages, gva)
        if old & S.SPTE_MMU_PRESENT:
            ret = _fix_spte(vmmu, sp, i, old, error_code)
    if mmu.obs: mmu.obs.fast_page_fault(vmmu.vcpu.index, gva, error_code, sp, i, old, ret)  # observer
    return ret != RET_PF_INVALID


def fast_pf_get_last_sptep(
    root: ShadowPage, pages: list[ShadowPage], gva: int
) -> tuple[ShadowPage, int, int]:
    """fast_pf_get_last_sptep(): the last (sp, index, spte) of gva's lockless shadow walk
    from root (`pages`: the pool's), the first spte that is not MMU-present or a leaf.

    It is the last step of KvmMmu.shadow_walk, taken in one loop, without the generator
    and with pt_index, is_last_spte and spte_child_index written out: every
    dirty-logging write fault walks here."""
    sp = root
    while True:
        level = sp.level
        i = (gva >> PT_INDEX_SHIFT[level]) & (PT64_ENT_PER_PAGE - 1)
        spte = sp.spt[i]
        if not spte & _MMU_PRESENT or level == 1 or spte & PT_PAGE_SIZE_MASK:
            return sp, i, spte
        sp = pages[((spte & _ADDR) >> PAGE_SHIFT) - _SPT_PFN_BASE]


def _fix_spte(vmmu: VcpuMmu, sp: ShadowPage, i: int, old: int, error_code: int) -> int:
    """The fast path proper on a present last-level spte.

    The fault is only dirty logging's if adding W lets the faulting access through the spte
    (it is not a U/S or NX fault as well). pf_fast counts what the fast path answers, fixed
    (RET_PF_FIXED) or spurious (RET_PF_SPURIOUS, also pf_spurious), as v5.19 counts them.
    """
    if old & PT_WRITABLE_MASK:
        if not vmmu.hw_allows(old, error_code):
            return RET_PF_INVALID
        # RET_PF_SPURIOUS: another vCPU fixed it first (or the TLB was flushed lazily); the
        # access would now go through. v5.19 counts it as fast and as spurious.
        vmmu.stat["pf_fast"] += 1
        vmmu.stat["pf_spurious"] += 1
        return RET_PF_SPURIOUS
    if not S.is_mmu_writable_spte(old) or not vmmu.hw_allows(old | PT_WRITABLE_MASK, error_code):
        return RET_PF_INVALID
    # cmpxchg64(sptep, old, old | W): nothing runs between the read and this store (the
    # preemption points are explicit), so the exchange always succeeds here.
    sp.spt[i] = old | PT_WRITABLE_MASK
    vmmu.stat["pf_fast"] += 1
    gfn = sp.gfn_of(i)
    vmmu.fast_pf_gfn = gfn
    vmmu.vcpu.preempt()  # the window between making the spte writable and logging the page
    vmmu.vcpu.mark_page_dirty(gfn)
    vmmu.fast_pf_gfn = None
    vmmu.fixed = (sp, i)
    return RET_PF_FIXED
