"""Unsync pages brought back in line with their guest tables: sync on flush, and INVLPG.

A level-1 guest table that is not write-tracked may go *unsync*: its sptes are made
writable and the guest edits the table without trapping. The sptes are then stale until the
guest flushes: a CR3 load (or KVM_REQ_MMU_SYNC) re-reads every unsync page reachable from the
root (`mmu_sync_children`), and INVLPG rebuilds the one spte of the address (`invlpg`).
Follows FNAME(sync_page), mmu_sync_children and FNAME(invlpg) of v5.16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmud.kvm.mmu import mmio, zap
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.audit import AUDIT_POST_SYNC, AUDIT_PRE_SYNC, kvm_mmu_audit
from mmud.kvm.mmu.mmu import KVM_PAGE_ARRAY_NR, SET_SPTE_NEED_REMOTE_TLB_FLUSH, KvmMmu
from mmud.kvm.mmu.page import ShadowPage
from mmud.x86.paging import (
    PAGE_SHIFT,
    PT64_BASE_ADDR_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PRESENT_MASK,
    ACC_WRITE_MASK,
    gpte_access,
    pt_index,
    rsvd_bits,
)

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu


def prefetch_invalid_gpte(gpte: int, nxe: bool) -> bool:
    """A gpte no spte may be built from: not present, reserved bits, or A clear."""
    if not gpte & PT_PRESENT_MASK:
        return True
    if gpte & rsvd_bits(1, False, nxe):
        return True
    return not gpte & PT_ACCESSED_MASK


def leaf_pte_access(sp_access: int, gpte: int, nxe: bool) -> int:
    """Rights of a level-1 spte: inherited & own, without W while the gpte is clean."""
    access = sp_access & gpte_access(gpte, nxe)
    if not gpte & PT_DIRTY_MASK:
        access &= ~ACC_WRITE_MASK  # FNAME(protect_clean_gpte)
    return access


def sync_page(mmu: KvmMmu, vmmu: VcpuMmu, sp: ShadowPage) -> int:
    """FNAME(sync_page): re-read all 512 gptes of an unsync sp; returns present sptes left."""
    if mmu.obs: mmu.obs.sync_page(sp)  # observer
    nxe = vmmu.nxe
    read = mmu.memslots.read_u64
    spt = sp.spt
    table = sp.gfn << PAGE_SHIFT
    nr_present = 0
    need_flush = False
    for i in sp.sptes.nonzero()[0].tolist():
        old = spt[i]
        gpte = read(table + 8 * i)
        if gpte is None or prefetch_invalid_gpte(gpte, nxe):
            zap.mmu_page_zap_pte(mmu, sp, i)
            need_flush = True
            continue
        gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
        pte_access = leaf_pte_access(sp.access, gpte, nxe)
        if mmio.sync_mmio_spte(mmu, sp, i, gfn, pte_access):
            nr_present += bool(spt[i])
            continue
        if gfn != sp.gfns[i]:
            mmu.drop_spte(sp, i)
            need_flush = True
            continue
        nr_present += 1
        host_writable = bool(old & S.SPTE_HOST_WRITEABLE)
        ret = mmu.set_spte(vmmu, sp, i, pte_access, gfn, S.spte_to_pfn(old), False, host_writable, True)
        need_flush = need_flush or bool(ret & SET_SPTE_NEED_REMOTE_TLB_FLUSH)
    if need_flush:
        mmu.kvm_flush_remote_tlbs()
    return nr_present


def resync_page(mmu: KvmMmu, vmmu: VcpuMmu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> bool:
    """Bring sp's sptes up to date; if nothing of it survives it is zapped instead (False).

    The sp keeps its unsync state: only a caller that has write-protected the gfn may mark
    it synced (mmu_sync_children, kvm_sync_pages). This is what kvm_mmu_get_page() does with
    an unsync page it finds: the sync brings the mapping up to date, and the write
    protection waits until the guest invalidates the TLB mapping.
    """
    if sync_page(mmu, vmmu, sp) == 0:
        zap.prepare_zap_page(mmu, sp, invalid_list)
        return False
    return True


def kvm_sync_page(mmu: KvmMmu, vmmu: VcpuMmu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> bool:
    """Mark a write-protected unsync sp synced and bring its sptes up to date."""
    mmu.kvm_unlink_unsync_page(sp)
    if sp.level > 1:
        # Only leaf tables may be unsync (WARN_ON in the kernel); an upper-level page has
        # no gptes sync_page could read, so it goes.
        zap.prepare_zap_page(mmu, sp, invalid_list)
        return False
    return resync_page(mmu, vmmu, sp, invalid_list)


def kvm_sync_pages(mmu: KvmMmu, vmmu: VcpuMmu, gfn: int, invalid_list: list[ShadowPage]) -> bool:
    """Sync every unsync sp of gfn (it is becoming an upper-level table)."""
    synced = False
    for sp in mmu.indirect_valid_sps_of_gfn(gfn):
        if sp.unsync:
            synced = kvm_sync_page(mmu, vmmu, sp, invalid_list) or synced
    return synced


def mmu_sync_children(mmu: KvmMmu, vmmu: VcpuMmu, parent: ShadowPage) -> None:
    """Sync every unsync page below parent, KVM_PAGE_ARRAY_NR pages per batch."""
    if mmu.obs: mmu.obs.mmu_sync_children(parent)  # observer
    if mmu.bug == "sync_skipped":
        return
    invalid_list: list[ShadowPage] = []
    flush = False
    while True:
        batch = mmu.mmu_unsync_walk(parent)[:KVM_PAGE_ARRAY_NR]
        if not batch:
            break
        protected = False
        for sp in batch:
            protected = mmu.rmap_write_protect(sp.gfn) or protected
        if protected:
            mmu.kvm_flush_remote_tlbs()
            flush = False
        for sp in batch:
            if sp.unsync and not sp.invalid:
                flush = kvm_sync_page(mmu, vmmu, sp, invalid_list) or flush
    zap.kvm_mmu_flush_or_zap(mmu, vmmu, invalid_list, False, flush)


def kvm_mmu_sync_roots(mmu: KvmMmu, vmmu: VcpuMmu) -> None:
    root = vmmu.root
    if root is None:
        return
    vmmu.clear_mmio_info_any()
    if not root.unsync and not root.unsync_children:
        return
    if mmu.audit_enabled: kvm_mmu_audit(mmu, vmmu, AUDIT_PRE_SYNC)  # audit point
    mmu_sync_children(mmu, vmmu, root)
    if mmu.audit_enabled: kvm_mmu_audit(mmu, vmmu, AUDIT_POST_SYNC)  # audit point


def invlpg_root(mmu: KvmMmu, vmmu: VcpuMmu, gva: int, root: ShadowPage) -> None:
    """FNAME(invlpg) for one root: rebuild the leaf spte of gva if its page is unsync."""
    if mmu.obs: mmu.obs.invlpg(root)  # observer
    sp = root
    level = root.level
    while True:
        i = pt_index(gva, level)
        spte = sp.spt[i]
        if S.is_last_spte(spte, level):
            if not sp.unsync:
                return
            if zap.mmu_page_zap_pte(mmu, sp, i):
                mmu.kvm_flush_remote_tlbs()
            gpte = mmu.memslots.read_u64((sp.gfn << PAGE_SHIFT) + 8 * i)
            if gpte is not None:
                update_pte(mmu, vmmu, sp, i, gpte)
            return
        if not spte & S.SPTE_MMU_PRESENT or not sp.unsync_children:
            return
        sp = mmu.child_of(spte)
        level -= 1


def update_pte(mmu: KvmMmu, vmmu: VcpuMmu, sp: ShadowPage, i: int, gpte: int) -> bool:
    """FNAME(prefetch_gpte): build entry i of a level-1 sp from gpte, speculatively."""
    nxe = vmmu.nxe
    if prefetch_invalid_gpte(gpte, nxe):
        return False
    gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
    slot = mmu.memslots.lookup(gfn)
    if slot is None:
        return False
    pte_access = leaf_pte_access(sp.access, gpte, nxe)
    mmu.mmu_set_spte(vmmu, sp, i, pte_access, False, gfn, slot.gfn_to_pfn(gfn), prefetch=True)
    return True


def kvm_mmu_invlpg(mmu: KvmMmu, vmmu: VcpuMmu, gva: int) -> None:
    """INVLPG: sync gva in the current and cached roots, then flush it from the TLB."""
    vmmu.clear_mmio_info(gva)
    for root in vmmu.all_roots():
        invlpg_root(mmu, vmmu, gva, root)
    vmmu.vcpu.flush_tlb_gva(gva)
    vmmu.stat["invlpg"] += 1
