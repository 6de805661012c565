"""The shadow page-fault path for 64-bit guests: FNAME(walk_addr), FNAME(page_fault), FNAME(fetch).

The guest walk is KVM's software walker: it reads the guest's tables from guest memory,
checks reserved bits and permissions against the vCPU's paging mode, and sets A/D only once
the whole walk succeeded (so a faulting walk changes nothing). It records, per level, the
table gfn and the access accumulated *above* that table (`pt_access`), which becomes
role.access of the shadow page of that table: a table reached through parents with
different rights gets different shadow pages (CVE-2021-38198, commit b1bd5cba3306).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmud.kvm.mmu.get_page import kvm_mmu_get_page
from mmud.kvm.mmu import mmio, zap
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.audit import AUDIT_POST_PAGE_FAULT, AUDIT_PRE_PAGE_FAULT, kvm_mmu_audit
from mmud.kvm.mmu.mmu import KVM_PFN_NOSLOT, RET_PF_EMULATE, RET_PF_RETRY, KvmMmu
from mmud.x86.paging import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    CR3_ADDR_MASK,
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT64_BASE_ADDR_MASK,
    PT64_LVL2_LARGE_ADDR_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    pt_index,
)

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu


# A gpte's W and U bits are its rights' W and U bits (ACC_WRITE_MASK, ACC_USER_MASK).
_GPTE_WU = PT_WRITABLE_MASK | PT_USER_MASK


class GuestWalker:
    """struct guest_walker: the outcome of a successful guest walk (index = level - 1)."""

    __slots__ = ("level", "gfn", "pte_access", "pt_access", "table_gfn", "pte_gpa", "ptes")

    def __init__(self) -> None:
        self.level = 0
        self.gfn = 0
        self.pte_access = 0
        self.pt_access = [0, 0, 0, 0]
        self.table_gfn = [0, 0, 0, 0]
        self.pte_gpa = [0, 0, 0, 0]
        self.ptes = [0, 0, 0, 0]


def walk_addr(mmu: KvmMmu, vmmu: VcpuMmu, addr: int, error_code: int) -> GuestWalker | int:
    """Walk the guest tables for addr; a walker, or the #PF error code to inject.

    The hot path of every shadow fault: guest memory is read through the slot's u64 view
    and permissions come from the vCPU's precomputed table (update_permission_bitmask).
    """
    if mmu.obs: mmu.obs.walk_addr(addr, error_code)  # observer
    write = error_code & PFERR_WRITE_MASK
    nxe = vmmu.nxe
    rsvd = vmmu.rsvd_table
    memslots = mmu.memslots
    w = GuestWalker()
    if mmu.obs: mmu.obs.gfn_to_memslot()  # observer
    table = vmmu.vcpu.cr3 & CR3_ADDR_MASK
    pte_access = ACC_ALL
    level = 4
    slot = None
    lo = hi = 0
    while True:
        pt_access = pte_access
        pte_gpa = table + ((addr >> (9 * level)) & 0xFF8)
        if not lo <= pte_gpa < hi:
            slot = memslots.lookup(pte_gpa >> PAGE_SHIFT)
            if slot is None:
                return _fault(mmu, vmmu, 0, error_code)
            lo = slot.base_gfn << PAGE_SHIFT
            hi = lo + (slot.npages << PAGE_SHIFT)
            u64 = slot.backing.u64
        gpte = u64[(pte_gpa - lo) >> 3]
        if mmu.obs: mmu.obs.paging_element(gpte, level)  # observer
        if not gpte & PT_PRESENT_MASK:
            return _fault(mmu, vmmu, 0, error_code)
        large = level == 2 and gpte & PT_PAGE_SIZE_MASK
        if gpte & rsvd[level * 2 + (1 if large else 0)]:
            return _fault(mmu, vmmu, PFERR_PRESENT_MASK | PFERR_RSVD_MASK, error_code)
        k = level - 1
        w.table_gfn[k] = table >> PAGE_SHIFT
        w.pte_gpa[k] = pte_gpa
        w.ptes[k] = gpte
        w.pt_access[k] = pt_access
        pte_access &= (gpte & _GPTE_WU) | (0 if nxe and gpte >> 63 else ACC_EXEC_MASK)
        if level == 1 or large:
            break
        table = gpte & PT64_BASE_ADDR_MASK
        level -= 1
    kind = (error_code >> 1 & 1) | (error_code >> 1 & 2) | (error_code >> 2 & 4)
    if vmmu.guest_permissions[kind] >> pte_access & 1:
        return _fault(mmu, vmmu, PFERR_PRESENT_MASK, error_code)
    # Success: set A on every entry used and D on the leaf of a write (FNAME(update_accessed_dirty_bits)).
    for k in range(3, level - 2, -1):
        gpte = w.ptes[k]
        new = gpte | PT_ACCESSED_MASK
        if k == level - 1 and write:
            new |= PT_DIRTY_MASK
        if new != gpte:
            if mmu.obs: mmu.obs.update_accessed_dirty_bits(w.pte_gpa[k], gpte, new)  # observer
            w.ptes[k] = new
            memslots.write_u64(w.pte_gpa[k], new)
            vmmu.vcpu.mark_page_dirty(w.table_gfn[k])
    leaf = w.ptes[level - 1]
    if level == 2:
        gfn = ((leaf & PT64_LVL2_LARGE_ADDR_MASK) >> PAGE_SHIFT) + ((addr >> PAGE_SHIFT) & 511)
    else:
        gfn = (leaf & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
    if not leaf & PT_DIRTY_MASK:
        pte_access &= ~ACC_WRITE_MASK  # FNAME(protect_clean_gpte)
    w.level = level
    w.gfn = gfn
    w.pte_access = pte_access
    return w


def _fault(mmu: KvmMmu, vmmu: VcpuMmu, errcode: int, access: int) -> int:
    """The error code to inject: the cause bits plus the access type (I/D only with NXE or SMEP)."""
    errcode |= access & (PFERR_WRITE_MASK | PFERR_USER_MASK)
    if access & PFERR_FETCH_MASK and (vmmu.nxe or vmmu.smep):
        errcode |= PFERR_FETCH_MASK
    if mmu.obs: mmu.obs.walker_error(errcode)  # observer
    return errcode


def gva_to_gpa(mmu: KvmMmu, vmmu: VcpuMmu, addr: int, error_code: int) -> int:
    """FNAME(gva_to_gpa): the gpa of addr, or ~error_code (< 0) for the #PF to inject."""
    w = walk_addr(mmu, vmmu, addr, error_code)
    if isinstance(w, int):
        return ~w
    return (w.gfn << PAGE_SHIFT) | (addr & 0xFFF)


