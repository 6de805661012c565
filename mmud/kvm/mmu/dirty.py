"""Dirty logging's side of the shadow MMU: write-protecting a slot when logging starts.

With KVM_MEM_LOG_DIRTY_PAGES set, a guest write must fault (and mark the page dirty) at
least once per harvest, so enabling logging clears W in every spte of the slot. Only W:
MMU-writable stays, because these pages are not shadowed page tables and may be made
writable again by the next write fault (kvm_mmu_slot_remove_write_access, ≈v5.6).
"""

from __future__ import annotations

from mmud.kvm.memslot import Memslot
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.x86.paging import PT64_ENT_PER_PAGE, PT_WRITABLE_MASK


def kvm_mmu_slot_remove_write_access(mmu: KvmMmu, slot: Memslot) -> None:
    flush = False
    for rmap in slot.rmap.values():
        for sptep in rmap:
            spt = mmu.sp_of_sptep(sptep).spt
            i = sptep & (PT64_ENT_PER_PAGE - 1)
            if spt[i] & PT_WRITABLE_MASK:
                spt[i] &= ~PT_WRITABLE_MASK
                flush = True
    if flush:
        mmu.kvm_flush_remote_tlbs()
