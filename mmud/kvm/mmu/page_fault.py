"""kvm_mmu_page_fault(): a #PF VM exit enters the shadow MMU here.

The lockless paths first — the fast path for a write fault on an spte write-protected
only for dirty logging (fast_pf.py), the MMIO path for a reserved-bit fault (mmio.py: v5.16's
handle_mmio_page_fault walks the shadow tables locklessly too) — then, under the MMU lock,
the shadow page fault (paging_tmpl.py). This module is the top of the
package: it dispatches to the paths and nothing below imports it.
"""

from __future__ import annotations

from mmud.kvm.mmu import fast_pf, mmio, paging_tmpl
from mmud.kvm.mmu.mmu import RET_PF_EMULATE, RET_PF_INVALID, RET_PF_RETRY
from mmud.kvm.mmu.vcpu_mmu import VcpuMmu
from mmud.x86.paging import PFERR_RSVD_MASK


def kvm_mmu_page_fault(vmmu: VcpuMmu, gva: int, error_code: int) -> int:
    """A #PF exit: RET_PF_RETRY (fixed, retry the access), RET_PF_EMULATE, or the #PF
    injected into the guest (the vCPU's `injected`).

    The statistics follow v5.19's kvm_mmu_do_page_fault(), which every fault but one
    answered by handle_mmio_page_fault() goes through: pf_taken for each, pf_emulate when it
    ends in emulation (pf_fast and pf_spurious: fast_pf.py; pf_fixed keeps v5.16's meaning,
    counted in FNAME(fetch)). An RSVD fault on a current MMIO spte goes straight to
    emulation and counts in neither, as in the kernel.
    """
    mmu = vmmu.kvm_mmu
    stat = vmmu.stat
    if mmu.obs: mmu.obs.page_fault(vmmu.vcpu.index)  # observer
    rsvd = error_code & PFERR_RSVD_MASK
    if not rsvd:
        stat["pf_taken"] += 1
        if fast_pf.page_fault_can_be_fast(error_code) and fast_pf.fast_page_fault(vmmu, gva, error_code):
            return RET_PF_RETRY
    r = RET_PF_INVALID
    if rsvd:  # lockless, as the fast path: walk_shadow_page_lockless_begin()
        r = mmio.handle_mmio_page_fault(mmu, vmmu, gva)
        if r == RET_PF_INVALID:  # a stale MMIO spte: the normal fault re-resolves the gfn
            stat["pf_taken"] += 1
    if r == RET_PF_INVALID:
        vmmu.vcpu.lock_mmu()
        r = paging_tmpl.page_fault(mmu, vmmu, gva, error_code)
        if r == RET_PF_EMULATE:
            stat["pf_emulate"] += 1
    return r