def shadow_page_table_clear_flood(vmmu: VcpuMmu, addr: int) -> None:
    """Reset the flood counters of the sps on addr's shadow path (a real access used them)."""
    if vmmu.root is None:
        return
    for sp, _, _ in vmmu.kvm_mmu.shadow_walk(vmmu.root, addr):
        sp.write_flooding_count = 0


def page_fault(mmu: KvmMmu, vmmu: VcpuMmu, addr: int, error_code: int) -> int:
    """FNAME(page_fault) (RSVD already handled by the caller)."""
    w = walk_addr(mmu, vmmu, addr, error_code & ~PFERR_RSVD_MASK)
    if isinstance(w, int):
        vmmu.vcpu.inject_page_fault(addr, w)
        return RET_PF_RETRY
    write_fault = bool(error_code & PFERR_WRITE_MASK)
    if error_code & (PFERR_PRESENT_MASK | PFERR_WRITE_MASK) == (
        PFERR_PRESENT_MASK | PFERR_WRITE_MASK
    ) and mmu.page_track_is_active(w.gfn):
        shadow_page_table_clear_flood(vmmu, addr)
        return RET_PF_EMULATE
    slot = mmu.memslots.lookup(w.gfn)
    if slot is None:
        vmmu.cache_mmio_info(addr, w.gfn, w.pte_access & S.SHADOW_MMIO_ACCESS_MASK)
        if not vmmu.mmio_caching:
            return RET_PF_EMULATE
        pfn = None
    else:
        pfn = slot.gfn_to_pfn(w.gfn)
        # CR0.WP=0: a supervisor write to a read-only page gets a supervisor-only writable
        # spte (and NX under SMEP, or the kernel could now execute a user page).
        if write_fault and not w.pte_access & ACC_WRITE_MASK and not vmmu.cr0_wp:
            if not error_code & PFERR_USER_MASK:
                w.pte_access = (w.pte_access | ACC_WRITE_MASK) & ~ACC_USER_MASK
                if vmmu.smep:
                    w.pte_access &= ~ACC_EXEC_MASK
    if mmu.audit_enabled: kvm_mmu_audit(mmu, vmmu, AUDIT_PRE_PAGE_FAULT)  # audit point
    if not zap.make_mmu_pages_available(mmu):
        return RET_PF_RETRY
    r = fetch(mmu, vmmu, addr, w, write_fault, pfn)
    if mmu.audit_enabled: kvm_mmu_audit(mmu, vmmu, AUDIT_POST_PAGE_FAULT)  # audit point
    return r


def fetch(mmu: KvmMmu, vmmu: VcpuMmu, addr: int, w: GuestWalker, write_fault: bool, pfn: int | None) -> int:
    """FNAME(fetch): build the shadow path for addr and install the leaf spte."""
    sp = vmmu.root
    if sp is None:
        return RET_PF_RETRY
    level = sp.level
    pages = mmu.pool.pages
    while level > w.level:
        sp.write_flooding_count = 0
        i = (addr >> (3 + 9 * level)) & 511
        spte = sp.spt[i]
        if spte & S.SPTE_MMU_PRESENT:
            child = pages[((spte & S.SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT) - S.SPT_PFN_BASE]
        else:
            k = level - 2
            child = kvm_mmu_get_page(mmu, vmmu, w.table_gfn[k], level - 1, False, w.pt_access[k])
            mmu.link_shadow_page(sp, i, child)
        sp = child
        level -= 1
    # A guest 2 MiB page is mapped with 4 KiB sptes in a direct sp (no host huge pages):
    # the goal level is 1; an MMIO gfn has no pfn (KVM_PFN_NOSLOT).
    if mmu.obs: mmu.obs.spte_requested(w.gfn, KVM_PFN_NOSLOT if pfn is None else pfn, 1)  # observer
    direct_access = w.pte_access
    while level > 1:
        sp.write_flooding_count = 0
        i = pt_index(addr, level)
        spte = sp.spt[i]
        if spte & S.SPTE_MMU_PRESENT:
            child = mmu.child_of(spte)
            if child.access != direct_access:  # validate_direct_spte()
                mmu.drop_parent_pte(child, sp, i)
                mmu.kvm_flush_remote_tlbs()
                spte = 0
        if not spte & S.SPTE_MMU_PRESENT:
            base_gfn = w.gfn & ~((1 << (9 * (level - 1))) - 1)
            child = kvm_mmu_get_page(mmu, vmmu, base_gfn, level - 1, True, direct_access)
            mmu.link_shadow_page(sp, i, child)
        sp = child
        level -= 1
    sp.write_flooding_count = 0
    i = (addr >> PAGE_SHIFT) & 511
    vmmu.stat["pf_fixed"] += 1
    if pfn is None:
        return mmio.mark_mmio_spte(mmu, vmmu, sp, i, w.gfn, w.pte_access)
    vmmu.fixed = (sp, i)
    return mmu.mmu_set_spte(vmmu, sp, i, w.pte_access, write_fault, w.gfn, pfn)
